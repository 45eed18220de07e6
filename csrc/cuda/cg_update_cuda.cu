// One fused CG step with Lanczos bookkeeping, CUDA: one warp per system, lanes over d (the
// scalar bookkeeping is shared with the CPU kernel: system_math.h).
#include <cuda_runtime.h>

#include "../system_math.h"

namespace rnf_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__global__ void cg_update_kernel(CGView<T> s, const T* __restrict__ Ap, T* __restrict__ alpha,
                                 int64_t N, int64_t d, int64_t max_iter, int64_t it, T tol2) {
  const int64_t n = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;  // uniform over the warp
  T* x = s.x + n * d;
  T* r = s.r + n * d;
  T* p = s.p + n * d;
  const T* ap = Ap + n * d;
  T part = T(0);
  for (int64_t i = lane; i < d; i += kWarp) part += p[i] * ap[i];
  const CGAlpha<T> a = cg_alpha(s, n, warp_sum(part));
  // Every system is updated, as in the reference (x + 0·p keeps NaN in p visible).
  part = T(0);
  for (int64_t i = lane; i < d; i += kWarp) {
    x[i] += a.alpha * p[i];
    const T ri = r[i] - a.alpha * ap[i];
    r[i] = ri;
    part += ri * ri;
  }
  const CGBeta<T> b = cg_beta(s, n, a, warp_sum(part), tol2);
  if (b.still) {
    for (int64_t i = lane; i < d; i += kWarp) p[i] = r[i] + b.beta * p[i];
  }
  if (lane == 0) cg_record(s, n, a, b, alpha, max_iter, it);
}

}  // namespace

template <typename T>
const char* cg_update_cuda(const CGView<T>& s, const T* Ap, T* alpha, int64_t N, int64_t d,
                           int64_t max_iter, int64_t it, T tol2, CUstream_st* stream) {
  const int64_t blocks = (N * kWarp + kThreads - 1) / kThreads;
  cg_update_kernel<T><<<blocks, kThreads, 0, stream>>>(s, Ap, alpha, N, d, max_iter, it, tol2);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template const char* cg_update_cuda<float>(const CGView<float>&, const float*, float*, int64_t,
                                           int64_t, int64_t, int64_t, float, CUstream_st*);
template const char* cg_update_cuda<double>(const CGView<double>&, const double*, double*,
                                            int64_t, int64_t, int64_t, int64_t, double,
                                            CUstream_st*);

}  // namespace rnf_fast
