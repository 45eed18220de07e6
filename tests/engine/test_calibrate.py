"""``method="auto"`` calibrated on the device (:mod:`rnf_fast.engine.calibrate`), on the CPU with
instrumented fakes: a fake clock that only the instrumented estimators (and, for the backward,
a hook on z) move, so one method is "slower" by construction. The decision follows the times,
drops the warm-up, counts the backward, is kept per key, is recorded in ``LogdetInfo``, and is
exported and imported without timing again; the environment switch is read at each call."""

from __future__ import annotations

import json
import re

import pytest
import torch

import rnf_fast
from rnf_fast import CG
from rnf_fast.engine import api, calibrate
from rnf_fast.engine.auto import predicted_costs
from rnf_fast.engine.calibrate import (
    CALIBRATE_ENV,
    Calibrator,
    calibration_key,
    merge_calibration_states,
)
from rnf_fast.engine.options import resolve_options

DTYPE = torch.float64


class FakeClock:
    """A clock in ms that moves only when the instrumented estimators (or backward hooks) move
    it; ``reads`` counts the calibrator's readings."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self.forward: dict[str, float | list[float]] = {"exact": 1.0, "cg": 1.0}
        self.backward: dict[str, float] = {"exact": 0.0, "cg": 0.0}
        self.ran: list[str] = []

    def __call__(self, device: torch.device) -> float:
        self.reads += 1
        return self.now

    def spend_backward(self, method: str) -> None:
        self.now += self.backward[method]

    def spend(self, method: str) -> None:
        cost = self.forward[method]
        self.now += cost.pop(0) if isinstance(cost, list) else cost


def forbidden_clock(device: torch.device) -> float:
    raise AssertionError("the clock was read: a decided key was timed again")


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """A fake clock moved by the estimators of ``api``: each call spends its method's
    ``forward`` cost."""
    fake = FakeClock()

    def instrumented(name, estimate):
        def run(options, ctx):
            fake.ran.append(name)
            fake.spend(name)
            return estimate(options, ctx)

        return run

    monkeypatch.setattr(api, "estimate_exact", instrumented("exact", api.estimate_exact))
    monkeypatch.setattr(api, "estimate_cg", instrumented("cg", api.estimate_cg))
    monkeypatch.delenv(CALIBRATE_ENV, raising=False)
    return fake


def mlp(d: int = 2, hidden: int = 8, D: int = 5, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, D)]
    return torch.nn.Sequential(*layers).to(DTYPE)


def latents(B: int = 4, d: int = 2) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(B + 10 * d), dtype=DTYPE)


def step(decoder, z0, clock: FakeClock | None, *, backward: bool = True, **kwargs):
    """One call on a fresh leaf z, then (if asked) its backward, which spends the backward cost
    of the method that ran (a hook on z: the gradient reaches z late in the backward)."""
    z = z0.detach().clone().requires_grad_()
    ld, info = rnf_fast.logdet_grad(decoder, z, return_info=True, **kwargs)
    if backward:
        if clock is not None:
            z.register_hook(lambda grad: clock.spend_backward(info.method))
        ld.sum().backward()
    return ld, info, z


@pytest.mark.parametrize("slower", ["exact", "cg"])
def test_the_method_timed_faster_is_the_decision(clock, slower):
    faster = "cg" if slower == "exact" else "exact"
    clock.forward = {slower: 7.0, faster: 2.0}
    calibrator = Calibrator(warmup=1, samples=3, clock=clock)
    dec, z = mlp(), latents()
    infos = [step(dec, z, clock, auto_calibrate=calibrator)[1] for _ in range(8)]
    # The first 2·(1 + 3) calls run the methods in turn, each reported as calibrating.
    assert clock.ran == ["exact", "cg"] * 4
    assert [i.method for i in infos] == ["exact", "cg"] * 4
    assert {(i.auto_decision.source, i.auto_decision.exact_ms) for i in infos} == {
        ("calibrating", None)
    }
    reads = clock.reads
    for _ in range(2):
        _, info, _ = step(dec, z, clock, auto_calibrate=calibrator)
        assert info.method == faster
        assert info.auto_decision.source == "calibrated"
        ms = {"exact": info.auto_decision.exact_ms, "cg": info.auto_decision.cg_ms}
        assert ms == {slower: 7.0, faster: 2.0}
        assert info.auto_decision.key == infos[0].auto_decision.key
    assert clock.reads == reads  # a decided key is not timed
    assert clock.ran[8:] == [faster, faster]


def test_each_call_returns_the_value_and_gradient_of_the_method_it_ran(clock):
    dec, z = mlp(), latents()
    probes = torch.randint(0, 2, (4, 2, 2), generator=torch.Generator().manual_seed(1))
    probes = (2.0 * probes - 1).to(DTYPE)  # fixed probes: CG is deterministic
    calibrator = Calibrator(warmup=0, samples=1, clock=clock)
    methods = []
    for _ in range(3):
        ld, info, z_used = step(dec, z, clock, auto_calibrate=calibrator, probes=probes)
        methods.append(info.method)
        grads = [p.grad for p in dec.parameters()]  # None: the output bias (J without it)
        dec.zero_grad()
        options = {"probes": probes} if info.method == "cg" else {}
        ref, ref_info, z_ref = step(dec, z, None, method=info.method, **options)
        assert ref_info.method == info.method
        assert torch.equal(ld, ref)
        assert torch.equal(z_used.grad, z_ref.grad)
        for g, p in zip(grads, dec.parameters()):
            assert (g is None and p.grad is None) or torch.equal(g, p.grad)
        dec.zero_grad()
    assert methods[:2] == ["exact", "cg"]  # both methods were checked


def test_the_backward_is_timed_with_the_call(clock):
    # CG is dearer forward (3 against 1 ms), exact dearer backward (5 against 0): with its
    # backward exact costs 6 ms and CG wins; under no_grad (no backward) exact wins.
    clock.forward = {"exact": 1.0, "cg": 3.0}
    clock.backward = {"exact": 5.0, "cg": 0.0}
    dec, z = mlp(), latents()
    calibrator = Calibrator(warmup=0, samples=2, clock=clock)
    for _ in range(5):
        _, info, _ = step(dec, z, clock, auto_calibrate=calibrator)
    assert (info.method, info.auto_decision.exact_ms, info.auto_decision.cg_ms) == ("cg", 6.0, 3.0)
    with torch.no_grad():  # another key ("nograd"): calibrated apart, on the forward alone
        for _ in range(5):
            _, info, _ = step(dec, z, clock, backward=False, auto_calibrate=calibrator)
    assert (info.method, info.auto_decision.exact_ms, info.auto_decision.cg_ms) == ("exact", 1, 3)
    # A result that gets no backward before the key's next call counts its forward alone.
    other = Calibrator(warmup=0, samples=1, clock=clock)
    for _ in range(3):
        _, info, _ = step(dec, z, clock, backward=False, auto_calibrate=other)
    assert (info.method, info.auto_decision.exact_ms, info.auto_decision.cg_ms) == ("exact", 1, 3)


@pytest.mark.parametrize(("warmup", "samples", "chosen"), [(1, 1, "exact"), (0, 2, "cg")])
def test_the_warmup_calls_are_dropped(clock, warmup, samples, chosen):
    # The first exact call costs 100 ms (compilation, caches), the next 1 ms; CG 2 ms. Dropped
    # as warm-up, exact wins on 1 ms; counted, its median (100 + 1)/2 loses to CG.
    clock.forward = {"exact": [100.0, 1.0, 1.0], "cg": 2.0}
    calibrator = Calibrator(warmup=warmup, samples=samples, clock=clock)
    dec, z = mlp(), latents()
    for _ in range(5):
        _, info, _ = step(dec, z, clock, auto_calibrate=calibrator)
    assert info.auto_decision.source == "calibrated"
    assert info.method == chosen
    assert info.auto_decision.exact_ms == (1.0 if warmup else 50.5)


def test_decisions_are_kept_per_key(clock):
    clock.forward = {"exact": 1.0, "cg": 2.0}
    calibrator = Calibrator(warmup=0, samples=1, clock=clock)
    dec = mlp()
    for _ in range(3):
        _, info, _ = step(dec, latents(B=4), clock, auto_calibrate=calibrator)
    assert info.auto_decision.source == "calibrated"
    # Another B, another d: calibrated anew; the first key keeps its decision, untimed.
    _, info, _ = step(dec, latents(B=5), clock, auto_calibrate=calibrator)
    assert (info.auto_decision.source, info.method) == ("calibrating", "exact")
    _, info, _ = step(mlp(d=3), latents(B=4, d=3), clock, auto_calibrate=calibrator)
    assert (info.auto_decision.source, info.method) == ("calibrating", "exact")
    reads = clock.reads
    _, info, _ = step(dec, latents(B=4), clock, auto_calibrate=calibrator)
    assert info.auto_decision.source == "calibrated" and clock.reads == reads
    entries = calibrator.state_dict()["entries"]
    assert len(entries) == 3
    assert sorted("method" in e for e in entries.values()) == [False, False, True]


def test_calibration_key_tells_apart_what_the_costs_depend_on():
    auto = resolve_options("auto", {})
    base = {"batching": "auto", "grad": True, "autocast": None}
    key = calibration_key(mlp(), latents(), auto, **base)
    assert key.startswith("Sequential[") and key.endswith("/B=4/d=2/K=1/float64/cpu/grad")
    # The same shapes with other weights: one key; anything the costs depend on: another.
    assert calibration_key(mlp(seed=1), latents(), auto, **base) == key
    others = [
        calibration_key(mlp(hidden=16), latents(), auto, **base),
        calibration_key(mlp(), latents(B=5), auto, **base),
        calibration_key(mlp(), latents().float(), auto, **base),
        calibration_key(mlp(), latents(), resolve_options("auto", {"probes": 2}), **base),
        calibration_key(mlp(), latents(), resolve_options("auto", {"tol": 1e-4}), **base),
        calibration_key(mlp(), latents(), resolve_options("auto", {"chunk_size": 1}), **base),
        calibration_key(mlp(), latents(), auto, **{**base, "grad": False}),
        calibration_key(mlp(), latents(), auto, **{**base, "autocast": torch.bfloat16}),
        calibration_key(mlp(), latents(), auto, **{**base, "batching": "repeat"}),
    ]
    assert len({key, *others}) == 1 + len(others)
    # A generator draws probes but costs nothing: it is not part of the key.
    drawn = resolve_options("auto", {"generator": torch.Generator()})
    assert calibration_key(mlp(), latents(), drawn, **base) == key


def test_an_exported_state_makes_the_same_choices_without_timing(clock):
    clock.forward = {"exact": 3.0, "cg": 1.0}
    calibrator = Calibrator(warmup=1, samples=1, clock=clock)
    dec, z = mlp(), latents()
    for _ in range(5):
        _, decided, _ = step(dec, z, clock, auto_calibrate=calibrator)
    assert (decided.auto_decision.source, decided.method) == ("calibrated", "cg")
    state = json.loads(json.dumps(calibrator.state_dict()))  # plain JSON values
    restored = Calibrator(clock=forbidden_clock)  # the decided key must not read it
    restored.load_state_dict(state)
    for _ in range(2):
        _, info, _ = step(dec, z, clock, auto_calibrate=restored)
        assert info.method == "cg" and info.auto_decision == decided.auto_decision
    assert restored.state_dict() == state


def test_an_exported_calibration_under_way_continues_where_it_stopped(clock):
    clock.forward = {"exact": 3.0, "cg": 1.0}
    dec, z = mlp(), latents()
    straight = Calibrator(warmup=1, samples=2, clock=clock)
    for _ in range(8):
        step(dec, z, clock, auto_calibrate=straight)
    first, clock.ran = clock.ran, []
    split = Calibrator(warmup=1, samples=2, clock=clock)
    for _ in range(3):
        step(dec, z, clock, auto_calibrate=split)
    state = json.loads(json.dumps(split.state_dict()))
    assert list(state["entries"].values()) == [
        {"calls": 3, "times": {"exact": [3.0, 3.0], "cg": [1.0]}}
    ]
    resumed = Calibrator(warmup=1, samples=2, clock=clock)
    resumed.load_state_dict(state)
    for _ in range(5):
        _, info, _ = step(dec, z, clock, auto_calibrate=resumed)
    # The same calls in the same order as without the export: exact, cg in turn for 6 calls.
    assert clock.ran == first == ["exact", "cg"] * 3 + ["cg", "cg"]
    assert resumed.state_dict() == straight.state_dict()


def test_the_environment_switch_is_read_at_each_call(clock, monkeypatch):
    monkeypatch.setattr(calibrate, "_DEFAULT", Calibrator(warmup=0, samples=1, clock=clock))
    dec, z = mlp(), latents()
    assert step(dec, z, clock)[1].auto_decision.source == "model"
    monkeypatch.setenv(CALIBRATE_ENV, "1")
    assert step(dec, z, clock)[1].auto_decision.source == "calibrating"
    monkeypatch.setenv(CALIBRATE_ENV, "0")
    assert step(dec, z, clock)[1].auto_decision.source == "model"
    monkeypatch.setenv(CALIBRATE_ENV, "on")
    assert step(dec, z, clock, auto_calibrate=False)[1].auto_decision.source == "model"
    _, info, _ = step(dec, z, clock)
    assert (info.auto_decision.source, info.method) == ("calibrating", "cg")
    # The switch applies to "auto" only: a given method runs, with no decision and no clock.
    reads = clock.reads
    _, info, _ = step(dec, z, clock, method="cg")
    assert (info.method, info.auto_decision, clock.reads) == ("cg", None, reads)
    # The process-wide decisions: exported and restored through the module functions.
    _, info, _ = step(dec, z, clock)
    assert info.auto_decision.source == "calibrated"
    state = calibrate.calibration_state()
    monkeypatch.setattr(calibrate, "_DEFAULT", Calibrator(clock=forbidden_clock))
    calibrate.load_calibration_state(state)
    assert step(dec, z, clock)[1].auto_decision == info.auto_decision
    monkeypatch.setenv(CALIBRATE_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{CALIBRATE_ENV} must be 1 or 0.*got 'maybe'"):
        step(dec, z, clock)


def test_without_calibration_auto_follows_the_fitted_model(clock):
    dec, z = mlp(), latents()
    _, info, _ = step(dec, z, clock)
    exact_ms, cg_ms = predicted_costs(2, 1, path=info.path)
    assert info.auto_decision == calibrate.AutoDecision("model", exact_ms, cg_ms)
    assert info.method == ("cg" if cg_ms < exact_ms else "exact")
    assert clock.reads == 0
    assert step(dec, z, clock, method="exact")[1].auto_decision is None


def test_a_call_that_raised_is_not_timed(clock, monkeypatch):
    clock.forward = {"exact": 2.0, "cg": 1.0}
    calibrator = Calibrator(warmup=0, samples=1, clock=clock)
    dec, z = mlp(), latents()
    exact = api.estimate_exact

    def broken(options, ctx):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(api, "estimate_exact", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        step(dec, z, clock, auto_calibrate=calibrator)
    monkeypatch.setattr(api, "estimate_exact", exact)
    methods = [step(dec, z, clock, auto_calibrate=calibrator)[1].method for _ in range(4)]
    # The failed exact call counts nothing: CG, then exact again, then the decision (CG).
    assert methods == ["cg", "exact", "cg", "cg"]


def test_bad_arguments_are_named(clock):
    dec, z = mlp(), latents()
    for method, shown in (("exact", "'exact'"), (CG(probes=2), "CG(probes=2)")):
        message = f"auto_calibrate applies to method='auto' only, got method={shown}"
        with pytest.raises(ValueError, match=re.escape(message)):
            rnf_fast.logdet_grad(dec, z, method, auto_calibrate=True)
    message = "auto_calibrate must be None, a bool or a Calibrator, got str"
    with pytest.raises(TypeError, match=message):
        rnf_fast.logdet_grad(dec, z, auto_calibrate="yes")
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -1"):
        Calibrator(warmup=-1)
    with pytest.raises(ValueError, match="samples must be a positive integer, got 0"):
        Calibrator(samples=0)
    calibrator = Calibrator()
    with pytest.raises(ValueError, match="calibration state must be a dict with format"):
        calibrator.load_state_dict({"entries": {}})
    state = {"format": calibrate.STATE_FORMAT, "version": 1, "entries": {"k": {"method": "fast"}}}
    with pytest.raises(ValueError, match="calibration state entry 'k' must be"):
        calibrator.load_state_dict(state)
    with pytest.raises(ValueError, match="version must be 1, got 2"):
        calibrator.load_state_dict({**state, "version": 2})


def test_merged_states_take_each_key_from_the_first_that_decided_it():
    def state(**entries):
        return {"format": calibrate.STATE_FORMAT, "version": 1, "entries": entries}

    under_way = {"calls": 1, "times": {"exact": [2.0], "cg": []}}
    cg = {"method": "cg", "exact_ms": 2.0, "cg_ms": 1.0}
    exact = {"method": "exact", "exact_ms": 1.0, "cg_ms": 2.0}
    merged = merge_calibration_states([state(a=under_way, b=exact), state(a=cg, b=cg, c=under_way)])
    assert merged["entries"] == {"a": cg, "b": exact, "c": under_way}


@pytest.mark.cuda
def test_calibration_on_a_cuda_device_times_with_the_device_clock():
    """On a GPU: the real clock (synchronising the device) calibrates the standard-shaped MLP,
    every calibrating call's gradient agrees with the exact one's direction, and the decision
    ends recorded with both medians."""
    device = torch.device("cuda")
    decoder = mlp(d=16, hidden=256, D=784).float().to(device)
    z0 = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).to(device)
    calibrator = Calibrator()
    exact = None
    for _ in range(2 * (1 + 3) + 1):
        _, info, z = step(decoder, z0, None, method="auto", auto_calibrate=calibrator)
        if info.method == "exact" and exact is None:
            exact = z.grad.clone()
        elif exact is not None:
            cosine = torch.nn.functional.cosine_similarity(z.grad.flatten(), exact.flatten(), 0)
            assert cosine > 0.5, (info.method, float(cosine))
    assert info.auto_decision.source == "calibrated"
    assert info.auto_decision.exact_ms > 0 and info.auto_decision.cg_ms > 0
    state = calibrator.state_dict()
    assert json.loads(json.dumps(state)) == state
