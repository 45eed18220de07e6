"""The CG solve as one CUDA graph (rnf_fast.engine.graph_cg): on CPU through emulated graphs
whose capture, like CUDA's, refuses host reads and whose replay reruns the captured solve on the
static buffers; on a GPU (marked cuda) through torch.cuda.CUDAGraph."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rnf_fast
from rnf_fast import CG
from rnf_fast.engine import graph_cg, stochastic
from rnf_fast.engine.graph_cg import CudaGraphFallbackWarning, EmulatedGraphs
from rnf_fast.linearize.base import Linearization
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import dense_jacobian, grads, mlp_decoder

ROOT = Path(__file__).resolve().parents[1]
_SYNCS = ("__bool__", "item", "tolist", "__int__", "__float__", "numpy")


class StrictGraphs(EmulatedGraphs):
    """Emulated graphs whose capture refuses every host read of a tensor, as a CUDA stream
    capture does (a synchronising copy invalidates it)."""

    def capture(self, fn, device):
        def refuse(self, *args, **kwargs):
            raise AssertionError("host synchronisation during capture")

        with pytest.MonkeyPatch.context() as m:
            for name in _SYNCS:
                m.setattr(torch.Tensor, name, refuse)
            return super().capture(fn, device)


@pytest.fixture
def runner():
    graph_cg.clear_cache()
    graph_cg._WARNED.clear()
    with graph_cg.emulated(StrictGraphs()) as emulated:
        yield emulated
    graph_cg.clear_cache()


def _decoder(d=3, D=20, hidden=(6,), dtype=torch.float64, seed=0):
    # D = 20 against a last hidden width 6: the products take SequentialLinearization's hidden
    # space, whose WᵀW is computed lazily on the first product (inside the graph).
    return mlp_decoder(d, D, hidden=hidden, dtype=dtype, seed=seed)


def _z(B=4, d=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=dtype).requires_grad_(True)


def _probes(B=4, K=2, d=3, dtype=torch.float64, seed=2):
    return torch.randn(B, K, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run(decoder, z, **options):
    """(value, gradients with respect to z and the parameters, the CG report)."""
    value, info = rnf_fast.logdet_grad(decoder, z, "cg", return_info=True, **options)
    return value.detach(), grads(value, [z, *decoder.parameters()]), info.cg


def _assert_same(got, expected, *, rtol=0.0):
    """Values, gradients and the CG reports of two runs: bit for bit, or to ``rtol``."""
    tol = {"rtol": rtol, "atol": 1e-3 * rtol}
    (v1, g1, c1), (v2, g2, c2) = got, expected
    torch.testing.assert_close(v1, v2, equal_nan=True, **tol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(c1.iterations, c2.iterations)
    assert torch.equal(c1.converged, c2.converged)
    torch.testing.assert_close(c1.residuals, c2.residuals, **tol)
    torch.testing.assert_close(c1.solution, c2.solution, **tol)


# --- replays compute the new state ---------------------------------------------------------


def _flow_decoder():
    model = RectangularFlow(
        FlowConfig(D=6, d=3, f_layers=2, f_hidden=(8, 8), h_layers=1, h_hidden=(8,), seed=0)
    )
    model = model.double().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # zero-initialised last layers: perturbed, so J is no isometry
        for p in model.parameters():
            if bool((p == 0).all()):
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.decoder, list(model.f.parameters())


@pytest.mark.filterwarnings("ignore:CG reached max_iter")
@pytest.mark.parametrize(
    "case", ["mlp", "x0-jacobi", "batch-preconditioner", "bfloat16", "flow", "no-grad"]
)
def test_a_replay_computes_the_new_state_like_the_eager_fixed_solve(runner, case):
    # Every tensor the solve reads must be copied into the graph's buffers, and everything
    # derived from them (WᵀW) recomputed inside the graph: a replay after new parameters
    # (updated in place, as an optimizer does), new z and new probes must give exactly the
    # eager fixed-iteration answer for the new state, not the captured one.
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float64
    decoder = _decoder(dtype=dtype)
    params = list(decoder.parameters())
    if case == "flow":
        decoder, params = _flow_decoder()
    options = {"tol": 1e-4}
    if case == "x0-jacobi":
        options |= {"preconditioner": "jacobi", "x0": 0.1 * _probes(seed=7)}
    if case == "batch-preconditioner":
        options["preconditioner"] = "batch"

    def call(z, probes, **extra):
        with torch.set_grad_enabled(case != "no-grad"):
            value, info = rnf_fast.logdet_grad(
                decoder, z, "cg", probes=probes, return_info=True, **options, **extra
            )
        inputs = [z, *params]
        g = grads(value, inputs) if value.requires_grad else []
        return value.detach(), g, info.cg

    first = call(_z(seed=1, dtype=dtype), _probes(seed=2, dtype=dtype), cuda_graph=True)
    assert first[2].graph == "captured"
    first_solution = first[2].solution.clone()
    with torch.no_grad():
        for p in params:
            p.mul_(1.1).add_(0.05)
    z, probes = _z(seed=4, dtype=dtype), _probes(seed=5, dtype=dtype)
    replay = call(z, probes, cuda_graph=True)
    eager = call(z, probes, fixed_iterations=True)
    assert replay[2].graph == "replayed" and eager[2].graph is None
    assert (runner.captures, runner.replays) == (1, 2)
    _assert_same(replay, eager)
    # The first call's results are its own: outputs are cloned before the next replay.
    assert torch.equal(first[2].solution, first_solution)
    assert not torch.equal(first[2].solution, replay[2].solution)


def test_a_rebound_parameter_captures_again(runner):
    decoder, z, probes = _decoder(), _z(), _probes()
    assert _run(decoder, z, probes=probes, cuda_graph=True)[2].graph == "captured"
    with torch.no_grad():
        decoder[0].weight = nn.Parameter(decoder[0].weight * 1.5)
    got = _run(decoder, z, probes=probes, cuda_graph=True)
    assert got[2].graph == "captured" and runner.captures == 2
    _assert_same(got, _run(decoder, z, probes=probes, fixed_iterations=True))


# --- frozen systems ------------------------------------------------------------------------


def _staggered_probes(decoder, z, K=3):
    """Probes whose systems converge at different iterations: sample 0's first probe is an
    eigenvector of its A (one step), sample 1's a sum of two (two steps), the rest random."""
    with torch.no_grad():
        J = dense_jacobian(decoder, z.detach())
        _, Q = torch.linalg.eigh(J.transpose(1, 2) @ J)
    V = _probes(B=z.shape[0], K=K, d=z.shape[1], seed=9)
    V[0, 0] = 2.0 * Q[0, :, 0]
    V[1, 1] = 2.0 * (Q[1, :, 0] + Q[1, :, 2])
    return V


