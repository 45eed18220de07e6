"""Fallbacks that never strand a user: the switches RNF_FAST_NO_TRITON and
RNF_FAST_NO_CUDA_EXT, a Triton that fails to compile or build its launcher (one warning, the
reference's result, Triton off for the process), CUDA faults raised as they are, the backend of
a call deciding whether the Triton matvec kernels run, and the per-op fallback of a backend to
its base and the reference.

There is no GPU here: the Triton launchers are replaced by spies (``triton_backend._kernel``),
and CPU tensors stand in for CUDA ones where the test is about what happens after the device
check (``triton_backend._on_cuda`` patched), or FakeTensor CUDA tensors where the device check
itself is under test.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rnf_fast
from rnf_fast import cli, ops
from rnf_fast.ops import cpp as cpp_backend
from rnf_fast.ops import dispatch as backends
from rnf_fast.ops import reference
from rnf_fast.ops import triton as triton_backend
from rnf_fast.testing import mlp_decoder


class CompilationError(Exception):
    """Stands for triton.compiler.errors.CompilationError (recognised by its module)."""

    __module__ = "triton.compiler.errors"


BUILD_FAILURES = {
    "compile": CompilationError("at 12:8: unsupported tensor index"),
    "compiler exits": subprocess.CalledProcessError(
        1, ["gcc", "main.c", "-I/usr/include/python3.11", "-o", "launcher.so"]
    ),
    "no compiler": FileNotFoundError(2, "No such file or directory", "gcc"),
    "no Python.h": RuntimeError("Failed to find C compiler. Please specify via CC."),
}
CUDA_FAULTS = {
    "cuda error": RuntimeError("CUDA error: an illegal memory access was encountered"),
    "launcher error": RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
}
if hasattr(torch, "AcceleratorError"):
    CUDA_FAULTS["AcceleratorError"] = torch.AcceleratorError("CUDA error: misaligned address")


class Spy:
    """A fake ``triton_backend._kernel``: records each launch by op name, then raises ``error``
    or returns what the op's reference returns."""

    REFERENCES = {
        "scaled_linear": reference.scaled_linear,
        "coupling_tangent": reference.coupling_tangent,
        "coupling_cotangent": reference.coupling_cotangent,
        "gram": reference.gram,
        "cg_update": reference.cg_update,
    }

    def __init__(self, error: BaseException | None = None):
        self.error = error
        self.calls: list[str] = []

    def __call__(self, op: str):
        def launch(*args, **kwargs):
            self.calls.append(op)
            if self.error is not None:
                raise self.error
            return self.REFERENCES[op](*args, **kwargs)

        return launch


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """No switch set, no failure recorded, Triton 'installed', default thread setting."""
    monkeypatch.delenv(triton_backend.NO_TRITON_ENV, raising=False)
    monkeypatch.delenv(cpp_backend.NO_CUDA_EXT_ENV, raising=False)
    monkeypatch.setattr(triton_backend, "_failure", None)
    monkeypatch.setattr(triton_backend, "_triton_installed", lambda: True)
    monkeypatch.setattr(backends, "_local", threading.local())


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """CPU tensors pass the Triton ops' device check (their dtype and graph checks are kept)."""
    monkeypatch.setattr(
        triton_backend, "_on_cuda", lambda *ts: all(t.device.type == "cpu" for t in ts)
    )


def _spy(monkeypatch, error=None) -> Spy:
    spy = Spy(error)
    monkeypatch.setattr(triton_backend, "_kernel", spy)
    return spy


def _linear_args():
    g = torch.Generator().manual_seed(1)
    C = torch.randn(2, 3, 5, generator=g)  # cotangents: transpose=True
    W, S = torch.randn(5, 4, generator=g), torch.rand(2, 5, generator=g)
    return C, W, S


def _triton_row():
    return {row[0]: row for row in rnf_fast.backend_report()}["triton"]


