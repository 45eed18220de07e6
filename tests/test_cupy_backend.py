"""The ``"cupy"`` backend: the CUDA kernels of csrc/cuda compiled at run time by NVRTC (CuPy).

Here, without a GPU or CuPy: its registration and reasons; its routing, launch shapes and
argument packing, with fakes standing in for CUDA tensors (``cupy_backend._on_cuda``) and for
CuPy (``_build``, ``_launch``); and an NVRTC compile check of every device source with the
backend's own source text and options (NVRTC needs no driver: libnvrtc from the
``nvidia-cuda-nvrtc`` wheel, the CUDA toolkit, or ``RNF_FAST_NVRTC=<libnvrtc.so or its
folder>``; skipped with the reason otherwise), which also checks each kernel's parameters
against the arguments the backend packs. On a GPU with CuPy (marked ``cuda``): logdet_grad end
to end, the auto choice, torch's current stream; the ops against the reference run in
tests/test_cpp_backend.py, parametrized over the backends ``cpp`` and ``cupy``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy
import pytest
import torch

import rnf_fast
from rnf_fast.ops import cpp as cpp_backend
from rnf_fast.ops import cupy as cupy_backend
from rnf_fast.ops import reference as ref
from rnf_fast.ops import triton as triton_backend
from rnf_fast.testing import assert_backend_equals_torch, mlp_decoder

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
FAMILIES = ("cg_update", "cholesky", "lanczos_logquad")
ENTRY_POINTS = [
    f"rnf_{op}_{suffix}"
    for op in ("cg_update", "cholesky_logdet", "cholesky_inverse", "lanczos_logquad")
    for suffix in ("f32", "f64")
]
DTYPES = [torch.float32, torch.float64]
NVRTC_ENV = "RNF_FAST_NVRTC"


def _row():
    return {row[0]: row for row in rnf_fast.backend_report()}["cupy"]


# --- registration and reasons --------------------------------------------------------------


def test_registered_for_cuda_only_with_a_reason_here():
    name, available, detail = _row()
    assert "cupy" not in rnf_fast.available_backends("cpu")
    if cupy_backend.unavailable_reason() is not None:
        assert not available and detail == cupy_backend.unavailable_reason()
        with pytest.raises(ValueError, match="backend 'cupy' is not available"):
            rnf_fast.logdet_grad(
                mlp_decoder(2, 4), torch.randn(3, 2, dtype=torch.float64), backend="cupy"
            )


def test_unavailable_reasons_in_order(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_cupy_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CuPy is not installed" in cupy_backend.unavailable_reason()
    assert "rnf_fast[cuda-jit-cu13]" in _row()[2]
    monkeypatch.setattr(cupy_backend, "_cupy_installed", lambda: True)
    assert cupy_backend.unavailable_reason().startswith("no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cupy_backend, "source_dir", lambda: None)
    assert "device sources" in cupy_backend.unavailable_reason()
    monkeypatch.setattr(cupy_backend, "source_dir", lambda: CSRC)
    assert cupy_backend.unavailable_reason() is None


@pytest.fixture
def usable(monkeypatch):
    """The backend passes its availability checks (CuPy installed, a CUDA device), and the
    extension has no CUDA kernels; no failure recorded."""
    monkeypatch.setattr(cupy_backend, "_cupy_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cupy_backend, "_c_has_cuda", lambda: False)
    monkeypatch.setattr(cupy_backend, "_failure", None)
    monkeypatch.setattr(cupy_backend, "_kernels", {})


def test_auto_picks_it_on_cuda_only_without_a_cuda_extension(monkeypatch, usable):
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: None)
    cpp = ["cpp"] if cpp_backend.unavailable_reason() is None else []
    assert rnf_fast.available_backends("cuda") == ["cupy", "triton", *cpp, "torch"]
    assert rnf_fast.available_backends("cpu")[0] != "cupy"
    assert _row()[1:] == (True, "devices: cuda")
    monkeypatch.setattr(cupy_backend, "_c_has_cuda", lambda: True)
    assert rnf_fast.available_backends("cuda") == ["triton", *cpp, "torch"]
    assert _row()[1] is False and _row()[2].startswith("not needed: rnf_fast._C has CUDA")
    # By name it still serves (e.g. to compare it with the extension's kernels).
    name, ops = rnf_fast.ops.get_backend("cupy", torch.device("cuda"))
    assert name == "cupy" and ops.cholesky_logdet is cupy_backend.cholesky_logdet
    assert ops.gram is triton_backend.gram  # its base's


def test_ops_off_cuda_run_the_reference_and_build_nothing(monkeypatch, usable):
    def no_build(*args):
        raise AssertionError("a kernel was built for CPU tensors")

    monkeypatch.setattr(cupy_backend, "_build", no_build)
    A = torch.randn(4, 5, 5, dtype=torch.float64)
    A = A @ A.mT + torch.eye(5, dtype=torch.float64)
    for got, want in zip(cupy_backend.cholesky_logdet(A), ref.cholesky_logdet(A)):
        assert torch.equal(got, want)
    L = ref.cholesky_logdet(A)[0]
    assert torch.equal(cupy_backend.cholesky_inverse(L), ref.cholesky_inverse(L))


# --- routing, launches and arguments, with fakes for CUDA and CuPy ---------------------------


@pytest.fixture
def fake_cuda(monkeypatch, usable):
    """CPU tensors stand in for CUDA ones; building a kernel gives its entry point's name and a
    launch is recorded, not run. Returns the list of launches."""
    launches = []
    monkeypatch.setattr(cupy_backend, "_on_cuda", lambda *ts: all(t.is_cpu for t in ts))
    monkeypatch.setattr(cupy_backend, "_build", lambda op, entry, index: entry)

    def launch(kernel, like, grid, block, shared_mem, args):
        launches.append(dict(kernel=kernel, grid=grid, block=block, smem=shared_mem, args=args))

    monkeypatch.setattr(cupy_backend, "_launch", launch)
    return launches


def _spd(N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(N, d, d, generator=g, dtype=torch.float64)
    return (G @ G.mT / d + torch.eye(d, dtype=torch.float64)).to(dtype)


def _calls(dtype, N=37, d=5, M=7):
    """One call of each op on CPU tensors of ``dtype``: (op name, thunk)."""
    A = _spd(N, d, dtype)
    state = ref.cg_init(torch.randn(N, d, dtype=dtype), M)
    a, b = torch.rand(N, M, dtype=dtype) + 1, torch.rand(N, M, dtype=dtype)
    steps, bb = torch.full((N,), 4), torch.rand(N, dtype=dtype)
    return [
        ("cg_update", lambda: cupy_backend.cg_update(state, torch.randn(N, d, dtype=dtype), 1e-3)),
        ("cholesky_logdet", lambda: cupy_backend.cholesky_logdet(A, jitter_steps=(10.0, 100.0))),
        ("cholesky_inverse", lambda: cupy_backend.cholesky_inverse(A)),
        ("lanczos_logquad", lambda: cupy_backend.lanczos_logquad(a, b, steps.int(), bb)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_launch_shapes_and_arguments(fake_cuda, dtype):
    N, d, M = 37, 5, 7
    for _, call in _calls(dtype, N, d, M):
        call()
    suffix = "f32" if dtype == torch.float32 else "f64"
    by_op = {launch["kernel"]: launch for launch in fake_cuda}
    assert list(by_op) == [f"rnf_{op}_{suffix}" for op, _ in _calls(dtype)]
    size = torch.finfo(dtype).bits // 8
    cg = by_op[f"rnf_cg_update_{suffix}"]
    assert (cg["grid"], cg["block"], cg["smem"]) == (5, 256, 0)  # a warp per system: 37 · 32 / 256
    assert [int(v) for v in cg["args"][12:16]] == [N, d, M, 0]  # N, d, max_iter, it
    scalar = numpy.float32 if dtype == torch.float32 else numpy.float64
    assert type(cg["args"][16]) is scalar and cg["args"][16] == scalar(1e-3 * 1e-3)  # tol² in T
    chol = by_op[f"rnf_cholesky_logdet_{suffix}"]
    assert (chol["grid"], chol["block"], chol["smem"]) == (N, 128, d * d * size)
    assert [float(v) for v in chol["args"][5:]] == [d, 2, 10.0, 100.0, 0, 0, 0, 0, 0, 0]
    inv = by_op[f"rnf_cholesky_inverse_{suffix}"]
    assert (inv["grid"], inv["block"], inv["smem"]) == (N, 128, d * d * size)
    lq = by_op[f"rnf_lanczos_logquad_{suffix}"]
    assert (lq["grid"], lq["block"], lq["smem"]) == (1, 128, 0)  # a thread per system
    assert [int(v) for v in lq["args"][5:]] == [N, M]


def test_pointers_are_the_tensors_memory_in_place(fake_cuda):
    state = ref.cg_init(torch.randn(6, 3, dtype=torch.float64), 4)
    fields = [state.x, state.r, state.p, state.rr, state.bb, state.active, state.breakdown]
    fields += [state.steps, state.alphas, state.betas]
    Ap = torch.randn(6, 3, dtype=torch.float64)
    alpha = cupy_backend.cg_update(state, Ap, 1e-6)
    (launch,) = fake_cuda
    pointers = [int(v) for v in launch["args"][:12]]
    assert pointers == [t.data_ptr() for t in (*fields, Ap, alpha)]  # no copies
    assert state.it == 1 and alpha.shape == (6,)


def test_limits_and_layouts_the_kernels_do_not_take_run_the_reference(fake_cuda):
    cupy_backend.cholesky_logdet(_spd(2, 65, torch.float64))  # d > 64
    cupy_backend.cholesky_logdet(_spd(2, 4, torch.float64), jitter_steps=(1.0,) * 9)
    ones = torch.ones(3, 65, dtype=torch.float64)
    cupy_backend.lanczos_logquad(ones, ones, torch.full((3,), 65), ones[:, 0])  # M > 64
    state = ref.cg_init(torch.randn(4, 3, dtype=torch.float64), 2)
    state.x = torch.zeros(3, 4, dtype=torch.float64).T  # a transposed view
    cupy_backend.cg_update(state, torch.randn(4, 3, dtype=torch.float64), 1e-6)
    mixed = ref.cg_init(torch.randn(4, 3, dtype=torch.float64), 2)
    mixed.bb = mixed.bb.float()
    cupy_backend.cg_update(mixed, torch.randn(4, 3, dtype=torch.float64), 1e-6)
    assert fake_cuda == []
    cupy_backend.cholesky_logdet(torch.empty(0, 3, 3, dtype=torch.float64))
    assert fake_cuda == []  # nothing to launch for N = 0 (a grid of 0 blocks is invalid)


CG_BREAKS = {  # field -> (a wrong value from the state, the error, its message)
    "Ap": (lambda s: torch.zeros(11, 5), ValueError, r"Ap must be \(N, d\) = \[11, 4\], got"),
    "steps": (lambda s: s.steps.int(), TypeError, "steps must be torch.int64, got torch.int32"),
    "active": (lambda s: s.active.float(), TypeError, "active must be torch.bool"),
    "it": (lambda s: 2, ValueError, r"it must be in \[0, max_iter\) = \[0, 2\), got 2"),
    "betas": (
        lambda s: s.betas[:, :1].contiguous(),
        ValueError,
        r"betas must be \(N, max_iter\) = \[11, 2\], got \[11, 1\]",
    ),
}


@pytest.mark.parametrize("field", sorted(CG_BREAKS))
def test_cg_update_checks_what_the_kernel_would_index(fake_cuda, field):
    state = ref.cg_init(torch.randn(11, 4, dtype=torch.float64), 2)
    make, error, match = CG_BREAKS[field]
    Ap = torch.zeros(11, 4)
    if field == "Ap":
        Ap = make(state)
    else:
        setattr(state, field, make(state))
    with pytest.raises(error, match=match):
        cupy_backend.cg_update(state, Ap, 1e-6)
    assert fake_cuda == []


def test_lanczos_logquad_checks_its_arguments(fake_cuda):
    a = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bb must be \(N,\) = \[4\], got \[4, 1\]"):
        cupy_backend.lanczos_logquad(a, a, torch.full((4,), 3), a[:, :1])
    with pytest.raises(ValueError, match=r"betas must be \(N, M\) = \[4, 3\], got \[4, 2\]"):
        cupy_backend.lanczos_logquad(a, a[:, :2], torch.full((4,), 3), a[:, 0])
    assert fake_cuda == []


# --- failures: one warning, the reference's answer, the backend off with the reason ----------


class CompileException(Exception):
    """Stands for cupy.cuda.compiler.CompileException (recognised by its name)."""


def test_an_nvrtc_failure_warns_once_falls_back_and_names_the_log(monkeypatch, fake_cuda):
    log = 'cholesky_device.cuh(42): error: identifier "sqrt_" is undefined'
    built = []

    def failing_build(op, entry, index):
        built.append(entry)
        raise CompileException(log)

    monkeypatch.setattr(cupy_backend, "_build", failing_build)
    A = _spd(3, 4, torch.float64)
    with pytest.warns(cupy_backend.CupyFallbackWarning, match="NVRTC failed") as record:
        got = cupy_backend.cholesky_logdet(A)
    assert [w.filename for w in record] == [__file__]  # pointed at the caller of the op
    for g, w in zip(got, ref.cholesky_logdet(A)):
        assert torch.equal(g, w)
    failure = cupy_backend.cupy_failure()
    assert failure == f"NVRTC failed to compile cuda/cholesky_device.cuh: {log}"
    assert _row()[1:] == (False, f"disabled in this process after a failure: {failure}")
    assert "cupy" not in rnf_fast.available_backends("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        state = ref.cg_init(torch.randn(3, 4, dtype=torch.float64), 2)
        cupy_backend.cg_update(state, torch.randn(3, 4, dtype=torch.float64), 1e-6)
    assert built == ["rnf_cholesky_logdet_f64"] and fake_cuda == []  # off for the process


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_without_cupy_the_real_build_fails_cleanly(monkeypatch, usable):
    # The real _build: `import cupy` fails before anything is launched.
    monkeypatch.setattr(cupy_backend, "_on_cuda", lambda *ts: True)
    L = torch.linalg.cholesky(_spd(2, 3, torch.float32))
    with pytest.warns(cupy_backend.CupyFallbackWarning, match="No module named 'cupy'"):
        got = cupy_backend.cholesky_inverse(L)
    assert torch.equal(got, ref.cholesky_inverse(L))
    assert cupy_backend.cupy_failure().startswith("cholesky_inverse: ModuleNotFoundError")


# --- the device sources ----------------------------------------------------------------------


def _header_constant(path: Path, name: str) -> int:
    found = re.search(rf"constexpr (?:int|int64_t) {name} = (\d+);", path.read_text())
    assert found, f"{name} not found in {path}"
    return int(found[1])


def test_python_constants_match_the_headers():
    cuda = CSRC / "cuda"
    pairs = {
        "MAX_DIM": (CSRC / "views.h", "kMaxDim"),
        "MAX_JITTER_STEPS": (CSRC / "views.h", "kMaxJitterSteps"),
        "_WARP": (cuda / "cg_update_device.cuh", "kWarp"),
        "_CG_THREADS": (cuda / "cg_update_device.cuh", "kCgThreads"),
        "_LANCZOS_THREADS": (cuda / "lanczos_logquad_device.cuh", "kLanczosThreads"),
        "_CHOLESKY_THREADS": (cuda / "cholesky_device.cuh", "kCholeskyThreads"),
    }
    for attribute, (path, name) in pairs.items():
        assert getattr(cupy_backend, attribute) == _header_constant(path, name), attribute


def test_source_dir_is_the_checkouts_csrc_and_the_source_changes_with_any_header(tmp_path):
    assert cupy_backend.source_dir() == CSRC
    copy = _copy_sources(tmp_path)
    before = cupy_backend.device_source("cholesky", copy)
    assert before == cupy_backend.device_source("cholesky", CSRC)
    assert before.endswith('#include "cholesky_device.cuh"\n')
    with open(copy / "views.h", "a") as f:
        f.write("// an edit CuPy's cache must not miss\n")
    assert cupy_backend.device_source("cholesky", copy) != before
    with pytest.raises(ValueError, match="family must be one of"):
        cupy_backend.device_source("gram", CSRC)


def _copy_sources(dest: Path) -> Path:
    for name in cupy_backend.DEVICE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CSRC / name, dest / name)
    return dest


# --- NVRTC compile check (no GPU, no driver) -------------------------------------------------


def _nvrtc_candidates() -> list[Path]:
    """libnvrtc.so files: RNF_FAST_NVRTC (a file or its folder), else the nvidia-cuda-nvrtc
    wheels this interpreter sees, else the CUDA toolkit of CUDA_HOME or nvcc, else the loader's
    search path."""
    setting = os.environ.get(NVRTC_ENV)
    if setting:
        path = Path(setting)
        return sorted(path.glob("libnvrtc.so*")) if path.is_dir() else [path]
    folders = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folders += [Path(root, "cu13", "lib"), Path(root, "cuda_nvrtc", "lib")]
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    homes += [str(Path(os.path.realpath(nvcc)).parents[1])] if nvcc else []
    for home in filter(None, homes):
        folders += [Path(home, "lib64"), *map(Path, glob.glob(f"{home}/targets/*/lib"))]
    found = [p for folder in folders for p in sorted(folder.glob("libnvrtc.so*"))]
    system = ctypes.util.find_library("nvrtc")
    return found + ([Path(system)] if system else [])


@functools.cache
def _nvrtc() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded libnvrtc, its path), or (None, why not)."""
    candidates = _nvrtc_candidates()
    if not candidates:
        return None, (
            f"libnvrtc not found: set {NVRTC_ENV} to libnvrtc.so or its folder (e.g. pip install "
            "--target DIR nvidia-cuda-nvrtc: DIR/nvidia/cu13/lib)"
        )
    errors = []
    for path in candidates:
        try:
            # libnvrtc loads its builtins by name: make the ones beside it loadable first.
            for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(str(path)), str(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    return None, "libnvrtc does not load: " + "; ".join(errors)


def nvrtc_compile(source: str, options: list[str]) -> tuple[bool, str, str]:
    """Compile ``source`` with NVRTC: (success, NVRTC's log, the PTX)."""
    lib = _nvrtc()[0]
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"rnf_fast.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram returned {rc}"
    try:
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        ok = lib.nvrtcCompileProgram(prog, len(options), argv) == 0
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if ok:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buffer)
            ptx = buffer.value
        return ok, log.value.decode(errors="replace"), ptx.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


