// One fused CG step with Lanczos bookkeeping, CUDA: one warp per system, lanes over d.
#include <cuda_runtime.h>

#include "../ops.h"

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
  const T pAp = warp_sum(part);
  const bool active = s.active[n];
  const bool ok = active && pAp > T(0);  // NaN curvature is a breakdown too
  const T rr = s.rr[n];
  const T a = ok ? rr / pAp : T(0);
  // Every system is updated, as in the reference (x + 0·p keeps NaN in p visible).
  part = T(0);
  for (int64_t i = lane; i < d; i += kWarp) {
    x[i] += a * p[i];
    const T ri = r[i] - a * ap[i];
    r[i] = ri;
    part += ri * ri;
  }
  T rr_new = warp_sum(part);
  if (!ok) rr_new = rr;
  const T b = ok ? rr_new / rr : T(0);
  const bool still = ok && rr_new > tol2 * s.bb[n];
  if (still) {
    for (int64_t i = lane; i < d; i += kWarp) p[i] = r[i] + b * p[i];
  }
  if (lane == 0) {
    s.breakdown[n] = s.breakdown[n] || (active && !ok);
    s.alphas[n * max_iter + it] = a;
    s.betas[n * max_iter + it] = b;
    s.steps[n] += ok ? 1 : 0;
    s.rr[n] = rr_new;
    s.active[n] = still;
    alpha[n] = a;
  }
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
