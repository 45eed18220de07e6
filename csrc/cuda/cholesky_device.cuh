// Small SPD Cholesky with log det and bounded jitter, and the inverse from the factor, device
// code: one block per matrix, the matrix in shared memory (d <= kMaxDim: at most 32 KiB).
//
// Compiled by nvcc into rnf_fast._C (cholesky_cuda.cu launches it) and by NVRTC at run time
// (rnf_fast/ops/cupy.py): no host code and no CUDA or standard headers here. Entry points, one
// per dtype, on flat pointers and scalars: rnf_cholesky_logdet_f32/_f64 and
// rnf_cholesky_inverse_f32/_f64, each launched with N blocks of kCholeskyThreads threads and
// d * d * sizeof(T) bytes of dynamic shared memory.
#pragma once

#include "../system_math.h"

namespace rnf_fast {
namespace device {

constexpr int kCholeskyThreads = 128;

template <typename T>
__device__ T* shared_matrix() {
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<T*>(smem);
}

// Right-looking Cholesky of the lower triangle of S (row-major d×d) by the whole block.
// Returns 0, or the 1-based order of the first leading minor that is not positive definite
// (NaN included), uniformly over the block; S[j, j] then holds the failed pivot.
template <typename T>
__device__ int factor_shared(T* S, int d) {
  for (int j = 0; j < d; ++j) {
    const T ajj = S[j * d + j];
    if (!(ajj > T(0))) return j + 1;
    const T ljj = sqrt_(ajj);
    const T inv = T(1) / ljj;
    __syncthreads();  // every thread has read the pivot
    if (threadIdx.x == 0) S[j * d + j] = ljj;
    for (int i = j + 1 + threadIdx.x; i < d; i += blockDim.x) S[i * d + j] *= inv;
    __syncthreads();
    const int rest = d - j - 1;
    for (int idx = threadIdx.x; idx < rest * rest; idx += blockDim.x) {
      const int i = j + 1 + idx / rest;
      const int k = j + 1 + idx % rest;
      if (k <= i) S[i * d + k] -= S[i * d + j] * S[k * d + j];
    }
    __syncthreads();
  }
  return 0;
}

template <typename T>
__device__ RNF_INLINE void cholesky_logdet(const T* __restrict__ A, const JitterSteps& jitter_steps,
                                           T* __restrict__ L, T* __restrict__ logdet,
                                           T* __restrict__ jitter, int32_t* __restrict__ info,
                                           int d) {
  T* S = shared_matrix<T>();
  const int64_t n = blockIdx.x;
  const T* a = A + n * d * d;
  T* l = L + n * d * d;
  T scale = T(0);
  T added = T(0);
  int code = 0;
  // k = -1 is the plain factorisation, then the jitters in turn; a system that fails every
  // jitter keeps its first partial factor, as in the reference.
  for (int k = -1; k < jitter_steps.count; ++k) {
    const T try_added = k < 0 ? T(0) : T(jitter_steps.steps[k]) * scale;
    for (int idx = threadIdx.x; idx < d * d; idx += blockDim.x) {
      const int i = idx / d, j = idx % d;
      S[idx] = j <= i ? a[idx] + try_added * T(i == j) : T(0);
    }
    __syncthreads();
    code = factor_shared(S, d);
    if (k < 0 || code == 0) {
      for (int idx = threadIdx.x; idx < d * d; idx += blockDim.x) l[idx] = S[idx];
      added = try_added;
    }
    if (code == 0) break;
    if (k < 0) {
      T trace = T(0);
      for (int i = 0; i < d; ++i) trace += a[i * d + i];
      scale = Limits<T>::eps * abs_(trace) / T(d);
    }
    __syncthreads();  // S is read (copied to L) before the next try overwrites it
  }
  if (threadIdx.x == 0) {
    T half = T(0);
    for (int i = 0; i < d; ++i) half += log_(S[i * d + i]);
    logdet[n] = code == 0 ? T(2) * half : quiet_nan<T>();
    jitter[n] = code == 0 ? added : T(0);
    info[n] = code;
  }
}

template <typename T>
__device__ RNF_INLINE void cholesky_inverse(const T* __restrict__ L, T* __restrict__ Ainv,
                                            int d) {
  T* W = shared_matrix<T>();  // L⁻¹
  const int64_t n = blockIdx.x;
  const T* l = L + n * d * d;
  T* out = Ainv + n * d * d;
  // Column t of L⁻¹ by forward substitution L w = e_t, one thread per column.
  for (int t = threadIdx.x; t < d; t += blockDim.x) {
    for (int i = 0; i < t; ++i) W[i * d + t] = T(0);
    W[t * d + t] = T(1) / l[t * d + t];
    for (int i = t + 1; i < d; ++i) {
      T s = T(0);
      for (int k = t; k < i; ++k) s += l[i * d + k] * W[k * d + t];
      W[i * d + t] = -s / l[i * d + i];
    }
  }
  __syncthreads();
  // A⁻¹[i, j] = Σ_{k >= max(i, j)} W[k, i] W[k, j]: the same products for (i, j) and (j, i).
  for (int idx = threadIdx.x; idx < d * d; idx += blockDim.x) {
    const int i = idx / d, j = idx % d;
    T s = T(0);
    for (int k = i > j ? i : j; k < d; ++k) s += W[k * d + i] * W[k * d + j];
    out[idx] = s;
  }
}

}  // namespace device
}  // namespace rnf_fast

// rnf_cholesky_logdet_<suffix>(A, L, logdet, jitter, info, d, jitter_count, s0, ..., s7): A, L
// (N, d, d), logdet, jitter, info (N,); the jitter steps (JitterSteps, ops.h) travel as
// jitter_count and kMaxJitterSteps = 8 scalars, so a launch needs no struct layout agreed with
// its caller and no copy to the device.
#define RNF_CHOLESKY_LOGDET_ENTRY(T, suffix)                                                   \
  extern "C" __global__ void rnf_cholesky_logdet_##suffix(                                     \
      const T* __restrict__ A, T* __restrict__ L, T* __restrict__ logdet,                      \
      T* __restrict__ jitter, rnf_fast::int32_t* __restrict__ info, int d, int jitter_count,   \
      double s0, double s1, double s2, double s3, double s4, double s5, double s6,             \
      double s7) {                                                                             \
    static_assert(rnf_fast::kMaxJitterSteps == 8, "one scalar per jitter step");               \
    const rnf_fast::JitterSteps jitter_steps{jitter_count, {s0, s1, s2, s3, s4, s5, s6, s7}};  \
    rnf_fast::device::cholesky_logdet(A, jitter_steps, L, logdet, jitter, info, d);            \
  }
RNF_CHOLESKY_LOGDET_ENTRY(float, f32)
RNF_CHOLESKY_LOGDET_ENTRY(double, f64)
#undef RNF_CHOLESKY_LOGDET_ENTRY

// rnf_cholesky_inverse_<suffix>(L, Ainv, d): L, Ainv (N, d, d).
#define RNF_CHOLESKY_INVERSE_ENTRY(T, suffix)                                                  \
  extern "C" __global__ void rnf_cholesky_inverse_##suffix(const T* __restrict__ L,            \
                                                           T* __restrict__ Ainv, int d) {      \
    rnf_fast::device::cholesky_inverse(L, Ainv, d);                                            \
  }
RNF_CHOLESKY_INVERSE_ENTRY(float, f32)
RNF_CHOLESKY_INVERSE_ENTRY(double, f64)
#undef RNF_CHOLESKY_INVERSE_ENTRY