def test_frozen_systems_stay_frozen_in_the_graph(runner):
    # Systems that converge early are frozen by masks while the others go on: the graphed
    # solve must equal the eager fixed-iteration solve in everything it reports (Lanczos
    # coefficients included), and its solution, steps and residuals those of the default
    # stopping rule.
    decoder = _decoder(d=5, hidden=(8,))
    z = _z(d=5)
    V = _staggered_probes(decoder, z)
    b = V.reshape(-1, 5)
    lin = rnf_fast.linearize(decoder, z)
    solve = functools.partial(
        stochastic._solve,
        K=3,
        dtype=torch.float64,
        autocast=None,
        tol=1e-6,
        max_iter=12,
        backend="torch",
    )
    graphed = graph_cg.solve_graphed(solve, lin, z, None, b, None, settings=("test", 12))
    eager, product = solve(lin, z, None, b, None)
    got = graphed.result
    assert graphed.status == "captured"
    steps = got.steps.tolist()
    assert steps[0] == 1 and steps[4] == 2 and max(steps) < 12  # frozen for most iterations
    for name in ("x", "steps", "residuals", "converged", "breakdown", "alphas", "betas", "bb"):
        assert torch.equal(getattr(got, name), getattr(eager, name)), name
    assert got.matvecs == eager.matvecs == 12
    assert torch.equal(graphed.product.solution_image(), product.solution_image())
    # Against the default stopping rule, through logdet_grad: the same solution and steps, and
    # the same gradient to rounding (the value's Lanczos matrices are padded, not truncated).
    graph = _run(decoder, z, probes=V, tol=1e-6, max_iter=12, cuda_graph=True)
    stopped = _run(decoder, z, probes=V, tol=1e-6, max_iter=12)
    assert graph[2].matvecs == 12 and stopped[2].matvecs < 12
    _assert_same(graph, stopped, rtol=1e-12)