needs_nvrtc = pytest.mark.skipif(_nvrtc()[0] is None, reason=_nvrtc()[1])
SM90 = "-arch=sm_90"  # the GPU machine's architecture (CuPy picks the device's own)


def _compile_family(family: str, root: Path = CSRC) -> tuple[bool, str, str]:
    """A family's device source, compiled as the backend compiles it, for sm_90."""
    options = [*cupy_backend.nvrtc_options(root), SM90]
    return nvrtc_compile(cupy_backend.device_source(family, root), options)


def _entry_parameters(ptx: str) -> dict[str, list[str]]:
    """Each PTX entry point's parameter types (``u64`` for a pointer or a 64-bit integer)."""
    return {
        m[1]: re.findall(r"\.param \.(\w+)", m[2])
        for m in re.finditer(r"\.entry (\w+)\(([^)]*)\)", ptx)
    }


@functools.cache
def _compiled_entries() -> dict[str, list[str]]:
    entries = {}
    for family in FAMILIES:
        ok, log, ptx = _compile_family(family)
        assert ok, f"NVRTC failed on cuda/{family}_device.cuh:\n{log}"
        entries.update(_entry_parameters(ptx))
    return entries


@needs_nvrtc
@pytest.mark.parametrize("family", FAMILIES)
def test_every_device_source_compiles_with_nvrtc_for_sm90(family):
    ok, log, ptx = _compile_family(family)
    assert ok, f"NVRTC failed on cuda/{family}_device.cuh:\n{log}"
    expected = [e for e in ENTRY_POINTS if _family_of(e) == family]
    assert sorted(_entry_parameters(ptx)) == sorted(expected)  # extern "C": unmangled names