# ------------------------------------------------------------------ switches


def test_no_triton_switch_is_read_at_call_time(monkeypatch, cpu_as_cuda):
    spy = _spy(monkeypatch)
    C, W, S = _linear_args()
    triton_backend.scaled_linear(C, W, S, transpose=True)
    assert spy.calls == ["scaled_linear"]  # the spy is reached without the switch
    monkeypatch.setenv("RNF_FAST_NO_TRITON", "1")  # after every import
    got = triton_backend.scaled_linear(C, W, S, transpose=True)
    triton_backend.coupling_cotangent(C, torch.rand(2, 5), torch.randn(2, 5, 2))
    triton_backend.gram(torch.randn(2, 6, 3))
    assert spy.calls == ["scaled_linear"]  # nothing more launched under the switch
    assert torch.equal(got, reference.scaled_linear(C, W, S, transpose=True))
    assert not triton_backend.triton_available()
    assert triton_backend.triton_unavailable_reason() == "disabled by RNF_FAST_NO_TRITON=1"
    assert _triton_row()[1:] == (False, "disabled by RNF_FAST_NO_TRITON=1")
    monkeypatch.setenv("RNF_FAST_NO_TRITON", "0")
    triton_backend.scaled_linear(C, W, S, transpose=True)
    assert spy.calls == ["scaled_linear"] * 2  # back on once the switch is cleared


def test_no_triton_switch_makes_the_backend_unavailable_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert triton_backend.unavailable_reason() is None
    # The default on CUDA: triton, unless the cupy backend (above it) runs here, which it does
    # only with CuPy installed and an rnf_fast._C without CUDA kernels.
    from rnf_fast.ops import cupy as cupy_backend

    runs = cupy_backend.unavailable_reason() is None and cupy_backend.disabled_reason() is None
    expected = ["cupy", "triton"] if runs else ["triton"]
    assert rnf_fast.available_backends("cuda")[: len(expected)] == expected
    monkeypatch.setenv("RNF_FAST_NO_TRITON", "1")
    assert "triton" not in rnf_fast.available_backends("cuda")
    with pytest.raises(ValueError, match="disabled by RNF_FAST_NO_TRITON=1"):
        backends.get_backend("triton", torch.device("cuda"))


class _FakeExtension:
    """A stand-in for rnf_fast._C built with CUDA: cholesky_inverse records its calls."""

    WITH_CUDA = True
    MAX_DIM = 64
    MAX_JITTER_STEPS = 8

    def __init__(self):
        self.calls = 0

    def cholesky_inverse(self, L):
        self.calls += 1
        return torch.empty_like(L)


def test_no_cuda_ext_switch_sends_cuda_tensors_to_the_reference(monkeypatch):
    ext = _FakeExtension()
    monkeypatch.setattr(cpp_backend, "_C", ext)
    with FakeTensorMode():  # CUDA tensors without a GPU: the real device check runs
        L = torch.randn(3, 4, 4, device="cuda", dtype=torch.float64)
        cpp_backend.cholesky_inverse(L)
        assert ext.calls == 1  # CUDA tensors reach the extension's kernels
        monkeypatch.setenv("RNF_FAST_NO_CUDA_EXT", "1")  # read at call time
        out = cpp_backend.cholesky_inverse(L)
        assert ext.calls == 1 and out.shape == (3, 4, 4)  # the reference ran instead
    cpp_backend.cholesky_inverse(torch.eye(4, dtype=torch.float64).repeat(3, 1, 1))
    assert ext.calls == 2  # CPU tensors still reach the compiled kernels
    assert cpp_backend.cuda_unavailable_reason() == "disabled by RNF_FAST_NO_CUDA_EXT=1"
    monkeypatch.delenv("RNF_FAST_NO_CUDA_EXT")
    assert cpp_backend.cuda_unavailable_reason() is None


