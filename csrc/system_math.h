// Per-system math shared by the CPU (.cpp) and CUDA (cuda/*_device.cuh) kernels: scalar helpers,
// the scalar bookkeeping of one CG step and the Lanczos quadrature of one tridiagonal, written
// once for host and device. Torch-free; it compiles under NVRTC too (__CUDACC_RTC__: no standard
// headers there, the math functions are built in).
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

#include "views.h"

#if defined(__CUDACC__)  // nvcc and NVRTC
#define RNF_HD __host__ __device__
#else
#define RNF_HD
#endif

// CPU kernels on x86-64 GCC carry AVX2+FMA and AVX-512 clones besides the portable build, one
// picked at load time (function multi-versioning); their helpers are inlined into each clone.
// Measured at d = 64, float64 (AVX-512 machine): Cholesky 1.3x, inverse 1.7x, Lanczos 1.15x.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    __GNUC__ >= 11
#define RNF_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RNF_CPU_CLONES
#endif
#if defined(__CUDACC__)
#define RNF_INLINE __forceinline__
#elif defined(__GNUC__)
#define RNF_INLINE __attribute__((always_inline)) inline
#else
#define RNF_INLINE inline
#endif

namespace rnf_fast {

RNF_HD inline float abs_(float x) { return fabsf(x); }
RNF_HD inline double abs_(double x) { return fabs(x); }
RNF_HD inline float sqrt_(float x) { return sqrtf(x); }
RNF_HD inline double sqrt_(double x) { return sqrt(x); }
RNF_HD inline float log_(float x) { return logf(x); }
RNF_HD inline double log_(double x) { return log(x); }

template <typename T>
struct Limits;
// The <cfloat> constants, as exact hexadecimal literals (NVRTC has no <cfloat>).
template <>
struct Limits<float> {
  static constexpr float eps = 0x1p-23f;         // FLT_EPSILON
  static constexpr float tiny = 0x1p-126f;       // FLT_MIN
  static constexpr float max = 0x1.fffffep127f;  // FLT_MAX
  static constexpr float hypot_min = 1e-12f;
};
template <>
struct Limits<double> {
  static constexpr double eps = 0x1p-52;                 // DBL_EPSILON
  static constexpr double tiny = 0x1p-1022;              // DBL_MIN
  static constexpr double max = 0x1.fffffffffffffp1023;  // DBL_MAX
  static constexpr double hypot_min = 1e-138;
};

template <typename T>
RNF_HD inline bool finite_(T x) {
  return abs_(x) <= Limits<T>::max;  // false for NaN and ±inf
}

template <typename T>
RNF_HD inline T quiet_nan() {
#if defined(__CUDACC_RTC__)
  return T(__int_as_float(0x7fc00000));  // the quiet NaN that NAN is (no <cmath> in NVRTC)
#else
  return T(NAN);
#endif
}

// sqrt(a² + b²) without overflow or destructive underflow: the plain formula, rescaled only
// when a² + b² leaves the range where it is exact to rounding (hypot_min = sqrt(tiny) / eps).
template <typename T>
RNF_HD inline T hypot_(T a, T b) {
  const T h = sqrt_(a * a + b * b);
  if (h >= Limits<T>::hypot_min && h <= Limits<T>::max) return h;
  a = abs_(a);
  b = abs_(b);
  const T big = a > b ? a : b;
  const T small = a > b ? b : a;
  if (big == T(0)) return T(0);
  const T q = small / big;
  return big * sqrt_(T(1) + q * q);
}

// The scalar bookkeeping of one CG step of system n, as reference.cg_update; the kernels keep
// only the vector sweeps over d (pᵀAp; x, r and rᵀr; p) and call these between them.

// The step size from pᵀAp: ok is false for an inactive system and for a breakdown. The state's
// rᵀr is read here, once, before any thread of the system writes it back (cg_record).
template <typename T>
struct CGAlpha {
  bool active;
  bool ok;
  T rr;  // rᵀr before the step
  T alpha;
};

template <typename T>
RNF_HD inline CGAlpha<T> cg_alpha(const CGView<T>& s, int64_t n, T pAp) {
  const bool active = s.active[n];
  const bool ok = active && pAp > T(0);  // NaN curvature is a breakdown too
  const T rr = s.rr[n];
  return {active, ok, rr, ok ? rr / pAp : T(0)};
}

// β and the stopping rule from the new rᵀr (the old one is kept where no step was taken).
template <typename T>
struct CGBeta {
  T rr;
  T beta;
  bool still;  // still active: ‖r‖ > tol · ‖b‖ after a step
};

template <typename T>
RNF_HD inline CGBeta<T> cg_beta(const CGView<T>& s, int64_t n, const CGAlpha<T>& a, T rr_new,
                                T tol2) {
  if (!a.ok) rr_new = a.rr;
  const T b = a.ok ? rr_new / a.rr : T(0);
  return {rr_new, b, a.ok && rr_new > tol2 * s.bb[n]};
}

// Writes system n's breakdown flag, α and β in column `it`, step count, rᵀr, active flag and
// step size alpha[n].
template <typename T>
RNF_HD inline void cg_record(const CGView<T>& s, int64_t n, const CGAlpha<T>& a,
                             const CGBeta<T>& b, T* alpha, int64_t max_iter, int64_t it) {
  s.breakdown[n] = s.breakdown[n] || (a.active && !a.ok);
  s.alphas[n * max_iter + it] = a.alpha;
  s.betas[n * max_iter + it] = b.beta;
  s.steps[n] += a.ok ? 1 : 0;
  s.rr[n] = b.rr;
  s.active[n] = b.still;
  alpha[n] = a.alpha;
}

// Stochastic Lanczos quadrature of one system, as reference.lanczos_logquad: builds the
// m×m Lanczos tridiagonal (m = steps clamped to [0, M]) from the CG coefficients, finds its
// eigenvalues θ and the first components τ of its eigenvectors by implicit QL with Wilkinson
// shifts (only the first row of the eigenvector matrix is rotated: O(m) memory, O(m²) time),
// and returns bb · Σ τ² log θ, NaN where an eigenvalue with τ² > 0 is non-positive.
// Unlike the reference (whose eigh may raise), a non-finite T gives NaN. M <= kMaxDim.
template <typename T>
RNF_HD RNF_INLINE T lanczos_logquad_one(const T* alphas, const T* betas, int64_t steps, T bb,
                                        int64_t M) {
  const int m = steps < 0 ? 0 : (steps > M ? int(M) : int(steps));
  T dg[kMaxDim], e[kMaxDim], z[kMaxDim];
  T prev = T(0);  // β_{j-1} / α_{j-1}
  for (int j = 0; j < m; ++j) {
    const T inv_a = T(1) / alphas[j];
    const T b = betas[j] < T(0) ? T(0) : betas[j];  // clamp_min(0), NaN kept
    dg[j] = inv_a + prev;
    e[j] = j + 1 < m ? sqrt_(b) * inv_a : T(0);
    prev = betas[j] * inv_a;
    z[j] = j == 0 ? T(1) : T(0);
    if (!finite_(dg[j]) || !finite_(e[j])) return quiet_nan<T>();
  }
  int iters = 0;
  for (int l = 0; l < m; ++l) {
    while (true) {
      int mm = l;
      for (; mm < m - 1; ++mm) {
        if (abs_(e[mm]) <= Limits<T>::eps * (abs_(dg[mm]) + abs_(dg[mm + 1]))) break;
      }
      if (mm == l) break;
      if (++iters > 30 * m) return quiet_nan<T>();
      T g = (dg[l + 1] - dg[l]) / (T(2) * e[l]);
      T r = hypot_(g, T(1));
      g = dg[mm] - dg[l] + e[l] / (g + (g >= T(0) ? r : -r));
      T s = T(1), c = T(1), p = T(0);
      bool deflated = false;
      for (int i = mm - 1; i >= l; --i) {
        T f = s * e[i];
        const T b = c * e[i];
        r = hypot_(f, g);
        e[i + 1] = r;
        if (r == T(0)) {  // underflow: the matrix splits, restart at the same l
          dg[i + 1] -= p;
          e[mm] = T(0);
          deflated = true;
          break;
        }
        const T inv_r = T(1) / r;
        s = f * inv_r;
        c = g * inv_r;
        g = dg[i + 1] - p;
        r = (dg[i] - g) * s + T(2) * c * b;
        p = s * r;
        dg[i + 1] = g + p;
        g = c * r - b;
        f = z[i + 1];
        z[i + 1] = s * z[i] + c * f;
        z[i] = c * z[i] - s * f;
      }
      if (deflated) continue;
      dg[l] -= p;
      e[l] = g;
      e[mm] = T(0);
    }
  }
  T acc = T(0);
  for (int i = 0; i < m; ++i) {
    const T tau2 = z[i] * z[i];
    if (tau2 > T(0)) {
      const T theta = dg[i];
      acc += tau2 * (theta > T(0) ? log_(theta > Limits<T>::tiny ? theta : Limits<T>::tiny)
                                  : quiet_nan<T>());
    }
  }
  return bb * acc;
}

}  // namespace rnf_fast
