// Stochastic Lanczos quadrature, CUDA: one thread per tridiagonal, sharing the per-system
// implicit-QL code of the CPU kernel (system_math.h).
#include <cuda_runtime.h>

#include "../system_math.h"

namespace rnf_fast {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void lanczos_logquad_kernel(const T* __restrict__ alphas, const T* __restrict__ betas,
                                       const int64_t* __restrict__ steps,
                                       const T* __restrict__ bb, T* __restrict__ out, int64_t N,
                                       int64_t M) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  out[n] = lanczos_logquad_one(alphas + n * M, betas + n * M, steps[n], bb[n], M);
}

}  // namespace

template <typename T>
const char* lanczos_logquad_cuda(const T* alphas, const T* betas, const int64_t* steps,
                                 const T* bb, T* out, int64_t N, int64_t M, CUstream_st* stream) {
  const int64_t blocks = (N + kThreads - 1) / kThreads;
  lanczos_logquad_kernel<T><<<blocks, kThreads, 0, stream>>>(alphas, betas, steps, bb, out, N, M);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template const char* lanczos_logquad_cuda<float>(const float*, const float*, const int64_t*,
                                                 const float*, float*, int64_t, int64_t,
                                                 CUstream_st*);
template const char* lanczos_logquad_cuda<double>(const double*, const double*, const int64_t*,
                                                  const double*, double*, int64_t, int64_t,
                                                  CUstream_st*);

}  // namespace rnf_fast
