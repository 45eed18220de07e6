"""The Triton kernels and the ``"triton"`` backend: interpreted kernels (in a subprocess),
lazy Triton import, dispatch and fallbacks on CPU, and on a CUDA device the compiled kernels
against their references (marked ``cuda``)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnf_fast
from rnf_fast import ops
from rnf_fast.ops import reference
from rnf_fast.ops import triton as triton_backend
from rnf_fast.testing import assert_within_2x, cg_agreement, mlp_decoder, rel_error

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="Triton is not installed (pip install -e '.[test]' pins it on Linux)"
)


@needs_triton
def test_kernels_pass_under_the_interpreter(tmp_path):
    # TRITON_INTERPRET=1 must precede Triton's import: a fresh process runs the directory.
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/kernels_interp",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


TRITON_MODULES = ("linear", "coupling", "gram", "cg")  # the kernel modules that import Triton


def _module_level_imports(tree) -> list[str]:
    """Modules imported outside any function body (what importing the file imports)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
        stack.extend(ast.iter_child_nodes(node))
    return found


def test_only_the_kernel_modules_import_triton_at_import_time():
    for path in [*ROOT.glob("rnf_fast/**/*.py"), *ROOT.glob("kernels/*.py")]:
        if path.parent.name == "kernels" and path.stem in TRITON_MODULES:
            continue
        imported = _module_level_imports(ast.parse(path.read_text()))
        assert not any(n.split(".")[0] == "triton" for n in imported), f"{path} imports triton"


def test_rnf_fast_runs_without_loading_the_kernel_modules():
    # On CPU nothing loads a Triton kernel module (so nothing of ours imports Triton).
    code = (
        "import sys, torch, rnf_fast\n"
        "from rnf_fast import ops\n"
        "from rnf_fast.testing import mlp_decoder\n"
        "X, W, S = torch.randn(2, 3, 4), torch.randn(5, 4), torch.rand(2, 5)\n"
        "ops.scaled_linear(X, W, S)\n"
        "ops.coupling_cotangent(torch.randn(2, 3, 5), torch.rand(2, 5), torch.randn(2, 5, 2))\n"
        "rnf_fast.logdet_grad(mlp_decoder(2, 4), torch.randn(3, 2).double(), method='cg').sum()\n"
        "rnf_fast.backend_report()\n"
        f"loaded = [m for m in {TRITON_MODULES!r} if 'rnf_fast.kernels.' + m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _record_reference_calls(monkeypatch, *names):
    """Wrap the reference ops ``names``: each call is recorded as (name, its result)."""
    calls = []

    def spy(name, original):
        def op(*args, **kwargs):
            out = original(*args, **kwargs)
            calls.append((name, out))
            return out

        return op

    for name in names:
        monkeypatch.setattr(reference, name, spy(name, getattr(reference, name)))
    return calls


def _no_kernel(op):
    raise AssertionError(f"the Triton kernel {op} was launched for CPU tensors")


MATVEC_OPS = ("scaled_linear", "coupling_tangent", "coupling_cotangent")


def _matvec_calls(module):
    """Call every matvec op of ``module`` on small CPU float32 tensors; returns the results."""
    X, W, S = torch.randn(2, 3, 4), torch.randn(5, 4), torch.rand(2, 5)
    dy_dx, dy_dtheta = torch.rand(2, 5), torch.randn(2, 5, 3)
    dx_t, dtheta = torch.randn(2, 3, 5), torch.randn(2, 3, 5, 3)
    return [
        module.scaled_linear(X, W, S),
        module.scaled_linear(dx_t, W, S, transpose=True),
        module.coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta),
        module.coupling_cotangent(dx_t, dy_dx, dy_dtheta),
    ]


@pytest.mark.parametrize("backend", [None, "torch", "cpp", "auto"])
def test_dispatch_on_cpu_routes_to_the_reference(monkeypatch, backend):
    # Spies, not a comparison of the reference with itself: every call must reach the
    # reference, return its very result, and launch no kernel.
    monkeypatch.setattr(triton_backend, "_kernel", _no_kernel)
    calls = _record_reference_calls(monkeypatch, *MATVEC_OPS)
    if backend == "cpp" and "cpp" not in rnf_fast.available_backends("cpu"):
        pytest.skip("the extension rnf_fast._C is not built")
    with contextlib.nullcontext() if backend is None else rnf_fast.use_backend(backend):
        got = _matvec_calls(ops)
    assert [name for name, _ in calls] == ["scaled_linear", "scaled_linear", *MATVEC_OPS[1:]]
    assert all(g is out for g, (_, out) in zip(got, calls))


