// Small SPD Cholesky with log det and bounded jitter, and the inverse from the factor, CUDA
// host launchers: the kernels are the entry points of cholesky_device.cuh, which NVRTC also
// compiles (rnf_fast/ops/cupy.py).
#include <cuda_runtime.h>

#include "../ops.h"
#include "cholesky_device.cuh"

namespace rnf_fast {
namespace {

// The entry points of each dtype.
auto cholesky_logdet_kernel(float) { return rnf_cholesky_logdet_f32; }
auto cholesky_logdet_kernel(double) { return rnf_cholesky_logdet_f64; }
auto cholesky_inverse_kernel(float) { return rnf_cholesky_inverse_f32; }
auto cholesky_inverse_kernel(double) { return rnf_cholesky_inverse_f64; }

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
  const double* s = jitter_steps.steps;
  cholesky_logdet_kernel(T())<<<N, device::kCholeskyThreads, smem, stream>>>(
      A, L, logdet, jitter, info, int(d), jitter_steps.count, s[0], s[1], s[2], s[3], s[4], s[5],
      s[6], s[7]);
  return launch_error();
}

template <typename T>
const char* cholesky_inverse_cuda(const T* L, T* Ainv, int64_t N, int64_t d,
                                  CUstream_st* stream) {
  const size_t smem = size_t(d * d) * sizeof(T);
  cholesky_inverse_kernel(T())<<<N, device::kCholeskyThreads, smem, stream>>>(L, Ainv, int(d));
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
