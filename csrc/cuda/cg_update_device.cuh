// One fused CG step with Lanczos bookkeeping, device code: one warp per system, lanes over d
// (the scalar bookkeeping is shared with the CPU kernel: system_math.h).
//
// Compiled by nvcc into rnf_fast._C (cg_update_cuda.cu launches it) and by NVRTC at run time
// (rnf_fast/ops/cupy.py): no host code and no CUDA or standard headers here. Entry points, one
// per dtype, on flat pointers: rnf_cg_update_f32 and rnf_cg_update_f64, launched with
// kCgThreads threads per block and ceil(N * kWarp / kCgThreads) blocks, no shared memory.
#pragma once

#include "../system_math.h"

namespace rnf_fast {
namespace device {

constexpr int kWarp = 32;
constexpr int kCgThreads = 256;

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__device__ RNF_INLINE void cg_update(const CGView<T>& s, const T* __restrict__ Ap,
                                     T* __restrict__ alpha, int64_t N, int64_t d,
                                     int64_t max_iter, int64_t it, T tol2) {
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

}  // namespace device
}  // namespace rnf_fast

// rnf_cg_update_<suffix>(x, r, p, rr, bb, active, breakdown, steps, alphas, betas, Ap, alpha,
// N, d, max_iter, it, tol2): the CG state of CGView (ops.h), Ap (N, d), the step sizes alpha
// (N,) written; tol2 is the squared relative tolerance.
#define RNF_CG_UPDATE_ENTRY(T, suffix)                                                         \
  extern "C" __global__ void rnf_cg_update_##suffix(                                           \
      T* x, T* r, T* p, T* rr, const T* bb, bool* active, bool* breakdown,                     \
      rnf_fast::int64_t* steps, T* alphas, T* betas, const T* __restrict__ Ap,                 \
      T* __restrict__ alpha, rnf_fast::int64_t N, rnf_fast::int64_t d,                         \
      rnf_fast::int64_t max_iter, rnf_fast::int64_t it, T tol2) {                              \
    const rnf_fast::CGView<T> s{x, r, p, rr, bb, active, breakdown, steps, alphas, betas};     \
    rnf_fast::device::cg_update(s, Ap, alpha, N, d, max_iter, it, tol2);                       \
  }
RNF_CG_UPDATE_ENTRY(float, f32)
RNF_CG_UPDATE_ENTRY(double, f64)
#undef RNF_CG_UPDATE_ENTRY