def test_triton_backend_falls_back_to_the_reference_off_cuda(monkeypatch):
    # The "triton" ops on CPU tensors: no launch, the reference's result (spied), and the CG
    # state advanced by the reference.
    monkeypatch.setattr(triton_backend, "_kernel", _no_kernel)
    calls = _record_reference_calls(monkeypatch, *MATVEC_OPS, "gram", "cg_update")
    got = _matvec_calls(triton_backend)
    J = torch.randn(3, 10, 4)
    got.append(triton_backend.gram(J))
    A, b = _spd_systems(5, 4, torch.float64)
    state = reference.cg_init(b, 4)
    alpha = triton_backend.cg_update(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), 1e-6)
    names = [name for name, _ in calls]
    assert names == ["scaled_linear", "scaled_linear", *MATVEC_OPS[1:], "gram", "cg_update"]
    assert all(g is out for g, (_, out) in zip([*got, alpha], calls))
    assert state.it == 1


def test_kernel_references_match_dense_float64_truth():
    # The references are the spec: check them against the maps they claim, built densely.
    B, K, n_in, n_out, m, P = 2, 3, 4, 5, 6, 3
    X, W, S = (
        torch.randn(B, K, n_in, dtype=torch.float64),
        torch.randn(n_out, n_in, dtype=torch.float64),
        torch.rand(B, n_out, dtype=torch.float64),
    )
    Y = torch.einsum("bki,oi,bo->bko", X, W, S)
    torch.testing.assert_close(reference.scaled_linear(X, W, S), Y)
    C = torch.randn(B, K, n_out, dtype=torch.float64)
    torch.testing.assert_close(
        reference.scaled_linear(C, W, S, transpose=True),
        torch.einsum("bko,oi,bo->bki", C, W, S),
    )
    # ⟨C, scaled_linear(X)⟩ = ⟨scaled_linear(C, transpose), X⟩: the two directions are adjoint.
    lhs = (C * reference.scaled_linear(X, W, S)).sum()
    rhs = (reference.scaled_linear(C, W, S, transpose=True) * X).sum()
    torch.testing.assert_close(lhs, rhs)
    dy_dx, dy_dtheta = (
        torch.rand(B, m, dtype=torch.float64),
        torch.randn(B, m, P, dtype=torch.float64),
    )
    dx_t, dtheta = (
        torch.randn(B, K, m, dtype=torch.float64),
        torch.randn(B, K, m, P, dtype=torch.float64),
    )
    ydot = reference.coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta)
    dy_t = torch.randn(B, K, m, dtype=torch.float64)
    xbar, thbar = reference.coupling_cotangent(dy_t, dy_dx, dy_dtheta)
    torch.testing.assert_close((dy_t * ydot).sum(), (xbar * dx_t).sum() + (thbar * dtheta).sum())


def test_triton_backend_is_registered_for_cuda_only(monkeypatch):
    names = {row[0]: row for row in rnf_fast.backend_report()}
    assert "triton" in names
    assert "triton" not in rnf_fast.available_backends("cpu")
    if not torch.cuda.is_available():
        assert not names["triton"][1]
        reason = names["triton"][2]
        assert ("CUDA" in reason) if HAS_TRITON else ("Triton" in reason), reason
        with pytest.raises(ValueError, match="backend 'triton' is not available"):
            rnf_fast.logdet_grad(
                mlp_decoder(2, 4), torch.randn(3, 2, dtype=torch.float64), backend="triton"
            )
    # Where Triton and a device exist, CUDA tensors get it first (above "cpp"), CPU never.
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)
    assert rnf_fast.available_backends("cuda")[0] == "triton"
    assert "triton" not in rnf_fast.available_backends("cpu")
    with pytest.raises(ValueError, match="does not serve device 'cpu'"):
        rnf_fast.ops.dispatch.get_backend("triton", torch.device("cpu"))


# ---------------------------------------------------------------- call-time speed switches
# RNF_FAST_TRITON_PRECISION, RNF_FAST_TRITON_AUTOTUNE (rnf_fast.kernels.tuning, no Triton
# import) and RNF_FAST_GRAM_CUBLAS_MIN_D (the backend's gram): parsed at each call, off by
# default, never read for CPU tensors.


