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
from rnf_fast.testing import assert_within_2x, cg_agreement, mlp_decoder

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
