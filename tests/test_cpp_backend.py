"""The compiled backend ``"cpp"`` (rnf_fast._C) against the reference ops, on CPU.

float64 results must match the reference to rounding; float32 results must be about as
accurate as the reference's own float32 run, both measured against a float64 truth. The CUDA
tests at the end run the same device code from both of its builds: ``"cpp"`` (nvcc, in
rnf_fast._C) and ``"cupy"`` (NVRTC at run time, rnf_fast.ops.cupy).
"""

import pytest
import torch

import rnf_fast
from rnf_fast.ops import cpp
from rnf_fast.ops import cupy as cupy_backend
from rnf_fast.ops import reference as ref
from rnf_fast.testing import (
    assert_backend_equals_torch,
    cg_agreement,
)

needs_ext = pytest.mark.skipif(cpp._C is None, reason=cpp.unavailable_reason() or "")
DTYPES = [torch.float32, torch.float64]


def _eps(dtype):
    return torch.finfo(dtype).eps


def _assert_close(actual, expected, tol, what, scale=None):
    """Equal NaN patterns, then |actual - expected| <= tol · scale elementwise (scale: the
    natural size of the quantity, by default max|expected|)."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN patterns differ"
    a, e = actual[~nan].double(), expected[~nan].double()
    if e.numel():
        err = float((a - e).abs().max())
        scale = float(e.abs().max()) if scale is None else scale
        assert err <= tol * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _assert_as_accurate(kernel, reference32, truth, what, slack=4.0):
    """A float32 kernel's error against the float64 truth is within 2x the float32 reference's
    (plus ``slack`` eps of the truth's scale, for results the reference happens to get exact)."""
    scale = float(truth.abs().max())
    err_k = float((kernel.double() - truth).abs().max())
    err_r = float((reference32.double() - truth).abs().max())
    assert err_k <= 2 * err_r + slack * _eps(torch.float32) * scale, (
        f"{what}: kernel error {err_k:.3e} vs reference error {err_r:.3e} (scale {scale:.3e})"
    )


def _spd(N, d, dtype, *, cond=100.0, seed=0):
    """N random SPD matrices with condition numbers spread up to ``cond``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, d, d, generator=g, dtype=torch.float64))
    expo = torch.rand(N, 1, generator=g, dtype=torch.float64) * torch.linspace(0, 1, d).double()
    eig = cond**expo
    return (Q @ torch.diag_embed(eig) @ Q.mT).to(dtype)


def _record_reference_calls(monkeypatch, *names):
    """Wrap the reference ops ``names``; returns the list of the names called, in order."""
    calls = []

    def spy(name, original):
        def op(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return op

    for name in names:
        monkeypatch.setattr(ref, name, spy(name, getattr(ref, name)))
    return calls


# --- registry and fallback ---------------------------------------------------------------


@needs_ext
def test_cpp_is_the_default_on_cpu():
    assert rnf_fast.available_backends("cpu")[0] == "cpp"
    assert ("cpp", True, "devices: cpu, cuda") in rnf_fast.backend_report()


@pytest.mark.parametrize("built", [False, True])
def test_without_the_extension_the_listing_says_why_and_ops_fall_back(monkeypatch, built):
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", "undefined symbol: _ZN3c10")
    monkeypatch.setattr(cpp.importlib.util, "find_spec", lambda name: object() if built else None)
    row = next(r for r in rnf_fast.backend_report() if r[0] == "cpp")
    assert row[1] is False
    if built:
        assert "does not import (undefined symbol: _ZN3c10)" in row[2]
    else:
        assert "rnf_fast._C is not built" in row[2] and "RNF_FAST_NO_EXTENSION=1" in row[2]
    assert "cpp" not in rnf_fast.available_backends("cpu")
    A = _spd(4, 3, torch.float64)
    for got, want in zip(cpp.cholesky_logdet(A), ref.cholesky_logdet(A)):
        assert torch.equal(got, want)


# --- cg_update ---------------------------------------------------------------------------


def _assert_states_match(got, want, tol, it):
    # Residuals scale with b, β = rr_new / rr with 1 (it is rounding noise once r ≈ 0).
    b_norm = float(want.bb.max().sqrt())
    scales = {"r": b_norm, "p": b_norm, "rr": b_norm**2, "betas": 1.0}
    for name in ("x", "r", "p", "rr", "alphas", "betas"):
        scale = scales.get(name, float(getattr(want, name).abs().max()))
        _assert_close(getattr(got, name), getattr(want, name), tol, f"step {it}: {name}", scale)
    for name in ("active", "breakdown", "steps"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"step {it}: {name}"
    assert got.it == want.it


def _cg_systems(d, dtype):
    """Systems that stop at different iterations: multiples of I (one step), SPD of growing
    condition, a zero right-hand side (never active) and an indefinite matrix (breakdown)."""
    A = torch.cat(
        [
            3.0 * torch.eye(d, dtype=torch.float64).expand(2, d, d),
            _spd(7, d, torch.float64, cond=1e3, seed=d),
            -torch.eye(d, dtype=torch.float64)[None],
            _spd(1, d, torch.float64, seed=d + 1),
        ]
    ).to(dtype)
    b = torch.randn(len(A), d, dtype=dtype)
    b[-1] = 0
    return A, b


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 64, 65])
def test_cg_update_matches_reference_step_by_step(dtype, d):
    A, b = _cg_systems(d, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    max_iter = min(d + 3, 30)
    state = ref.cg_init(b, max_iter)
    for it in range(max_iter):
        Ap = (A @ state.p.unsqueeze(-1)).squeeze(-1)
        expected = state.clone()
        alpha_ref = ref.cg_update(expected, Ap, tol)
        alpha = cpp.cg_update(state, Ap, tol)
        _assert_close(alpha, alpha_ref, 50 * _eps(dtype), f"step {it}: alpha")
        _assert_states_match(state, expected, 50 * _eps(dtype) * d, it)
    assert bool(state.breakdown[-2]) and not bool(state.breakdown[:-2].any())
    assert state.steps[:2].tolist() == [1, 1] and int(state.steps[-1]) == 0
    if d > 1:
        assert len(set(state.steps.tolist())) > 2  # systems stopped at different iterations


@needs_ext
def test_cg_update_nan_curvature_is_a_breakdown():
    A, b = _cg_systems(5, torch.float64)
    state = ref.cg_init(b, 4)
    Ap = (A @ state.p.unsqueeze(-1)).squeeze(-1)
    Ap[3, 2] = float("nan")
    expected = state.clone()
    ref.cg_update(expected, Ap, 1e-8)
    cpp.cg_update(state, Ap, 1e-8)
    _assert_states_match(state, expected, 1e-14, 0)
    assert bool(state.breakdown[3]) and float(state.alphas[3, 0]) == 0.0


@needs_ext
def test_cg_update_falls_back_for_a_non_contiguous_state():
    A, b = _cg_systems(4, torch.float64)
    state = ref.cg_init(b, 3)
    state.x = torch.zeros(4, len(b), dtype=torch.float64).T  # a transposed view
    expected = state.clone()
    Ap = (A @ state.p.unsqueeze(-1)).squeeze(-1)
    ref.cg_update(expected, Ap, 1e-8)
    cpp.cg_update(state, Ap, 1e-8)
    _assert_states_match(state, expected, 0.0, 0)


# --- lanczos_logquad ---------------------------------------------------------------------


def _lanczos_coefficients(N, d, M, dtype, seed):
    """CG coefficients of N SPD systems of size d, run for at most M steps at tolerance 1e-6
    in float64 (so steps vary per system), cast to dtype."""
    A = _spd(N, d, torch.float64, cond=1e4, seed=seed)
    b = torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    state = ref.cg_init(b, M)
    for _ in range(M):
        ref.cg_update(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), 1e-6)
    return state.alphas.to(dtype), state.betas.to(dtype), state.steps, state.bb.to(dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 5, 23, 64])
def test_lanczos_logquad_matches_reference(dtype, d):
    a, b, steps, bb = _lanczos_coefficients(37, d, d, dtype, seed=d)
    steps[0] = 0  # no step: the estimate is 0
    got = cpp.lanczos_logquad(a, b, steps, bb)
    assert float(got[0]) == 0.0
    truth = ref.lanczos_logquad(a.double(), b.double(), steps, bb.double())
    if dtype == torch.float64:
        _assert_close(got, truth, 1e-12, "logquad")
    else:
        _assert_as_accurate(got, ref.lanczos_logquad(a, b, steps, bb), truth, "logquad")
    if d > 1:
        assert len(set(steps.tolist())) > 2


@needs_ext
def test_lanczos_logquad_full_krylov_space_gives_the_exact_quadratic_form():
    A = _spd(9, 6, torch.float64, cond=50.0, seed=3)
    b = torch.randn(9, 6, dtype=torch.float64)
    state = ref.cg_init(b, 6)
    for _ in range(6):
        ref.cg_update(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), 0.0)
    L, Q = torch.linalg.eigh(A)
    exact = ((Q.mT @ b.unsqueeze(-1)).squeeze(-1) ** 2 * L.log()).sum(-1)
    got = cpp.lanczos_logquad(state.alphas, state.betas, state.steps, state.bb)
    _assert_close(got, exact, 1e-10, "b^T log(A) b")


@needs_ext
def test_lanczos_logquad_nan_semantics():
    a, b, steps, bb = _lanczos_coefficients(6, 8, 8, torch.float64, seed=1)
    steps[:] = 5
    a[0, 1] = -a[0, 1]  # T gets a negative eigenvalue: NaN, as in the reference
    a[1, 6] = float("nan")  # past `steps`: ignored
    b[2, 7] = float("nan")
    a[3, 2] = float("nan")  # inside: NaN (the reference's eigh may raise here)
    got = cpp.lanczos_logquad(a, b, steps, bb)
    want = ref.lanczos_logquad(a[:3], b[:3], steps[:3], bb[:3])
    _assert_close(got[:3], want, 1e-12, "logquad")
    assert torch.isnan(got[0]) and torch.isfinite(got[1:3]).all()
    assert torch.isnan(got[3]) and torch.isfinite(got[4:]).all()


@needs_ext
@pytest.mark.parametrize("M, compiled", [(64, True), (65, False)])
def test_lanczos_logquad_kernel_limit(monkeypatch, M, compiled):
    a, b, steps, bb = _lanczos_coefficients(5, M, M, torch.float64, seed=M)
    want = ref.lanczos_logquad(a, b, steps, bb)
    calls = _record_reference_calls(monkeypatch, "lanczos_logquad")
    _assert_close(cpp.lanczos_logquad(a, b, steps, bb), want, 1e-12, "logquad")
    assert calls == ([] if compiled else ["lanczos_logquad"])


# --- cholesky_logdet and cholesky_inverse ------------------------------------------------


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 16, 33, 64])
def test_cholesky_logdet_matches_reference(dtype, d):
    A = _spd(13, d, dtype, cond=1e3, seed=d)
    L, logdet, jitter, info = cpp.cholesky_logdet(A)
    assert L.dtype == dtype and info.dtype == torch.int32
    assert not bool(info.any()) and not bool(jitter.any())
    assert torch.equal(L, L.tril())
    L64, logdet64, _, _ = ref.cholesky_logdet(A.double())
    if dtype == torch.float64:
        _assert_close(L, L64, 1e-12, "L")
        _assert_close(logdet, logdet64, 1e-12, "logdet")
    else:
        L32, logdet32, _, _ = ref.cholesky_logdet(A)
        _assert_as_accurate(L, L32, L64, "L")
        _assert_as_accurate(logdet, logdet32, logdet64, "logdet")


@needs_ext
def test_cholesky_logdet_reads_the_lower_triangle_and_keeps_batch_dims():
    A = _spd(6, 5, torch.float64).view(2, 3, 5, 5)
    upper_garbage = A + torch.triu(torch.full_like(A, 7.0), 1)
    got = cpp.cholesky_logdet(upper_garbage)
    want = ref.cholesky_logdet(A)
    assert [t.shape for t in got] == [t.shape for t in want]
    _assert_close(got[0], want[0], 1e-13, "L")
    _assert_close(got[1], want[1], 1e-13, "logdet")


def _failing_matrices(d=6):
    """Matrices whose factorisation fails at a known column, with or without jitter."""
    eye = torch.eye(d, dtype=torch.float64)
    J = torch.randn(2 * d, d, dtype=torch.float64)
    J[:, 2] = 0  # exactly zero pivot at column 3: jitter rescues it
    indefinite = eye.clone()
    indefinite[4, 4] = -1.0  # fails at column 5, beyond any jitter
    nan_low = eye.clone()
    nan_low[1, 0] = float("nan")  # NaN reaches the pivot of column 2
    nan_diag = eye.clone()
    nan_diag[2, 2] = float("nan")  # NaN trace: every jitter is NaN, fails at column 1
    return torch.stack([eye, J.T @ J, -eye, indefinite, nan_low, nan_diag])


@needs_ext
@pytest.mark.parametrize("jitter_steps", [ref.JITTER_STEPS, ()])
def test_cholesky_logdet_info_codes_and_jitter_match_reference(jitter_steps):
    A = _failing_matrices()
    L, logdet, jitter, info = cpp.cholesky_logdet(A, jitter_steps=jitter_steps)
    L_ref, logdet_ref, jitter_ref, info_ref = ref.cholesky_logdet(A, jitter_steps=jitter_steps)
    assert info.tolist() == info_ref.tolist()
    expected_info = [0, 0, 1, 5, 2, 1] if jitter_steps else [0, 3, 1, 5, 2, 3]
    assert info.tolist() == expected_info
    _assert_close(jitter, jitter_ref, 1e-15, "jitter")
    _assert_close(logdet, logdet_ref, 1e-13, "logdet")
    ok = info == 0
    _assert_close(L[ok], L_ref[ok], 1e-13, "L")
    assert bool((jitter[1] > 0) == bool(jitter_steps))


@needs_ext
def test_cholesky_logdet_more_jitter_steps_than_the_kernel_takes_fall_back(monkeypatch):
    A = _failing_matrices()
    steps = tuple(10.0**k for k in range(1, cpp._C.MAX_JITTER_STEPS + 2))
    calls = _record_reference_calls(monkeypatch, "cholesky_logdet")
    got = cpp.cholesky_logdet(A, jitter_steps=steps)
    assert calls == ["cholesky_logdet"]
    assert got[3].tolist() == [0, 0, 1, 5, 2, 1]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 5, 16, 31, 64])
def test_cholesky_inverse_matches_reference(dtype, d):
    A = _spd(9, d, torch.float64, cond=1e3, seed=d)
    L64 = torch.linalg.cholesky(A)
    L = L64.to(dtype) + torch.triu(torch.ones_like(L64, dtype=dtype), 1)  # upper: not read
    got = cpp.cholesky_inverse(L)
    assert torch.equal(got, got.mT)
    truth = ref.cholesky_inverse(L64)
    if dtype == torch.float64:
        _assert_close(got, truth, 1e-12 * 1e3, "inverse")  # tolerance follows cond(A)
    else:
        _assert_as_accurate(got, ref.cholesky_inverse(L64.to(dtype)), truth, "inverse")


@needs_ext
@pytest.mark.parametrize("d, compiled", [(64, True), (65, False)])
def test_cholesky_kernel_limit(monkeypatch, d, compiled):
    A = _spd(3, d, torch.float64, seed=d)
    L_ref, logdet_ref, _, _ = ref.cholesky_logdet(A)
    inv_ref = ref.cholesky_inverse(L_ref)
    calls = _record_reference_calls(monkeypatch, "cholesky_logdet", "cholesky_inverse")
    L, logdet, _, _ = cpp.cholesky_logdet(A)
    _assert_close(logdet, logdet_ref, 1e-12, "logdet")
    _assert_close(cpp.cholesky_inverse(L), inv_ref, 1e-10, "inverse")
    assert calls == ([] if compiled else ["cholesky_logdet", "cholesky_inverse"])


# --- end to end --------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_logdet_grad_cpp_equals_torch(method):
    assert_backend_equals_torch("cpp", method)


# --- input validation (the binding names the argument) -----------------------------------


@needs_ext
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.zeros(3, 4, dtype=torch.float64), ValueError, r"A must be \(N, d, d\)"),
        (lambda: torch.zeros(2, 3, 3, dtype=torch.int64), TypeError, "A must be torch.float32"),
        (lambda: torch.zeros(2, 3, 3, dtype=torch.float64).mT, ValueError, "A must be contig"),
        (lambda: torch.zeros(2, 65, 65, dtype=torch.float64), ValueError, "must be <= 64"),
        (lambda: torch.zeros(2, 3, 3, device="meta"), ValueError, "A must be a CPU"),
    ],
)
def test_cholesky_logdet_validates_A(make, error, match):
    with pytest.raises(error, match=match):
        cpp._C.cholesky_logdet(make(), [])


@needs_ext
def test_cholesky_validates_jitter_steps_and_L():
    A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    with pytest.raises(ValueError, match="jitter_steps must have at most"):
        cpp._C.cholesky_logdet(A, [1.0] * (cpp._C.MAX_JITTER_STEPS + 1))
    with pytest.raises(ValueError, match=r"L must be \(N, d, d\)"):
        cpp._C.cholesky_inverse(A[0])


@needs_ext
def test_lanczos_logquad_validates_its_arguments():
    a = torch.ones(4, 3, dtype=torch.float64)
    steps = torch.full((4,), 3)
    with pytest.raises(TypeError, match="betas must be torch.float64, got torch.float32"):
        cpp._C.lanczos_logquad(a, a.float(), steps, a[:, 0].contiguous())
    with pytest.raises(ValueError, match=r"bb must be \(N,\) = \[4\], got \[4, 1\]"):
        cpp._C.lanczos_logquad(a, a, steps, a[:, :1].contiguous())
    with pytest.raises(TypeError, match="steps must be torch.int64, got torch.int32"):
        cpp._C.lanczos_logquad(a, a, steps.int(), a[:, 0].contiguous())


@needs_ext
def test_cg_update_validates_its_arguments():
    A, b = _cg_systems(4, torch.float64)
    state = ref.cg_init(b, 2)
    with pytest.raises(ValueError, match=r"Ap must be \(N, d\) = \[11, 4\], got \[11, 5\]"):
        cpp.cg_update(state, torch.zeros(11, 5, dtype=torch.float64), 1e-6)
    fields = [state.x, state.r, state.p, state.rr, state.bb, state.active, state.breakdown]
    Ap = torch.zeros_like(b)
    with pytest.raises(TypeError, match="steps must be torch.int64, got torch.int32"):
        cpp._C.cg_update(*fields, state.steps.int(), state.alphas, state.betas, Ap, 0, 1e-6)
    with pytest.raises(ValueError, match=r"it must be in \[0, max_iter\)"):
        cpp._C.cg_update(*fields, state.steps, state.alphas, state.betas, Ap, 2, 1e-6)


# --- CUDA (runs where a GPU and a CUDA build of the extension exist) ---------------------
# float64: the CUDA kernels match the CPU kernels to rounding, with identical discrete outcomes;
# float32: each result is within 2x the error of the PyTorch reference run on the same float32
# input, both against the float64 truth (rnf_fast.testing states the rule).


def _toolchain_for_cuda() -> str | None:
    """Why a CUDA build of the extension is not expected here, or None when it is."""
    if torch.version.cuda is None:
        return "torch has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    return "no CUDA toolchain (CUDA_HOME)" if CUDA_HOME is None else None


@pytest.mark.cuda
@pytest.mark.skipif(_toolchain_for_cuda() is not None, reason=str(_toolchain_for_cuda()))
def test_the_extension_is_built_with_cuda_where_torch_and_nvcc_have_it():
    # A failed CUDA build is optional at install time (pip still installs the package), so
    # this is where it must show: the GPU run would otherwise measure the PyTorch fallback.
    assert cpp._C is not None, cpp.unavailable_reason()
    assert cpp._C.WITH_CUDA, (
        "rnf_fast._C was built without CUDA although torch has CUDA and nvcc is present: "
        "rebuild with RNF_FAST_REQUIRE_EXTENSION=1 pip install --no-build-isolation -e . "
        "to see why"
    )


needs_cuda_ext = pytest.mark.skipif(
    cpp._C is None or not cpp._C.WITH_CUDA, reason="needs rnf_fast._C built with CUDA"
)
# The backends whose ops run the CUDA kernels of csrc/cuda.
CUDA_BACKENDS = [
    pytest.param("cpp", marks=needs_cuda_ext),
    pytest.param(
        "cupy",
        marks=pytest.mark.skipif(
            cupy_backend.unavailable_reason() is not None,
            reason=str(cupy_backend.unavailable_reason()),
        ),
    ),
]


@pytest.fixture
def cuda_ops(request, monkeypatch):
    """The module of the backend under test (parametrized indirectly); for ``"cupy"``, checks
    afterwards that its kernels ran (not the reference after a failed build)."""
    if request.param == "cpp":
        yield cpp
        return
    launched = set()
    launch = cupy_backend._launch

    def spy(kernel, *args):
        launched.add(kernel.name)
        launch(kernel, *args)

    monkeypatch.setattr(cupy_backend, "_launch", spy)
    yield cupy_backend
    assert cupy_backend.cupy_failure() is None, cupy_backend.cupy_failure()
    ops = ("cg_update", "cholesky_logdet", "cholesky_inverse", "lanczos_logquad")
    assert {name.rsplit("_", 1)[0].removeprefix("rnf_") for name in launched} == set(ops)


def _check_on_cuda(what, op, *inputs):
    """Run ``op`` on CUDA copies of the CPU ``inputs`` and apply the rule of this section."""
    got = op(*(t.cuda() for t in inputs))
    got = tuple(t.cpu() for t in (got if isinstance(got, tuple) else (got,)))
    dtype = inputs[0].dtype
    if dtype == torch.float64:
        want = op(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        for i, (g, w) in enumerate(zip(got, want)):
            if w.is_floating_point():
                _assert_close(g, w, 1e-10, f"{what}[{i}]")
            else:
                assert torch.equal(g, w), f"{what}[{i}]"
        return got
    reference_op = getattr(ref, op.__name__)
    run32 = reference_op(*(t.cuda() for t in inputs))
    truth = reference_op(*(t.double() if t.is_floating_point() else t for t in inputs))
    run32, truth = ((t if isinstance(t, tuple) else (t,)) for t in (run32, truth))
    for i, (g, r, t) in enumerate(zip(got, run32, truth)):
        if t.is_floating_point():
            ok = ~torch.isnan(t)
            _assert_as_accurate(g[ok], r.cpu()[ok], t[ok], f"{what}[{i}]")
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_ops", CUDA_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [5, 64])
def test_cuda_kernels_match_the_reference(cuda_ops, dtype, d):
    # Failing factorisations: the info codes say where each fails, on either device.
    failing = _failing_matrices().to(dtype)
    assert torch.equal(
        cuda_ops.cholesky_logdet(failing.cuda())[3].cpu(), ref.cholesky_logdet(failing)[3]
    )
    A = _spd(33, d, torch.float64, cond=1e3, seed=d).to(dtype)
    L, _, _, info = _check_on_cuda("cholesky_logdet", cuda_ops.cholesky_logdet, A)
    assert not bool(info.any())
    _check_on_cuda("cholesky_inverse", cuda_ops.cholesky_inverse, ref.cholesky_logdet(A)[0])
    coefficients = _lanczos_coefficients(33, d, d, dtype, seed=d)
    _check_on_cuda("lanczos_logquad", cuda_ops.lanczos_logquad, *coefficients)
    G = torch.randn(2000, d, d, dtype=torch.float64)
    A = (G @ G.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)).to(dtype)
    report = cg_agreement(cuda_ops.cg_update, A.cuda(), torch.randn(2000, d, dtype=dtype).cuda())
    print(f"{cuda_ops.__name__} cg_update on CUDA {dtype} d={d}: {report}")
