// Python bindings of rnf_fast._C: input validation and CPU/CUDA dispatch. The only source
// that includes torch headers; the kernels live in torch-free files (see ops.h).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>
#include <vector>

#ifdef RNF_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "ops.h"

namespace rnf_fast {
namespace {

#ifdef RNF_FAST_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

// dtypes as Python spells them ("torch.float32"), for the error messages.
const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return c10::toString(dtype);
  }
}

// Device, dtype and contiguity of `t`, checked against `like` (the op's first tensor).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(),
                    " like the op's other inputs, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                 const char* expected) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must be ", expected, " = ", shape, ", got ",
                    shape_of(t));
}

// The op's first tensor fixes device and dtype: float32 or float64, on CPU (or CUDA when built).
void check_first(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be torch.float32 or torch.float64, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_cpu() || (kWithCuda && t.is_cuda()), name, " must be a CPU",
                    kWithCuda ? " or CUDA" : "", " tensor",
                    kWithCuda ? "" : " (rnf_fast._C was built without CUDA)", ", got ",
                    t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_max_dim(int64_t size, const char* what) {
  TORCH_CHECK_VALUE(size <= kMaxDim, what, " must be <= ", kMaxDim,
                    " for the compiled kernels (use rnf_fast.ops.reference beyond), got ", size);
}

// Systems per thread chunk, so each chunk holds about 2^15 flops.
int64_t grain(int64_t work_per_system) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_system));
}

#ifdef RNF_FAST_WITH_CUDA
CUstream_st* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "rnf_fast._C.", op, ": CUDA kernel launch failed: ", err);
}
#endif

