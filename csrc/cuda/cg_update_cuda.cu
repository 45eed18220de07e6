// One fused CG step with Lanczos bookkeeping, CUDA host launcher: the kernels are the entry
// points of cg_update_device.cuh, which NVRTC also compiles (rnf_fast/ops/cupy.py).
#include <cuda_runtime.h>

#include "../ops.h"
#include "cg_update_device.cuh"

namespace rnf_fast {
namespace {

// The entry point of each dtype.
auto cg_update_kernel(float) { return rnf_cg_update_f32; }
auto cg_update_kernel(double) { return rnf_cg_update_f64; }

}  // namespace

template <typename T>
const char* cg_update_cuda(const CGView<T>& s, const T* Ap, T* alpha, int64_t N, int64_t d,
                           int64_t max_iter, int64_t it, T tol2, CUstream_st* stream) {
  using device::kCgThreads;
  const int64_t blocks = (N * device::kWarp + kCgThreads - 1) / kCgThreads;
  cg_update_kernel(T())<<<blocks, kCgThreads, 0, stream>>>(s.x, s.r, s.p, s.rr, s.bb, s.active,
                                                           s.breakdown, s.steps, s.alphas,
                                                           s.betas, Ap, alpha, N, d, max_iter,
                                                           it, tol2);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template const char* cg_update_cuda<float>(const CGView<float>&, const float*, float*, int64_t,
                                           int64_t, int64_t, int64_t, float, CUstream_st*);
template const char* cg_update_cuda<double>(const CGView<double>&, const double*, double*,
                                            int64_t, int64_t, int64_t, int64_t, double,
                                            CUstream_st*);

}  // namespace rnf_fast
