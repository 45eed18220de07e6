// One fused CG step with Lanczos bookkeeping, CPU: reference.cg_update, one system at a time
// (the scalar bookkeeping is shared with the CUDA kernel: system_math.h).
#include "ops.h"
#include "system_math.h"

namespace rnf_fast {

template <typename T>
void cg_update_cpu(const CGView<T>& s, const T* Ap, T* alpha, int64_t d, int64_t max_iter,
                   int64_t it, T tol2, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    T* x = s.x + n * d;
    T* r = s.r + n * d;
    T* p = s.p + n * d;
    const T* ap = Ap + n * d;
    T pAp = T(0);
#pragma omp simd reduction(+ : pAp)
    for (int64_t i = 0; i < d; ++i) pAp += p[i] * ap[i];
    const CGAlpha<T> a = cg_alpha(s, n, pAp);
    // Every system is updated, as in the reference (x + 0·p keeps NaN in p visible).
    T rr_new = T(0);
#pragma omp simd reduction(+ : rr_new)
    for (int64_t i = 0; i < d; ++i) {
      x[i] += a.alpha * p[i];
      r[i] -= a.alpha * ap[i];
      rr_new += r[i] * r[i];
    }
    const CGBeta<T> b = cg_beta(s, n, a, rr_new, tol2);
    if (b.still) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) p[i] = r[i] + b.beta * p[i];
    }
    cg_record(s, n, a, b, alpha, max_iter, it);
  }
}

template void cg_update_cpu<float>(const CGView<float>&, const float*, float*, int64_t, int64_t,
                                   int64_t, float, int64_t, int64_t);
template void cg_update_cpu<double>(const CGView<double>&, const double*, double*, int64_t,
                                    int64_t, int64_t, double, int64_t, int64_t);

}  // namespace rnf_fast