# --- the cache -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:CG reached max_iter")
def test_the_cache_is_keyed_by_what_fixes_the_captured_work(runner, monkeypatch):
    decoder = _decoder()

    def status(B=4, K=2, d=3, **options):
        dec = decoder if d == 3 else _decoder(d=d)
        z = _z(B=B, d=d)
        return _run(dec, z, probes=_probes(B=B, K=K, d=d), cuda_graph=True, **options)[2].graph

    assert status() == "captured"
    assert status() == "replayed"
    assert status(B=5) == "captured"  # batch
    assert status(K=3) == "captured"  # probes
    assert status(d=4) == "captured"  # another decoder, another latent size
    assert status(tol=1e-3) == "captured"  # the tolerance fixes the frozen masks
    assert status(max_iter=2) == "captured"
    backends = rnf_fast.available_backends("cpu")  # the first one is the default
    for backend in backends[1:]:
        assert status(backend=backend) == "captured"
    assert status() == "replayed"  # the first key is still there
    assert runner.captures == 6 + len(backends[1:])
    # Least recently used first out.
    graph_cg.clear_cache()
    monkeypatch.setattr(graph_cg, "CACHE_SIZE", 2)
    assert [status(), status(B=5), status(), status(B=6), status(B=5)] == [
        "captured", "captured", "replayed", "captured", "captured"
    ]  # fmt: skip


def test_a_float32_problem_captures_its_own_graph(runner):
    decoder = _decoder()
    _run(decoder, _z(), probes=_probes(), cuda_graph=True)
    decoder32 = _decoder(dtype=torch.float32)
    z, V = _z(dtype=torch.float32), _probes(dtype=torch.float32)
    got = _run(decoder32, z, probes=V, cuda_graph=True)
    assert got[2].graph == "captured"
    _assert_same(got, _run(decoder32, z, probes=V, fixed_iterations=True))


# --- fallbacks -----------------------------------------------------------------------------


class _LinearDecoder(nn.Module):
    """x = W z, with its own explicit linearization; ``sync`` makes its products read a
    tensor on the host, ``closure`` keeps W inside a function's closure."""

    def __init__(self, d=3, D=7, *, sync=False, closure=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(D, d, generator=g, dtype=torch.float64))
        self.sync, self.closure = sync, closure

    def forward(self, z):
        return z @ self.weight.T

    def linearize(self, z):
        return _LinearLinearization(self, z)


class _LinearLinearization(Linearization):
    path = "explicit"

    def __init__(self, decoder, z):
        self.decoder, self.z, self.out = decoder, z, decoder(z.detach()).detach()
        weight = decoder.weight.detach()
        self.weight = weight
        self.scale = (lambda X: X * weight.norm()) if decoder.closure else None

    def jvp(self, V, *, create_graph=False):
        weight = self.decoder.weight if create_graph else self.weight
        return V @ weight.T

    def vjp(self, C):
        if self.decoder.sync and float(C.abs().max()) < 0:  # a host read, never true
            raise AssertionError
        return C @ self.weight if self.scale is None else self.scale(C @ self.weight)