def test_cuda_ext_reason_names_a_build_without_cuda(monkeypatch):
    monkeypatch.setattr(cpp_backend, "_C", SimpleNamespace(WITH_CUDA=False))
    assert "built without CUDA" in cpp_backend.cuda_unavailable_reason()
    monkeypatch.setattr(cpp_backend, "_C", None)
    assert cpp_backend.cuda_unavailable_reason() == cpp_backend.unavailable_reason()


# ------------------------------------------------------------------ Triton failures


def _three_calls(C, W, S):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [triton_backend.scaled_linear(C, W, S, transpose=True) for _ in range(3)]
    return outs, [w for w in caught if issubclass(w.category, triton_backend.TritonFallbackWarning)]


@pytest.mark.parametrize("name", list(BUILD_FAILURES))
def test_build_failure_falls_back_once_and_switches_triton_off(monkeypatch, cpu_as_cuda, name):
    error = BUILD_FAILURES[name]
    spy = _spy(monkeypatch, error)
    C, W, S = _linear_args()
    outs, warned = _three_calls(C, W, S)
    want = reference.scaled_linear(C, W, S, transpose=True)
    assert all(torch.equal(out, want) for out in outs)  # the fallback got every argument
    assert spy.calls == ["scaled_linear"]  # tried once, then off for the process
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    assert type(error).__name__ in message and "RNF_FAST_NO_TRITON=1" in message, message
    assert triton_backend.triton_failure().startswith(f"scaled_linear: {type(error).__name__}: ")
    assert "after a failure in scaled_linear" in triton_backend.triton_unavailable_reason()
    triton_backend.coupling_tangent(
        torch.randn(2, 3, 4), torch.randn(2, 3, 4, 2), torch.rand(2, 4), torch.randn(2, 4, 2)
    )
    assert spy.calls == ["scaled_linear"]  # the other kernels are off too


def test_import_error_of_triton_falls_back(monkeypatch, cpu_as_cuda):
    # The real launcher lookup: importing the kernel module imports Triton, which fails.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "rnf_fast.kernels.linear", raising=False)
    C, W, S = _linear_args()
    outs, warned = _three_calls(C, W, S)
    assert all(torch.equal(o, reference.scaled_linear(C, W, S, transpose=True)) for o in outs)
    assert len(warned) == 1 and "ModuleNotFoundError" in str(warned[0].message)
    assert triton_backend.triton_failure().startswith("scaled_linear: ModuleNotFoundError")


@pytest.mark.parametrize("name", list(CUDA_FAULTS))
def test_cuda_fault_is_raised_not_hidden(monkeypatch, cpu_as_cuda, name):
    error = CUDA_FAULTS[name]
    spy = _spy(monkeypatch, error)
    C, W, S = _linear_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_backend.TritonFallbackWarning)
        for attempt in (1, 2):
            with pytest.raises(type(error)) as raised:
                triton_backend.scaled_linear(C, W, S, transpose=True)
            assert raised.value is error
            assert len(spy.calls) == attempt  # not switched off: nothing was recovered
    assert triton_backend.triton_failure() is None


@pytest.mark.parametrize(
    "error",
    [ValueError("X must be (B, K, n)"), torch.OutOfMemoryError("CUDA out of memory.")],
    ids=["bad argument", "out of memory"],
)
def test_errors_that_are_not_build_failures_are_raised(monkeypatch, cpu_as_cuda, error):
    _spy(monkeypatch, error)
    with pytest.raises(type(error)):
        triton_backend.scaled_linear(*_linear_args(), transpose=True)
    assert triton_backend.triton_failure() is None and triton_backend.triton_available()


