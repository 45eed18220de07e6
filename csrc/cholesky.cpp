// Small SPD Cholesky with log det and bounded jitter, and the inverse from the factor, CPU:
// reference.cholesky_logdet and reference.cholesky_inverse, one matrix at a time.
//
// The work buffers hold one matrix with rows padded to a multiple of kChunk columns. Every
// inner loop is `chunk_gemv`: kChunk running sums kept in registers while k advances, so there
// are no remainder loops, no horizontal reductions and no store-to-load chains through memory
// (the plain axpy form ran 1.2-1.4x slower at d = 64, and wider SIMD did not help it).
#include <algorithm>

#include "ops.h"
#include "system_math.h"

namespace rnf_fast {
namespace {

constexpr int64_t kChunk = 16;
static_assert(kMaxDim % kChunk == 0, "padded rows must fit the kMaxDim² buffers");

int64_t padded(int64_t d) { return (d + kChunk - 1) / kChunk * kChunk; }

// s[b] = Σ_{k < count} a[k · a_stride] · Y[k · ld + b] for b < kChunk.
template <typename T>
RNF_INLINE void chunk_gemv(const T* a, int64_t a_stride, const T* Y, int64_t ld, int64_t count,
                       T* s) {
  T acc[kChunk] = {};
  for (int64_t k = 0; k < count; ++k) {
    const T t = a[k * a_stride];
    const T* y = Y + k * ld;
#pragma omp simd
    for (int64_t b = 0; b < kChunk; ++b) acc[b] += t * y[b];
  }
  std::copy(acc, acc + kChunk, s);
}

// The Cholesky runs on U = Lᵀ (row j of U is column j of L), with row stride ld.
// U[j, i] = A[i, j] + added·δ_ij for i >= j (the lower triangle of A + added·I, spread as
// added·δ_ij like the reference's A + added·I), zero elsewhere.
template <typename T>
RNF_INLINE void load_transposed(const T* A, T added, T* U, int64_t ld, int64_t d) {
  std::fill(U, U + d * ld, T(0));
  for (int64_t j = 0; j < d; ++j) {
    for (int64_t i = j; i < d; ++i) U[j * ld + i] = A[i * d + j] + added * T(i == j);
  }
}

// L = Uᵀ, upper triangle zeroed.
template <typename T>
RNF_INLINE void store_transposed(const T* U, int64_t ld, T* L, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j <= i; ++j) L[i * d + j] = U[j * ld + i];
    std::fill(L + i * d + i + 1, L + (i + 1) * d, T(0));
  }
}

// Left-looking Cholesky in place on U: U[j, j:] -= Σ_{k<j} U[k, j] · U[k, j:], then row j is
// scaled by 1 / sqrt(U[j, j]). Returns 0, or the 1-based order of the first leading minor that
// is not positive definite (NaN included); U then holds the partial factor that LAPACK's potf2
// leaves: the failed pivot at U[j, j], the rest of column j of A untouched. (Chunks starting
// left of j also write U[j, i < j], which is never read as part of the factor.)
template <typename T>
RNF_INLINE int factor_transposed(T* U, int64_t ld, const T* A, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    T* Uj = U + j * ld;
    for (int64_t i0 = j / kChunk * kChunk; i0 < d; i0 += kChunk) {
      T s[kChunk];
      chunk_gemv(U + j, ld, U + i0, ld, j, s);
      for (int64_t b = 0; b < kChunk; ++b) Uj[i0 + b] -= s[b];
    }
    const T ajj = Uj[j];
    if (!(ajj > T(0))) {
      for (int64_t i = j + 1; i < d; ++i) Uj[i] = A[i * d + j];
      return int(j + 1);
    }
    const T ljj = sqrt_(ajj);
    const T inv = T(1) / ljj;
    Uj[j] = ljj;
    for (int64_t i = j + 1; i < d; ++i) Uj[i] *= inv;
  }
  return 0;
}

}  // namespace