def test_a_failed_capture_runs_eager_warns_once_and_is_remembered(runner):
    decoder, z, V = _LinearDecoder(sync=True), _z(), _probes()
    with pytest.warns(CudaGraphFallbackWarning, match="capture failed: AssertionError: host"):
        got = _run(decoder, z, probes=V, cuda_graph=True)
    reason = got[2].graph
    assert reason.startswith("eager: capture failed: AssertionError: host synchronisation")
    # The eager solve runs as it would without cuda_graph: its own stopping rule.
    _assert_same(got, _run(decoder, z, probes=V))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CudaGraphFallbackWarning)
        again = _run(decoder, z, probes=V, cuda_graph=True)
    assert again[2].graph == reason and runner.captures == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("generic", "FuncLinearization is a generic linearization"),
        ("autocast", "under the caller's autocast"),
        ("closure", "the inputs cannot be copied into static buffers: lin.scale<closure of"),
        ("truncation", "a truncation draws its iteration count"),
    ],
)
def test_calls_the_graph_cannot_serve_run_eager_with_the_reason(runner, case, reason):
    dtype = torch.float32 if case == "autocast" else torch.float64  # autocast skips float64
    decoder, z, V = _decoder(dtype=dtype), _z(dtype=dtype), _probes(dtype=dtype)
    options = {}
    if case == "generic":
        options["batching"] = "vmap"
    if case == "closure":
        decoder = _LinearDecoder(closure=True)
    if case == "truncation":
        from rnf_fast.engine.truncation import Roulette

        options["truncation"] = Roulette(min_iter=2, continue_prob=0.5)
        options["generator"] = torch.Generator().manual_seed(0)
    autocast = case == "autocast"
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with pytest.warns(CudaGraphFallbackWarning, match=re.escape(reason)), context:
        got = _run(decoder, z, probes=V, cuda_graph=True, **options)
    assert got[2].graph.startswith(f"eager: {reason}")
    assert runner.captures == 0


# --- the option ----------------------------------------------------------------------------


def test_option_errors_name_the_argument():
    decoder, z = _decoder(), _z()
    with pytest.raises(TypeError, match="cuda_graph must be None or a bool, got 1"):
        CG(cuda_graph=1)
    with pytest.raises(TypeError, match="cuda_graph must be None or a bool, got 'yes'"):
        rnf_fast.logdet_grad(decoder, z, "cg", cuda_graph="yes")
    # Off CUDA, asking for the graph is an error; the environment switch is not (below).
    with pytest.raises(ValueError, match="cuda_graph=True needs z on a CUDA device, got z on cpu"):
        rnf_fast.logdet_grad(decoder, z, "cg", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs z on a CUDA device"):
        rnf_fast.logdet(decoder, z, CG(cuda_graph=True))
    with pytest.raises(ValueError, match="cuda_graph applies to method='cg'"):
        rnf_fast.logdet_grad(decoder, z, "exact", cuda_graph=False)
    assert repr(CG(cuda_graph=False)) == "CG(cuda_graph=False)"


def test_the_environment_switch_is_read_at_each_call(runner, monkeypatch):
    decoder, z, V = _decoder(), _z(), _probes()
    monkeypatch.setenv(graph_cg.GRAPH_ENV, "1")
    assert _run(decoder, z, probes=V)[2].graph == "captured"
    assert _run(decoder, z, probes=V, cuda_graph=False)[2].graph is None  # said no
    monkeypatch.delenv(graph_cg.GRAPH_ENV)
    assert _run(decoder, z, probes=V)[2].graph is None
    monkeypatch.setenv(graph_cg.GRAPH_ENV, "1")
    assert _run(decoder, z, probes=V)[2].graph == "replayed"


def test_the_environment_switch_is_silently_ignored_off_cuda(monkeypatch):
    monkeypatch.setenv(graph_cg.GRAPH_ENV, "1")
    decoder, z, V = _decoder(), _z(), _probes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CudaGraphFallbackWarning)
        got = _run(decoder, z, probes=V)
    assert got[2].graph is None
    _assert_same(got, _run(decoder, z, probes=V, cuda_graph=False))