def test_triton_backend_gram_falls_back_and_the_backend_stays_usable_by_name(
    monkeypatch, cpu_as_cuda
):
    spy = _spy(monkeypatch, BUILD_FAILURES["compiler exits"])
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)  # as on a GPU box
    assert rnf_fast.available_backends("cuda")[0] == "triton"
    J = torch.randn(3, 7, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = triton_backend.gram(J), triton_backend.gram(J)
    assert torch.equal(first, reference.gram(J)) and torch.equal(second, reference.gram(J))
    assert spy.calls == ["gram"]
    assert [w.category for w in caught] == [triton_backend.TritonFallbackWarning]
    # "auto" skips it from now on, the report says why, and naming it still works.
    assert "triton" not in rnf_fast.available_backends("cuda")
    available, detail = _triton_row()[1:]
    assert not available and "after a failure in gram: CalledProcessError" in detail, detail
    assert backends.get_backend("triton", torch.device("cuda"))[0] == "triton"


def test_triton_backend_cg_update_falls_back_from_an_untouched_state(monkeypatch, cpu_as_cuda):
    spy = _spy(monkeypatch, CompilationError("at 3:4: bad block size"))
    g = torch.Generator().manual_seed(2)
    G = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    A = G @ G.mT + torch.eye(4, dtype=torch.float64)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ours, ref = reference.cg_init(b, 4), reference.cg_init(b, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            a1 = triton_backend.cg_update(ours, (A @ ours.p.unsqueeze(-1)).squeeze(-1), 1e-8)
            a2 = reference.cg_update(ref, (A @ ref.p.unsqueeze(-1)).squeeze(-1), 1e-8)
            assert torch.equal(a1, a2)
    assert spy.calls == ["cg_update"] and len(caught) == 1
    assert ours.it == ref.it == 3
    assert torch.equal(ours.x, ref.x) and torch.equal(ours.alphas, ref.alphas)


def test_a_failing_step_leaves_the_state_for_the_reference(monkeypatch, cpu_as_cuda):
    # The real cg launcher checks and compiles before writing; a spy that fails the same way
    # must leave the state bit for bit as it was (the fallback starts from it).
    spy = _spy(monkeypatch, BUILD_FAILURES["no compiler"])
    b = torch.randn(4, 3, dtype=torch.float64)
    state = reference.cg_init(b, 3)
    before = state.clone()
    Ap = 2.0 * state.p
    with pytest.warns(triton_backend.TritonFallbackWarning, match="FileNotFoundError"):
        alpha = triton_backend.cg_update(state, Ap, 1e-8)
    assert torch.equal(alpha, reference.cg_update(before, Ap, 1e-8))
    assert spy.calls == ["cg_update"] and state.it == before.it == 1
    assert torch.equal(state.x, before.x) and torch.equal(state.r, before.r)


# ------------------------------------------------------------------ backend decides Triton


@pytest.fixture
def triton_on_cpu(monkeypatch, cpu_as_cuda):
    """The "triton" backend resolvable for CPU tensors, its matvec launches spied on."""
    entry = backends._REGISTRY["triton"]
    monkeypatch.setitem(
        backends._REGISTRY, "triton", replace(entry, devices=("cpu", "cuda"), probe=lambda: None)
    )
    return _spy(monkeypatch)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_only_the_triton_backend_launches_the_matvec_kernels(triton_on_cpu, method):
    spy = triton_on_cpu
    dec = mlp_decoder(3, 6, dtype=torch.float32)
    z = torch.randn(4, 3)
    kw = {"method": method, "probes": torch.randn(4, 2, 3)}
    if method == "exact":
        kw.pop("probes")
    values = {}
    for backend in ("torch", "cpp", "auto", "triton"):
        spy.calls.clear()
        with torch.no_grad():
            values[backend], info = rnf_fast.logdet_grad(
                dec, z, backend=backend, return_info=True, **kw
            )
        if backend in ("triton", "auto"):  # "auto" picks "triton" where it is usable
            assert info.backend == "triton" and "scaled_linear" in spy.calls, spy.calls
        else:
            assert spy.calls == [], (backend, spy.calls)
    torch.testing.assert_close(values["triton"], values["torch"])
    spy.calls.clear()
    with rnf_fast.use_backend("torch"), torch.no_grad():
        rnf_fast.logdet_grad(dec, z, **kw)
    assert spy.calls == []


def test_use_backend_and_the_default_outside_logdet_grad(triton_on_cpu):
    spy = triton_on_cpu
    C, W, S = _linear_args()
    ops.scaled_linear(C, W, S, transpose=True)
    assert spy.calls == ["scaled_linear"]  # default "auto": Triton wherever it is usable
    for name, launches in (("torch", 0), ("cpp", 0), ("triton", 1), ("auto", 1)):
        spy.calls.clear()
        with rnf_fast.use_backend(name):
            ops.scaled_linear(C, W, S, transpose=True)
            ops.coupling_cotangent(C, torch.rand(2, 5), torch.randn(2, 5, 2))
        assert spy.calls == ["scaled_linear", "coupling_cotangent"][: 2 * launches], name
    with rnf_fast.use_backend("torch"), rnf_fast.use_backend("triton"):
        spy.calls.clear()
        ops.scaled_linear(C, W, S, transpose=True)
    assert spy.calls == ["scaled_linear"]  # the innermost block wins
    with rnf_fast.use_backend("triton"):
        spy.calls.clear()
        ops.scaled_linear(C, W, S, transpose=True, backend="torch")
        ops.coupling_tangent(
            C, torch.randn(2, 3, 5, 2), torch.rand(2, 5), torch.randn(2, 5, 2), backend="cpp"
        )
    assert spy.calls == []  # an explicit backend= wins over the block
    with rnf_fast.use_backend("torch"):
        ops.scaled_linear(C, W, S, transpose=True, backend="triton")
    assert spy.calls == ["scaled_linear"]
    spy.calls.clear()
    ops.scaled_linear(C.clone().requires_grad_(), W, S, transpose=True)
    assert spy.calls == []  # a graph recorded through the inputs: the kernels have no backward


def test_use_backend_is_per_thread(triton_on_cpu):
    spy = triton_on_cpu
    C, W, S = _linear_args()
    with rnf_fast.use_backend("torch"):
        ops.scaled_linear(C, W, S, transpose=True)
        assert spy.calls == []
        other = threading.Thread(
            target=ops.scaled_linear, args=(C, W, S), kwargs={"transpose": True}
        )
        other.start()
        other.join()
        assert spy.calls == ["scaled_linear"]  # another thread keeps its own (default) setting
    with pytest.raises(ValueError, match="backend must be one of"), rnf_fast.use_backend(False):
        pass


def test_real_device_check_routes_cuda_tensors_only(monkeypatch):
    spy = _spy(monkeypatch)
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)  # as on a GPU box
    X, W, S = torch.randn(2, 3, 4), torch.randn(5, 4), torch.rand(2, 5)
    ops.scaled_linear(X, W, S)
    triton_backend.scaled_linear(X, W, S)  # the backend's own device check
    assert spy.calls == []  # CPU tensors never reach Triton
    with FakeTensorMode():
        Xc, Wc, Sc = (
            torch.randn(2, 3, 4, device="cuda"),
            torch.randn(5, 4, device="cuda"),
            torch.rand(2, 5, device="cuda"),
        )
        out = ops.scaled_linear(Xc, Wc, Sc)
        assert spy.calls == ["scaled_linear"] and out.shape == (2, 3, 5)
        with rnf_fast.use_backend("torch"):
            ops.scaled_linear(Xc, Wc, Sc)
        ops.scaled_linear(Xc.double(), Wc.double(), Sc.double())
    assert spy.calls == ["scaled_linear"]  # not under "torch", not for float64


def test_the_fallback_warning_points_at_the_caller(monkeypatch, triton_on_cpu):
    # Through the dispatch the failure is two frames deeper than through the backend's op;
    # both warnings name this file, where the op was called.
    _spy(monkeypatch, BUILD_FAILURES["compile"])
    with pytest.warns(triton_backend.TritonFallbackWarning) as caught:
        ops.scaled_linear(*_linear_args(), transpose=True)
    assert [w.filename for w in caught] == [__file__]
    monkeypatch.setattr(triton_backend, "_failure", None)
    with pytest.warns(triton_backend.TritonFallbackWarning) as caught:
        triton_backend.gram(torch.randn(2, 5, 3))
    assert [w.filename for w in caught] == [__file__]


# ------------------------------------------------------------------ one dispatch, per op


def test_a_backend_module_holds_its_own_ops_and_the_dispatch_fills_in_the_rest(monkeypatch):
    monkeypatch.setattr(cpp_backend, "unavailable_reason", lambda: None)  # with or without _C
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)  # as on a GPU box
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for module in (cpp_backend, triton_backend):  # no re-export of the reference's names
        own = set(module.__all__) & set(reference.__all__)
        assert own and all(getattr(module, op) is not getattr(reference, op) for op in own)
    torch_ops = backends.get_backend("torch", cpu)[1]
    assert all(getattr(torch_ops, op) is getattr(reference, op) for op in reference.__all__)
    name, cpp_ops = backends.get_backend("cpp", cpu)
    assert name == cpp_ops.name == "cpp"
    assert cpp_ops.cg_update is cpp_backend.cg_update
    assert cpp_ops.gram is reference.gram and cpp_ops.scaled_linear is reference.scaled_linear
    triton_ops = backends.get_backend("triton", cuda)[1]
    assert triton_ops.gram is triton_backend.gram
    assert triton_ops.coupling_tangent is triton_backend.coupling_tangent
    assert triton_ops.cholesky_logdet is cpp_backend.cholesky_logdet  # its base's
    assert triton_ops.cg_init is reference.cg_init  # the reference's, past the base
    assert triton_ops.JITTER_STEPS is reference.JITTER_STEPS
    assert triton_ops.CGState is reference.CGState
    with pytest.raises(AttributeError, match="backend 'triton' has no op 'unavailable_reason'"):
        triton_ops.unavailable_reason  # noqa: B018 (a module helper, not an op)


