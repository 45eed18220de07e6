"""The ``method="auto"`` rule: the cost model against the measured step times, the decision
against the model, and the path a decoder is costed on."""

from dataclasses import replace

import pytest
import torch

import rnf_fast
from rnf_fast.engine import api, auto
from rnf_fast.engine.auto import AUTO_MEASURED_MS, choose_method, predicted_costs


def test_choose_method_follows_the_cost_model_and_the_model_the_measurements(monkeypatch):
    # The shipped model against the measured times: at every measured (path, d, K) the choice is
    # the faster method, or a near-tie where it costs at most 15% more (the timings themselves
    # move by a few percent between runs); all 28 points pick the faster one.
    agree = total = 0
    for path, rows in AUTO_MEASURED_MS.items():
        for d, exact_ms, cg1_ms, cg4_ms in rows:
            for K, cg_ms in ((1, cg1_ms), (4, cg4_ms)):
                chosen = choose_method(d, K, path=path)
                regret = (cg_ms if chosen == "cg" else exact_ms) / min(exact_ms, cg_ms)
                assert regret <= 1.15, (path, d, K, chosen, regret)
                agree += regret == 1.0
                total += 1
    assert (agree, total) == (28, 28)
    # The decision follows predicted_costs, which reads AUTO_COST_MODEL at call time: make the
    # cheaper method 1 ms dearer than the other and the decision flips, both ways.
    for path, d, before, after in (("explicit", 64, "cg", "exact"), ("generic", 16, "exact", "cg")):
        exact, cg = predicted_costs(d, 1, path=path)
        assert choose_method(d, 1, path=path) == before == ("cg" if cg < exact else "exact")
        costs = auto.AUTO_COST_MODEL[path]
        if before == "cg":
            costs = replace(costs, cg=replace(costs.cg, fixed=costs.cg.fixed + exact - cg + 1.0))
        else:
            costs = replace(
                costs, exact=replace(costs.exact, fixed=costs.exact.fixed + cg - exact + 1.0)
            )
        with monkeypatch.context() as m:
            m.setitem(auto.AUTO_COST_MODEL, path, costs)
            assert choose_method(d, 1, path=path) == after
            assert rnf_fast.choose_method(d, 1, path=path) == after
    # Probes cost: 4 probes make CG dearer; fewer expected matvecs (a preconditioner, a warm
    # start) can only favour CG, more only exact.
    assert choose_method(16, 1, path="generic") == "exact"
    assert choose_method(64, 1, path="explicit") == "cg"
    assert choose_method(16, 4, path="explicit") == "exact"
    assert choose_method(16, 4, path="explicit", matvecs=2) == "cg"
    assert choose_method(64, 4, path="explicit") == "cg"
    assert choose_method(64, 1, path="explicit", matvecs=500) == "exact"
    # Outside the measured range the nearest measured d decides.
    assert predicted_costs(2, 1, path="explicit") == predicted_costs(4, 1, path="explicit")
    assert choose_method(2, 1, path="explicit") == "exact"
    with pytest.raises(ValueError, match="path must be one of"):
        choose_method(8, 1, path="cuda")


class _Linear:
    """A decoder z -> z Wᵀ with its own linearization (no torch.func)."""

    def __init__(self, W, path):
        self.W, self.path = W, path

    def __call__(self, z):
        return z @ self.W.T

    def linearize(self, z):
        return _OwnLinearization(self.W, z, self.path)


class _OwnLinearization:
    def __init__(self, W, z, path):
        self.W, self.z, self.out = W, z, (z @ W.T).detach()
        if path is not None:
            self.path = path

    def jvp(self, V, *, create_graph=False):
        out = V @ self.W.T
        return out if create_graph else out.detach()

    def vjp(self, C):
        return C @ self.W

    def gram_mv(self, V):
        JV = self.jvp(V)
        return JV, self.vjp(JV)


@pytest.mark.parametrize("declared", ["explicit", "generic", None])
def test_auto_costs_a_decoder_by_the_path_its_linearization_declares(monkeypatch, declared):
    seen = []

    def spy(d, K, *, path, matvecs=None):
        seen.append((d, K, path))
        return "exact"

    monkeypatch.setattr(api, "choose_method", spy)
    W = torch.randn(7, 3, dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    _, info = rnf_fast.logdet_grad(_Linear(W, declared), z, probes=2, return_info=True)
    path = declared or "generic"
    assert seen == [(3, 2, path)] and info.path == path and info.method == "exact"