# --- the benchmark's CPU smoke run ---------------------------------------------------------


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_graph_cg", ROOT / "bench/gpu_graph_cg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_runs_on_cpu_with_emulated_graphs(tmp_path):
    bench = _bench_module()
    out = tmp_path / "graph_cg.json"
    assert bench.main(["--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == list(bench.MODES)
    assert all(row["status"] == "ok" for row in rows), rows
    graph = rows[-1]
    assert graph["graph"] == "replayed" and graph["step_ms"] > 0
    assert graph["speedup_vs_eager"] > 0 and graph["grad_rel_error_vs_fixed"] == 0.0
    graph_cg.clear_cache()


# --- on a GPU ------------------------------------------------------------------------------


def _cuda_problem(dtype=torch.float64):
    decoder = mlp_decoder(16, 784, hidden=(256, 256), dtype=dtype).cuda()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 16, generator=g, dtype=dtype).cuda().requires_grad_(True)
    return decoder, z


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:CG reached max_iter")
def test_cuda_graph_replays_the_eager_fixed_solve_of_the_new_state():
    graph_cg.clear_cache()
    decoder, z = _cuda_problem()
    V = _probes(B=64, K=1, d=16, seed=3).cuda()
    first = _run(decoder, z, probes=V, cuda_graph=True)
    assert first[2].graph == "captured"
    _assert_same(first, _run(decoder, z, probes=V, fixed_iterations=True), rtol=1e-9)
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(1.05)
    z2 = (z.detach() + 0.1).requires_grad_(True)
    V2 = _probes(B=64, K=1, d=16, seed=4).cuda()
    replay = _run(decoder, z2, probes=V2, cuda_graph=True)
    assert replay[2].graph == "replayed"
    _assert_same(replay, _run(decoder, z2, probes=V2, fixed_iterations=True), rtol=1e-9)
    # Frozen systems: the default stopping rule gives the same steps and gradient.
    stopped = _run(decoder, z2, probes=V2)
    assert len(set(stopped[2].iterations.flatten().tolist())) > 1  # systems stop apart
    _assert_same(replay, stopped, rtol=1e-9)
    graph_cg.clear_cache()


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:CG reached max_iter")
def test_cuda_graph_runs_float32_and_the_environment_switch():
    graph_cg.clear_cache()
    decoder, z = _cuda_problem(torch.float32)
    V = _probes(B=64, K=1, d=16, seed=3, dtype=torch.float32).cuda()
    with pytest.MonkeyPatch.context() as m:
        m.setenv(graph_cg.GRAPH_ENV, "1")
        statuses = [_run(decoder, z, probes=V)[2].graph for _ in range(3)]
        graph = _run(decoder, z, probes=V)
    assert statuses == ["captured", "replayed", "replayed"]
    eager = _run(decoder, z, probes=V, fixed_iterations=True)
    torch.testing.assert_close(graph[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(graph[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    graph_cg.clear_cache()


@pytest.mark.cuda
def test_cuda_graph_capture_failure_falls_back_and_leaves_the_device_usable():
    graph_cg.clear_cache()
    graph_cg._WARNED.clear()
    decoder = _LinearDecoder(sync=True).cuda()
    z, V = _z().cuda(), _probes().cuda()
    with pytest.warns(CudaGraphFallbackWarning, match="capture failed"):
        got = _run(decoder, z, probes=V, cuda_graph=True)
    assert got[2].graph.startswith("eager: capture failed")
    _assert_same(got, _run(decoder, z, probes=V), rtol=1e-9)
    # The device still captures and replays.
    ok, zz = _decoder().cuda(), _z().cuda()
    assert _run(ok, zz, probes=V, cuda_graph=True)[2].graph == "captured"
    assert _run(ok, zz, probes=V, cuda_graph=True)[2].graph == "replayed"
    graph_cg.clear_cache()
