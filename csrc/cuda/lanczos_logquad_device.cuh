// Stochastic Lanczos quadrature, device code: one thread per tridiagonal, sharing the
// per-system implicit-QL code of the CPU kernel (system_math.h).
//
// Compiled by nvcc into rnf_fast._C (lanczos_logquad_cuda.cu launches it) and by NVRTC at run
// time (rnf_fast/ops/cupy.py): no host code and no CUDA or standard headers here. Entry points,
// one per dtype, on flat pointers: rnf_lanczos_logquad_f32 and rnf_lanczos_logquad_f64,
// launched with kLanczosThreads threads per block and ceil(N / kLanczosThreads) blocks, no
// shared memory.
#pragma once

#include "../system_math.h"

namespace rnf_fast {
namespace device {

constexpr int kLanczosThreads = 128;

template <typename T>
__device__ RNF_INLINE void lanczos_logquad(const T* __restrict__ alphas,
                                           const T* __restrict__ betas,
                                           const int64_t* __restrict__ steps,
                                           const T* __restrict__ bb, T* __restrict__ out,
                                           int64_t N, int64_t M) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  out[n] = lanczos_logquad_one(alphas + n * M, betas + n * M, steps[n], bb[n], M);
}

}  // namespace device
}  // namespace rnf_fast

// rnf_lanczos_logquad_<suffix>(alphas, betas, steps, bb, out, N, M): alphas, betas (N, M),
// steps, bb (N,); the estimates written to out (N,). M <= kMaxDim.
#define RNF_LANCZOS_LOGQUAD_ENTRY(T, suffix)                                                   \
  extern "C" __global__ void rnf_lanczos_logquad_##suffix(                                     \
      const T* __restrict__ alphas, const T* __restrict__ betas,                               \
      const rnf_fast::int64_t* __restrict__ steps, const T* __restrict__ bb,                   \
      T* __restrict__ out, rnf_fast::int64_t N, rnf_fast::int64_t M) {                         \
    rnf_fast::device::lanczos_logquad(alphas, betas, steps, bb, out, N, M);                    \
  }
RNF_LANCZOS_LOGQUAD_ENTRY(float, f32)
RNF_LANCZOS_LOGQUAD_ENTRY(double, f64)
#undef RNF_LANCZOS_LOGQUAD_ENTRY