def test_precision_and_autotune_switches_are_read_at_each_call(monkeypatch):
    from rnf_fast.kernels import tuning

    monkeypatch.delenv(tuning.PRECISION_ENV, raising=False)
    monkeypatch.delenv(tuning.AUTOTUNE_ENV, raising=False)
    assert (tuning.input_precision(), tuning.autotune_enabled()) == ("ieee", False)
    monkeypatch.setenv(tuning.PRECISION_ENV, "tf32x3")
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    assert (tuning.input_precision(), tuning.autotune_enabled()) == ("tf32x3", True)
    assert (tuning.input_precision("ieee"), tuning.autotune_enabled(False)) == ("ieee", False)
    for value in ("", "0"):
        monkeypatch.setenv(tuning.AUTOTUNE_ENV, value)
        assert not tuning.autotune_enabled()
    monkeypatch.setenv(tuning.PRECISION_ENV, "")
    assert tuning.input_precision() == "ieee"
    monkeypatch.setenv(tuning.PRECISION_ENV, "tf32")  # plain TF32 breaks the closeness rule
    with pytest.raises(ValueError, match=r"RNF_FAST_TRITON_PRECISION must be one of ieee, tf32x3"):
        tuning.input_precision()
    with pytest.raises(ValueError, match="precision must be one of"):
        tuning.input_precision("bf16")
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "true")
    with pytest.raises(ValueError, match="RNF_FAST_TRITON_AUTOTUNE must be 0 or 1"):
        tuning.autotune_enabled()


class _RejectedConfig(Exception):
    """What Triton raises for a configuration this chip cannot run (OutOfResources, say)."""


_RejectedConfig.__module__ = "triton.runtime.errors"


def test_tuned_keeps_the_fastest_config_per_key(monkeypatch):
    from rnf_fast.kernels import tuning

    # Fake timings (ms by config), so the choice is known: each config is timed once per key.
    fake = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def seconds(run, device):
        timed.append(run())
        return fake[timed[-1]]

    monkeypatch.setattr(tuning, "_seconds", seconds)
    tuning.clear_tuned()
    try:
        cpu = torch.device("cpu")
        assert tuning.tuned("k1", "abc", lambda c: c, cpu, default="a") == "b"
        assert tuning.tuned("k1", "abc", lambda c: c, cpu, default="a") == "b"
        assert timed == ["a", "b", "c"]  # the second call timed nothing
        fake["c"] = 0.5
        assert tuning.tuned("k2", "abc", lambda c: c, cpu, default="a") == "c"
        assert tuning.tuned_choices() == {"k1": "b", "k2": "c"}

        # A configuration Triton rejects is left out; another error is raised as it is.
        def run(config):
            if config == "c":
                raise _RejectedConfig("out of shared memory")
            return config

        assert tuning.tuned("k3", "abc", run, cpu, default="a") == "b"
        with pytest.raises(_RejectedConfig):
            tuning.tuned("k4", "c", run, cpu, default="c")

        def broken(config):
            raise KeyError(config)

        with pytest.raises(KeyError):
            tuning.tuned("k5", "abc", broken, cpu, default="a")
        assert set(tuning.tuned_choices()) == {"k1", "k2", "k3"}
    finally:
        tuning.clear_tuned()


def test_tuned_times_nothing_off_cuda_but_the_calls_themselves():
    # The real timer off CUDA: one warm-up call, one timed call per configuration.
    from rnf_fast.kernels import tuning

    calls = []
    tuning.clear_tuned()
    try:
        choice = tuning.tuned("k", (1, 2), calls.append, torch.device("cpu"), default=1)
    finally:
        tuning.clear_tuned()
    assert choice in (1, 2) and calls == [1, 1, 2, 2]


def test_gram_uses_cublas_for_float64_from_min_d():
    select = triton_backend.gram_uses_cublas
    f64, f32 = torch.float64, torch.float32
    assert [select(f64, d, "32") for d in (16, 31, 32, 64)] == [False, False, True, True]
    assert select(f64, 1, "0") and not select(f32, 64, "0")  # float32: always the kernel
    assert not select(f64, 64, None) and not select(f64, 64, "")  # unset: never
    for bad in ("-1", "16.5", "yes"):
        with pytest.raises(ValueError, match="RNF_FAST_GRAM_CUBLAS_MIN_D must be a non-negative"):
            select(f64, 64, bad)


