// Torch-free declarations of the kernels behind rnf_fast._C.
//
// Every op works on N independent small systems stored contiguously (row-major). The CPU
// kernels take a range [begin, end) of systems, so the binding can split the batch over
// threads; the CUDA launchers take the whole batch and a stream. Only csrc/bindings.cpp
// includes torch headers: these files compile in about a second each.
//
// Semantics are those of the plain-PyTorch spec in rnf_fast/ops/reference.py (see
// csrc/README.md).
#pragma once

#include "views.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace rnf_fast {

// One CG step for systems [begin, end): updates the state in place, writes column `it` of
// alphas/betas and the step sizes to alpha (N,). tol2 is the squared relative tolerance.
template <typename T>
void cg_update_cpu(const CGView<T>& s, const T* Ap, T* alpha, int64_t d, int64_t max_iter,
                   int64_t it, T tol2, int64_t begin, int64_t end);

// SLQ estimate bb * e1ᵀ log(T) e1 of the Lanczos tridiagonal T of each system into out (N,);
// alphas, betas (N, M), steps (N,), bb (N,). M <= kMaxDim.
template <typename T>
void lanczos_logquad_cpu(const T* alphas, const T* betas, const int64_t* steps, const T* bb,
                         T* out, int64_t M, int64_t begin, int64_t end);

// Cholesky of A (N, d, d) (lower triangle read) with bounded jitter: L (N, d, d), logdet,
// jitter (N,), info (N,). d <= kMaxDim.
template <typename T>
void cholesky_logdet_cpu(const T* A, const JitterSteps& jitter_steps, T* L, T* logdet,
                         T* jitter, int32_t* info, int64_t d, int64_t begin, int64_t end);

// A⁻¹ (N, d, d) from lower Cholesky factors L (N, d, d) (lower triangle read). d <= kMaxDim.
template <typename T>
void cholesky_inverse_cpu(const T* L, T* Ainv, int64_t d, int64_t begin, int64_t end);

// CUDA launchers: same arguments for the whole batch of N systems, on `stream`. They return
// nullptr, or the CUDA error string of a failed launch.
template <typename T>
const char* cg_update_cuda(const CGView<T>& s, const T* Ap, T* alpha, int64_t N, int64_t d,
                           int64_t max_iter, int64_t it, T tol2, CUstream_st* stream);

template <typename T>
const char* lanczos_logquad_cuda(const T* alphas, const T* betas, const int64_t* steps,
                                 const T* bb, T* out, int64_t N, int64_t M, CUstream_st* stream);

template <typename T>
const char* cholesky_logdet_cuda(const T* A, const JitterSteps& jitter_steps, T* L, T* logdet,
                                 T* jitter, int32_t* info, int64_t N, int64_t d,
                                 CUstream_st* stream);

template <typename T>
const char* cholesky_inverse_cuda(const T* L, T* Ainv, int64_t N, int64_t d,
                                  CUstream_st* stream);

}  // namespace rnf_fast