def _family_of(entry: str) -> str:
    op = entry.removeprefix("rnf_").rsplit("_", 1)[0]
    return "cholesky" if op.startswith("cholesky") else op


def _ptx_type(arg: object) -> str:
    """The PTX parameter type of an argument the backend packs (CuPy passes its bytes)."""
    kind, size = numpy.asarray(arg).dtype.kind, numpy.asarray(arg).dtype.itemsize
    return {("u", 8): "u64", ("i", 8): "u64", ("i", 4): "u32", ("f", 4): "f32", ("f", 8): "f64"}[
        (kind, size)
    ]


@needs_nvrtc
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_arguments_match_each_kernels_parameters(fake_cuda, dtype):
    # The launch passes raw bytes per argument: a count or width that differs from the kernel's
    # parameters reads garbage on the GPU. Checked against the PTX NVRTC makes of each entry.
    for _, call in _calls(dtype):
        call()
    entries = _compiled_entries()
    for launch in fake_cuda:
        got = [_ptx_type(a) for a in launch["args"]]
        assert got == entries[launch["kernel"]], launch["kernel"]


@needs_nvrtc
def test_the_nvrtc_check_fails_on_what_nvcc_accepts(tmp_path):
    # NVRTC has no standard headers: an unguarded #include <cstdint>, fine under nvcc, fails.
    copy = _copy_sources(tmp_path)
    views = copy / "views.h"
    views.write_text(views.read_text().replace("#pragma once", "#pragma once\n#include <cstdint>"))
    ok, log, _ = _compile_family("cg_update", copy)
    assert not ok and "cstdint" in log, log
    # And a plain error in a device header, with the file and line in the log.
    copy = _copy_sources(tmp_path / "second")
    header = copy / "cuda" / "cholesky_device.cuh"
    header.write_text(header.read_text().replace("sqrt_(ajj)", "sqrt_(ajj, 2)"))
    ok, log, _ = _compile_family("cholesky", copy)
    assert not ok and "cholesky_device.cuh" in log and "error" in log, log


