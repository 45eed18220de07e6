// One fused CG step with Lanczos bookkeeping, CPU: reference.cg_update, one system at a time.
#include "ops.h"

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
    const bool active = s.active[n];
    const bool ok = active && pAp > T(0);  // NaN curvature is a breakdown too
    const T rr = s.rr[n];
    const T a = ok ? rr / pAp : T(0);
    // Every system is updated, as in the reference (x + 0·p keeps NaN in p visible).
    T rr_new = T(0);
#pragma omp simd reduction(+ : rr_new)
    for (int64_t i = 0; i < d; ++i) {
      x[i] += a * p[i];
      r[i] -= a * ap[i];
      rr_new += r[i] * r[i];
    }
    if (!ok) rr_new = rr;
    const T b = ok ? rr_new / rr : T(0);
    const bool still = ok && rr_new > tol2 * s.bb[n];
    if (still) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) p[i] = r[i] + b * p[i];
    }
    s.breakdown[n] = s.breakdown[n] || (active && !ok);
    s.alphas[n * max_iter + it] = a;
    s.betas[n * max_iter + it] = b;
    s.steps[n] += ok ? 1 : 0;
    s.rr[n] = rr_new;
    s.active[n] = still;
    alpha[n] = a;
  }
}

template void cg_update_cpu<float>(const CGView<float>&, const float*, float*, int64_t, int64_t,
                                   int64_t, float, int64_t, int64_t);
template void cg_update_cpu<double>(const CGView<double>&, const double*, double*, int64_t,
                                    int64_t, int64_t, double, int64_t, int64_t);

}  // namespace rnf_fast
