// The kernels' limits and views of a batch, shared by the host code, the CPU kernels and the
// device code. Torch-free and header-only; it compiles under a C++ compiler, nvcc and NVRTC
// (rnf_fast/ops/cupy.py compiles the device code at run time, where no standard header exists).
#pragma once

#if defined(__CUDACC_RTC__)
namespace rnf_fast {
// NVRTC has no <cstdint>: the fixed-width types of every CUDA target, spelled out.
using int32_t = int;
using int64_t = long long;
}  // namespace rnf_fast
#else
#include <cstdint>
namespace rnf_fast {
using std::int32_t;  // rnf_fast::int64_t names the type in every build (the entry points use it)
using std::int64_t;
}  // namespace rnf_fast
#endif

namespace rnf_fast {

// Largest d (Cholesky) and M (Lanczos steps) the kernels take; larger sizes run the reference.
constexpr int64_t kMaxDim = 64;
// Most jitter retries cholesky_logdet takes (the reference's default is 3).
constexpr int kMaxJitterSteps = 8;

// The CG state of reference.CGState: x, r, p (N, d); rr, bb (N,); active, breakdown (N,);
// steps (N,); alphas, betas (N, max_iter).
template <typename T>
struct CGView {
  T* x;
  T* r;
  T* p;
  T* rr;
  const T* bb;
  bool* active;
  bool* breakdown;
  int64_t* steps;
  T* alphas;
  T* betas;
};

// Jitters tried after a failed factorisation, in units of eps(T) * |tr A| / d.
struct JitterSteps {
  int count;
  double steps[kMaxJitterSteps];
};

}  // namespace rnf_fast
