// Stochastic Lanczos quadrature, CUDA host launcher: the kernels are the entry points of
// lanczos_logquad_device.cuh, which NVRTC also compiles (rnf_fast/ops/cupy.py).
#include <cuda_runtime.h>

#include "../ops.h"
#include "lanczos_logquad_device.cuh"

namespace rnf_fast {
namespace {

// The entry point of each dtype.
auto lanczos_logquad_kernel(float) { return rnf_lanczos_logquad_f32; }
auto lanczos_logquad_kernel(double) { return rnf_lanczos_logquad_f64; }

}  // namespace

template <typename T>
const char* lanczos_logquad_cuda(const T* alphas, const T* betas, const int64_t* steps,
                                 const T* bb, T* out, int64_t N, int64_t M, CUstream_st* stream) {
  using device::kLanczosThreads;
  const int64_t blocks = (N + kLanczosThreads - 1) / kLanczosThreads;
  lanczos_logquad_kernel(T())<<<blocks, kLanczosThreads, 0, stream>>>(alphas, betas, steps, bb,
                                                                      out, N, M);
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
