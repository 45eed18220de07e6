// Small SPD Cholesky with log det and bounded jitter, and the inverse from the factor, CUDA:
// one block per matrix, the matrix in shared memory (d <= kMaxDim: at most 32 KiB).
#include <cuda_runtime.h>

#include "../system_math.h"

namespace rnf_fast {
namespace {

constexpr int kThreads = 128;

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
__global__ void cholesky_logdet_kernel(const T* __restrict__ A, JitterSteps jitter_steps,
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
__global__ void cholesky_inverse_kernel(const T* __restrict__ L, T* __restrict__ Ainv, int d) {
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

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

template <typename T>
const char* cholesky_logdet_cuda(const T* A, const JitterSteps& jitter_steps, T* L, T* logdet,
                                 T* jitter, int32_t* info, int64_t N, int64_t d,
                                 CUstream_st* stream) {
  const size_t smem = size_t(d * d) * sizeof(T);
  cholesky_logdet_kernel<T>
      <<<N, kThreads, smem, stream>>>(A, jitter_steps, L, logdet, jitter, info, int(d));
  return launch_error();
}

template <typename T>
const char* cholesky_inverse_cuda(const T* L, T* Ainv, int64_t N, int64_t d,
                                  CUstream_st* stream) {
  const size_t smem = size_t(d * d) * sizeof(T);
  cholesky_inverse_kernel<T><<<N, kThreads, smem, stream>>>(L, Ainv, int(d));
  return launch_error();
}

template const char* cholesky_logdet_cuda<float>(const float*, const JitterSteps&, float*, float*,
                                                 float*, int32_t*, int64_t, int64_t,
                                                 CUstream_st*);
template const char* cholesky_logdet_cuda<double>(const double*, const JitterSteps&, double*,
                                                  double*, double*, int32_t*, int64_t, int64_t,
                                                  CUstream_st*);
template const char* cholesky_inverse_cuda<float>(const float*, float*, int64_t, int64_t,
                                                  CUstream_st*);
template const char* cholesky_inverse_cuda<double>(const double*, double*, int64_t, int64_t,
                                                   CUstream_st*);

}  // namespace rnf_fast
