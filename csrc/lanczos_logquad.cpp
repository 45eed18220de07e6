// Stochastic Lanczos quadrature, CPU: reference.lanczos_logquad, one tridiagonal at a time.
#include "ops.h"
#include "system_math.h"

namespace rnf_fast {

template <typename T>
RNF_CPU_CLONES void lanczos_logquad_cpu(const T* alphas, const T* betas, const int64_t* steps,
                                        const T* bb, T* out, int64_t M, int64_t begin,
                                        int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    out[n] = lanczos_logquad_one(alphas + n * M, betas + n * M, steps[n], bb[n], M);
  }
}

template void lanczos_logquad_cpu<float>(const float*, const float*, const int64_t*, const float*,
                                         float*, int64_t, int64_t, int64_t);
template void lanczos_logquad_cpu<double>(const double*, const double*, const int64_t*,
                                          const double*, double*, int64_t, int64_t, int64_t);

}  // namespace rnf_fast