at::Tensor cg_update(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                     const at::Tensor& rr, const at::Tensor& bb, const at::Tensor& active,
                     const at::Tensor& breakdown, const at::Tensor& steps,
                     const at::Tensor& alphas, const at::Tensor& betas, const at::Tensor& Ap,
                     int64_t it, double tol) {
  check_first(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be (N, d), got ", shape_of(x));
  TORCH_CHECK_VALUE(alphas.dim() == 2, "alphas must be (N, max_iter), got ", shape_of(alphas));
  const int64_t N = x.size(0), d = x.size(1), max_iter = alphas.size(1);
  const auto dtype = x.scalar_type();
  for (auto [t, name] : {std::pair{&r, "r"}, {&p, "p"}, {&Ap, "Ap"}}) {
    check_like(*t, name, x, dtype);
    check_shape(*t, name, {N, d}, "(N, d)");
  }
  for (auto [t, name] : {std::pair{&rr, "rr"}, {&bb, "bb"}}) {
    check_like(*t, name, x, dtype);
    check_shape(*t, name, {N}, "(N,)");
  }
  for (auto [t, name] : {std::pair{&active, "active"}, {&breakdown, "breakdown"}}) {
    check_like(*t, name, x, at::kBool);
    check_shape(*t, name, {N}, "(N,)");
  }
  check_like(steps, "steps", x, at::kLong);
  check_shape(steps, "steps", {N}, "(N,)");
  for (auto [t, name] : {std::pair{&alphas, "alphas"}, {&betas, "betas"}}) {
    check_like(*t, name, x, dtype);
    check_shape(*t, name, {N, max_iter}, "(N, max_iter)");
  }
  TORCH_CHECK_VALUE(0 <= it && it < max_iter, "it must be in [0, max_iter) = [0, ", max_iter,
                    "), got ", it);
  at::Tensor alpha = at::empty({N}, x.options());
  if (N == 0) return alpha;
  AT_DISPATCH_FLOATING_TYPES(dtype, "cg_update", [&] {
    const CGView<scalar_t> s{x.data_ptr<scalar_t>(),      r.data_ptr<scalar_t>(),
                             p.data_ptr<scalar_t>(),      rr.data_ptr<scalar_t>(),
                             bb.data_ptr<scalar_t>(),     active.data_ptr<bool>(),
                             breakdown.data_ptr<bool>(),  steps.data_ptr<int64_t>(),
                             alphas.data_ptr<scalar_t>(), betas.data_ptr<scalar_t>()};
    const auto tol2 = static_cast<scalar_t>(tol * tol);
    const scalar_t* ap = Ap.data_ptr<scalar_t>();
    scalar_t* out = alpha.data_ptr<scalar_t>();
#ifdef RNF_FAST_WITH_CUDA
    if (x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(x.device());
      check_launch(
          cg_update_cuda(s, ap, out, N, d, max_iter, it, tol2, stream_of(x)), "cg_update");
      return;
    }
#endif
    at::parallel_for(0, N, grain(6 * d), [&](int64_t begin, int64_t end) {
      cg_update_cpu(s, ap, out, d, max_iter, it, tol2, begin, end);
    });
  });
  return alpha;
}

at::Tensor lanczos_logquad(const at::Tensor& alphas, const at::Tensor& betas,
                           const at::Tensor& steps, const at::Tensor& bb) {
  check_first(alphas, "alphas");
  TORCH_CHECK_VALUE(alphas.dim() == 2, "alphas must be (N, M), got ", shape_of(alphas));
  const int64_t N = alphas.size(0), M = alphas.size(1);
  check_max_dim(M, "M (alphas.shape[1])");
  const auto dtype = alphas.scalar_type();
  check_like(betas, "betas", alphas, dtype);
  check_shape(betas, "betas", {N, M}, "(N, M)");
  check_like(steps, "steps", alphas, at::kLong);
  check_shape(steps, "steps", {N}, "(N,)");
  check_like(bb, "bb", alphas, dtype);
  check_shape(bb, "bb", {N}, "(N,)");
  at::Tensor out = at::empty({N}, alphas.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "lanczos_logquad", [&] {
    const scalar_t* a = alphas.data_ptr<scalar_t>();
    const scalar_t* b = betas.data_ptr<scalar_t>();
    const int64_t* m = steps.data_ptr<int64_t>();
    const scalar_t* q = bb.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
#ifdef RNF_FAST_WITH_CUDA
    if (alphas.is_cuda()) {
      const c10::cuda::CUDAGuard guard(alphas.device());
      check_launch(lanczos_logquad_cuda(a, b, m, q, o, N, M, stream_of(alphas)),
                   "lanczos_logquad");
      return;
    }
#endif
    at::parallel_for(0, N, grain(20 * M * M), [&](int64_t begin, int64_t end) {
      lanczos_logquad_cpu(a, b, m, q, o, M, begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cholesky_logdet(
    const at::Tensor& A, const std::vector<double>& jitter_steps) {
  check_first(A, "A");
  TORCH_CHECK_VALUE(A.dim() == 3 && A.size(1) == A.size(2), "A must be (N, d, d), got ",
                    shape_of(A));
  const int64_t N = A.size(0), d = A.size(1);
  check_max_dim(d, "d (A.shape[-1])");
  TORCH_CHECK_VALUE(jitter_steps.size() <= size_t(kMaxJitterSteps),
                    "jitter_steps must have at most ", kMaxJitterSteps, " entries, got ",
                    jitter_steps.size());
  JitterSteps js{int(jitter_steps.size()), {}};
  std::copy(jitter_steps.begin(), jitter_steps.end(), js.steps);
  at::Tensor L = at::empty_like(A);
  at::Tensor logdet = at::empty({N}, A.options());
  at::Tensor jitter = at::empty({N}, A.options());
  at::Tensor info = at::empty({N}, A.options().dtype(at::kInt));
  if (N == 0) return {L, logdet, jitter, info};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "cholesky_logdet", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    scalar_t* l = L.data_ptr<scalar_t>();
    scalar_t* ld = logdet.data_ptr<scalar_t>();
    scalar_t* jit = jitter.data_ptr<scalar_t>();
    int32_t* inf = info.data_ptr<int32_t>();
#ifdef RNF_FAST_WITH_CUDA
    if (A.is_cuda()) {
      const c10::cuda::CUDAGuard guard(A.device());
      check_launch(cholesky_logdet_cuda(a, js, l, ld, jit, inf, N, d, stream_of(A)),
                   "cholesky_logdet");
      return;
    }
#endif
    at::parallel_for(0, N, grain(d * d * d / 3), [&](int64_t begin, int64_t end) {
      cholesky_logdet_cpu(a, js, l, ld, jit, inf, d, begin, end);
    });
  });
  return {L, logdet, jitter, info};
}

at::Tensor cholesky_inverse(const at::Tensor& L) {
  check_first(L, "L");
  TORCH_CHECK_VALUE(L.dim() == 3 && L.size(1) == L.size(2), "L must be (N, d, d), got ",
                    shape_of(L));
  const int64_t N = L.size(0), d = L.size(1);
  check_max_dim(d, "d (L.shape[-1])");
  at::Tensor Ainv = at::empty_like(L);
  if (N == 0) return Ainv;
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "cholesky_inverse", [&] {
    const scalar_t* l = L.data_ptr<scalar_t>();
    scalar_t* out = Ainv.data_ptr<scalar_t>();
#ifdef RNF_FAST_WITH_CUDA
    if (L.is_cuda()) {
      const c10::cuda::CUDAGuard guard(L.device());
      check_launch(cholesky_inverse_cuda(l, out, N, d, stream_of(L)), "cholesky_inverse");
      return;
    }
#endif
    at::parallel_for(0, N, grain(2 * d * d * d / 3), [&](int64_t begin, int64_t end) {
      cholesky_inverse_cpu(l, out, d, begin, end);
    });
  });
  return Ainv;
}

}  // namespace
}  // namespace rnf_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() =
      "Compiled per-system numerics of rnf_fast (see rnf_fast.ops.cpp for the typed layer "
      "and rnf_fast.ops.reference for the spec of every op).";
  m.attr("MAX_DIM") = rnf_fast::kMaxDim;
  m.attr("MAX_JITTER_STEPS") = rnf_fast::kMaxJitterSteps;
  m.attr("WITH_CUDA") = rnf_fast::kWithCuda;
  m.def("cg_update", &rnf_fast::cg_update,
        "One CG step for N systems, in place on the state tensors; returns alpha (N,).",
        py::arg("x"), py::arg("r"), py::arg("p"), py::arg("rr"), py::arg("bb"),
        py::arg("active"), py::arg("breakdown"), py::arg("steps"), py::arg("alphas"),
        py::arg("betas"), py::arg("Ap"), py::arg("it"), py::arg("tol"));
  m.def("lanczos_logquad", &rnf_fast::lanczos_logquad,
        "SLQ estimate of b^T log(A) b from CG coefficients alphas, betas (N, M), steps, bb (N,).",
        py::arg("alphas"), py::arg("betas"), py::arg("steps"), py::arg("bb"));
  m.def("cholesky_logdet", &rnf_fast::cholesky_logdet,
        "Cholesky of A (N, d, d) with bounded jitter: (L, logdet, jitter, info).", py::arg("A"),
        py::arg("jitter_steps"));
  m.def("cholesky_inverse", &rnf_fast::cholesky_inverse,
        "A^-1 (N, d, d) from lower Cholesky factors L (N, d, d).", py::arg("L"));
}