# --- on a GPU, with CuPy ----------------------------------------------------------------------

needs_cupy_gpu = pytest.mark.skipif(
    cupy_backend.unavailable_reason() is not None, reason=str(cupy_backend.unavailable_reason())
)


@pytest.mark.cuda
@needs_cupy_gpu
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_logdet_grad_cupy_equals_torch_on_cuda(method):
    assert_backend_equals_torch("cupy", method, "cuda")
    assert cupy_backend.cupy_failure() is None


@pytest.mark.cuda
@needs_cupy_gpu
def test_auto_runs_the_cupy_kernels_without_a_cuda_extension(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_c_has_cuda", lambda: False)
    launched = []
    launch = cupy_backend._launch
    monkeypatch.setattr(
        cupy_backend,
        "_launch",
        lambda kernel, *a: launched.append(kernel.name) or launch(kernel, *a),
    )
    dec = mlp_decoder(4, 9, hidden=(8,)).cuda()
    z = torch.randn(5, 4, dtype=torch.float64, device="cuda")
    _, info = rnf_fast.logdet_grad(dec, z, method=rnf_fast.Exact(), return_info=True)
    assert info.backend == "cupy"
    assert "rnf_cholesky_logdet_f64" in launched


@pytest.mark.cuda
@needs_cupy_gpu
def test_kernels_run_on_torchs_current_stream():
    # The input is written on a side stream behind ~50 ms of sleep; a kernel launched on any
    # other stream would read it before it is there (identity: log det 0; zeros: info 1).
    A = torch.zeros(64, 8, 8, dtype=torch.float64, device="cuda")
    eye = torch.eye(8, dtype=torch.float64, device="cuda").expand(64, 8, 8).contiguous()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        A.copy_(2 * eye)
        _, logdet, _, info = cupy_backend.cholesky_logdet(A)
    side.synchronize()
    assert not bool(info.any())
    torch.testing.assert_close(logdet, torch.full_like(logdet, 8 * numpy.log(2.0)))