def test_the_reference_serves_every_device():
    # "auto" for a device no compiled backend serves resolves to the reference.
    assert rnf_fast.available_backends("meta") == ["torch"]
    assert backends.get_backend(None, torch.device("meta"))[0] == "torch"
    X, W = torch.randn(2, 3, 4, device="meta"), torch.randn(5, 4, device="meta")
    assert ops.scaled_linear(X, W).shape == (2, 3, 5)


def test_run_triton_names_the_op():
    with pytest.raises(ValueError, match="op must be one of"):
        triton_backend.run_triton("matmul", torch.matmul, torch.eye(2), torch.eye(2))


# ------------------------------------------------------------------ rnf-fast info


def test_info_reports_switches_and_failures(monkeypatch, capsys):
    monkeypatch.setenv("RNF_FAST_NO_TRITON", "1")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "triton   unavailable  (disabled by RNF_FAST_NO_TRITON=1)" in out, out
    assert "matvec   PyTorch reference (disabled by RNF_FAST_NO_TRITON=1)" in out, out
    cuda_line = next(line for line in out.splitlines() if line.startswith("  _C cuda"))
    reason = cpp_backend.cuda_unavailable_reason()
    assert cuda_line.endswith(f"({reason})" if reason else "compiled CUDA kernels"), cuda_line
    monkeypatch.delenv("RNF_FAST_NO_TRITON")
    monkeypatch.setattr(triton_backend, "_failure", "gram: CalledProcessError: gcc exited with 1")
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)
    cli.main(["info"])
    out = capsys.readouterr().out
    assert "triton   unavailable  (disabled in this process after a failure in gram" in out, out
    assert "matvec   PyTorch reference (disabled in this process after a failure in gram" in out