template <typename T>
RNF_CPU_CLONES void cholesky_logdet_cpu(const T* A, const JitterSteps& jitter_steps, T* L,
                                        T* logdet, T* jitter, int32_t* info, int64_t d,
                                        int64_t begin, int64_t end) {
  T U[kMaxDim * kMaxDim];
  const int64_t ld = padded(d);
  for (int64_t n = begin; n < end; ++n) {
    const T* a = A + n * d * d;
    T* l = L + n * d * d;
    load_transposed(a, T(0), U, ld, d);
    int code = factor_transposed(U, ld, a, d);
    store_transposed(U, ld, l, d);
    T added = T(0);
    if (code != 0 && jitter_steps.count > 0) {
      T trace = T(0);
      for (int64_t i = 0; i < d; ++i) trace += a[i * d + i];
      const T scale = Limits<T>::eps * abs_(trace) / T(d);
      // A system that fails every jitter keeps its first partial factor, as in the reference.
      for (int k = 0; k < jitter_steps.count && code != 0; ++k) {
        const T try_added = T(jitter_steps.steps[k]) * scale;
        load_transposed(a, try_added, U, ld, d);
        code = factor_transposed(U, ld, a, d);
        if (code == 0) {
          store_transposed(U, ld, l, d);
          added = try_added;
        }
      }
    }
    T half = T(0);
    for (int64_t i = 0; i < d; ++i) half += log_(l[i * d + i]);
    logdet[n] = code == 0 ? T(2) * half : quiet_nan<T>();
    jitter[n] = added;
    info[n] = code;
  }
}

template <typename T>
RNF_CPU_CLONES void cholesky_inverse_cpu(const T* L, T* Ainv, int64_t d, int64_t begin,
                                         int64_t end) {
  T W[kMaxDim * kMaxDim];  // L⁻¹ with row stride ld, zero above the diagonal and in the padding
  const int64_t ld = padded(d);
  for (int64_t n = begin; n < end; ++n) {
    const T* l = L + n * d * d;
    T* out = Ainv + n * d * d;
    // Row i of L⁻¹: W[i, :i] = -(L[i, :i] W[:i, :i]) / L[i, i], W[i, i] = 1 / L[i, i].
    for (int64_t i = 0; i < d; ++i) {
      T* Wi = W + i * ld;
      const T inv = T(1) / l[i * d + i];
      for (int64_t j0 = 0; j0 < i; j0 += kChunk) {
        T s[kChunk];
        chunk_gemv(l + i * d + j0, 1, W + j0 * ld + j0, ld, i - j0, s);  // W[k, j] = 0, k < j
        for (int64_t b = 0; b < kChunk; ++b) Wi[j0 + b] = -s[b] * inv;
      }
      Wi[i] = inv;
      std::fill(Wi + i + 1, Wi + ld, T(0));
    }
    // A⁻¹ = WᵀW: A⁻¹[i, j] = Σ_{k >= i} W[k, i] W[k, j] for j <= i, then mirrored.
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j0 = 0; j0 <= i; j0 += kChunk) {
        T s[kChunk];
        chunk_gemv(W + i * ld + i, ld, W + i * ld + j0, ld, d - i, s);
        std::copy(s, s + std::min(kChunk, i + 1 - j0), out + i * d + j0);
      }
    }
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = i + 1; j < d; ++j) out[i * d + j] = out[j * d + i];
    }
  }
}

template void cholesky_logdet_cpu<float>(const float*, const JitterSteps&, float*, float*, float*,
                                         int32_t*, int64_t, int64_t, int64_t);
template void cholesky_logdet_cpu<double>(const double*, const JitterSteps&, double*, double*,
                                          double*, int32_t*, int64_t, int64_t, int64_t);
template void cholesky_inverse_cpu<float>(const float*, float*, int64_t, int64_t, int64_t);
template void cholesky_inverse_cpu<double>(const double*, double*, int64_t, int64_t, int64_t);

}  // namespace rnf_fast