def test_triton_gram_routes_float64_to_cublas_from_min_d(monkeypatch):
    # As on a CUDA device with Triton: the launcher spied, the device check passed.
    launched = []

    def kernel(op):
        def launch(J):
            launched.append((J.dtype, J.shape[2]))
            return reference.gram(J)

        return launch

    monkeypatch.setattr(triton_backend, "_kernel", kernel)
    monkeypatch.setattr(triton_backend, "_on_cuda", lambda *tensors: True)
    monkeypatch.setattr(triton_backend, "triton_available", lambda: True)
    monkeypatch.delenv(triton_backend.GRAM_CUBLAS_ENV, raising=False)
    JT = torch.randn(3, 40, 300, dtype=torch.float64)
    J40, J8 = JT[:, :, 5:290].transpose(1, 2), JT[:, :8, 5:290].transpose(1, 2)
    triton_backend.gram(J40)  # unset: the kernel
    monkeypatch.setenv(triton_backend.GRAM_CUBLAS_ENV, "16")
    A = triton_backend.gram(J40)  # d = 40 >= 16: cuBLAS
    triton_backend.gram(J8)  # d = 8 < 16: the kernel
    triton_backend.gram(J40.float())  # float32: the kernel
    assert launched == [(torch.float64, 40), (torch.float64, 8), (torch.float32, 40)]
    assert torch.equal(A, A.transpose(1, 2)), "the cuBLAS Gram must be exactly symmetric"
    assert rel_error(A, reference.gram(J40)) < 1e-14  # one GEMM's rounding (Frobenius)
    monkeypatch.setenv(triton_backend.GRAM_CUBLAS_ENV, "sixteen")
    with pytest.raises(ValueError, match="RNF_FAST_GRAM_CUBLAS_MIN_D"):
        triton_backend.gram(J40)


def test_speed_switches_never_touch_cpu_tensors(monkeypatch):
    # Even set to values a kernel would reject, the switches leave CPU users on the reference.
    monkeypatch.setenv("RNF_FAST_TRITON_PRECISION", "nonsense")
    monkeypatch.setenv("RNF_FAST_TRITON_AUTOTUNE", "nonsense")
    monkeypatch.setenv(triton_backend.GRAM_CUBLAS_ENV, "nonsense")
    monkeypatch.setattr(triton_backend, "_kernel", _no_kernel)
    calls = _record_reference_calls(monkeypatch, "gram", "scaled_linear")
    J = torch.randn(2, 30, 20, dtype=torch.float64)
    got = [triton_backend.gram(J), ops.scaled_linear(torch.randn(2, 3, 4), torch.randn(5, 4))]
    assert [name for name, _ in calls] == ["gram", "scaled_linear"]
    assert all(g is out for g, (_, out) in zip(got, calls))


def _spd_systems(N, d, dtype, device="cpu"):
    G = torch.randn(N, d, d, dtype=torch.float64)
    A = G @ G.transpose(1, 2) / d + 0.5 * torch.eye(d, dtype=torch.float64)
    return A.to(dtype=dtype, device=device), torch.randn(N, d, dtype=dtype, device=device)


# ---------------------------------------------------------------- on a CUDA device
# The closeness rule throughout (rnf_fast.testing): a kernel's error against a float64 truth
# is at most twice that of the PyTorch reference at the kernel's precision.


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("transpose", [False, True])
def test_scaled_linear_on_cuda(transpose):
    dev = "cuda"
    B, K, n_in, n_out = 64, 16, 256, 784
    X = torch.randn(B, K, n_out if transpose else n_in, device=dev)
    W = torch.randn(n_out, n_in, device=dev) / n_in**0.5
    S = torch.rand(B, n_out, device=dev)
    got = triton_backend.scaled_linear(X, W, S, transpose=transpose)
    ref = reference.scaled_linear(X, W, S, transpose=transpose)
    truth = reference.scaled_linear(X.double(), W.double(), S.double(), transpose=transpose)
    assert_within_2x("scaled_linear", got, ref, truth)
    assert triton_backend.triton_failure() is None  # the kernel ran, not the fallback


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("P", [2, 23, 70])
def test_coupling_on_cuda(P):
    dev = "cuda"
    B, K, m = 64, 16, 392
    dy_dx, dy_dtheta = torch.rand(B, m, device=dev), torch.randn(B, m, P, device=dev)
    dx_t, dtheta = torch.randn(B, K, m, device=dev), torch.randn(B, K, m, P, device=dev)
    args = (dx_t, dtheta, dy_dx, dy_dtheta)
    assert_within_2x(
        "coupling_tangent",
        triton_backend.coupling_tangent(*args),
        reference.coupling_tangent(*args),
        reference.coupling_tangent(*(a.double() for a in args)),
    )
    got = triton_backend.coupling_cotangent(dx_t, dy_dx, dy_dtheta)
    ref = reference.coupling_cotangent(dx_t, dy_dx, dy_dtheta)
    truth = reference.coupling_cotangent(dx_t.double(), dy_dx.double(), dy_dtheta.double())
    for g, r, t in zip(got, ref, truth):
        assert_within_2x("coupling_cotangent", g, r, t)
    assert triton_backend.triton_failure() is None


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [16, 70])
def test_gram_on_cuda(dtype, d):
    JT = torch.randn(64, d, 784, device="cuda", dtype=dtype)
    J = JT[:, :, 10:700].transpose(1, 2)
    truth = reference.gram(J.double()) if dtype == torch.float32 else None
    got = triton_backend.gram(J)
    if truth is None:  # float64: compare with the float64 reference within its own rounding
        torch.testing.assert_close(got, reference.gram(J))
    else:
        assert_within_2x("gram", got, reference.gram(J), truth)
    assert triton_backend.triton_failure() is None


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [16, 130])
def test_cg_update_on_cuda_agrees_with_the_reference(dtype, d):
    # float64: the same step per system; float32 (at tol 1e-3): x and the Lanczos value by the
    # closeness rule, step counts free to differ by rounding (cg_agreement states the rule).
    A, b = _spd_systems(2000, d, dtype, "cuda")
    report = cg_agreement(triton_backend.cg_update, A, b)
    print(f"triton cg_update {dtype} d={d}: {report}")
    assert triton_backend.triton_failure() is None


@pytest.mark.cuda
@needs_triton
def test_triton_is_the_default_backend_on_cuda():
    assert rnf_fast.available_backends("cuda")[0] == "triton"


@pytest.mark.cuda
@needs_triton
def test_autotuned_kernels_on_cuda_meet_the_closeness_rule():
    # RNF_FAST_TRITON_AUTOTUNE=1 (as the argument): whichever tiles win, the answer obeys the
    # rule (float64: the reference within rounding).
    from rnf_fast.kernels import gram as gram_kernels
    from rnf_fast.kernels import linear, tuning

    dev = "cuda"
    B, K, n_in, n_out = 64, 16, 256, 784
    X, W = torch.randn(B, K, n_out, device=dev), torch.randn(n_out, n_in, device=dev) / n_in**0.5
    S = torch.rand(B, n_out, device=dev)
    got = linear.scaled_linear(X, W, S, transpose=True, autotune=True)
    ref = reference.scaled_linear(X, W, S, transpose=True)
    truth = reference.scaled_linear(X.double(), W.double(), S.double(), transpose=True)
    assert_within_2x("scaled_linear autotuned", got, ref, truth)
    JT = torch.randn(64, 70, 784, device=dev, dtype=torch.float64)
    J = JT[:, :, 10:700].transpose(1, 2)
    torch.testing.assert_close(gram_kernels.gram(J, autotune=True), reference.gram(J))
    Jf = J.float()
    got = gram_kernels.gram(Jf, autotune=True)
    assert_within_2x("gram autotuned", got, reference.gram(Jf), reference.gram(J))
    print(f"autotuned choices: {tuning.tuned_choices()}")


@pytest.mark.cuda
@needs_triton
def test_float64_gram_on_cublas_on_cuda(monkeypatch):
    monkeypatch.setenv(triton_backend.GRAM_CUBLAS_ENV, "0")
    JT = torch.randn(64, 70, 784, device="cuda", dtype=torch.float64)
    J = JT[:, :, 10:700].transpose(1, 2)
    A = triton_backend.gram(J)
    assert torch.equal(A, A.transpose(1, 2))
    torch.testing.assert_close(A, reference.gram(J))
