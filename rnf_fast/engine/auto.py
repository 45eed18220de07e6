"""The ``method="auto"`` rule: the cheaper of exact and CG under a measured cost model.

The exact path costs one primal and d tangents pushed together (and their backward), then JᵀJ
and A⁻¹Jᵀ (d² D per sample); CG costs K differentiable tangents, m batched matvecs (a JVP and a
VJP for K probes each) and the Lanczos eigen-solves. :data:`AUTO_COST_MODEL` gives both in
milliseconds per path, fitted to the step times of :data:`AUTO_MEASURED_MS`, with m from
:data:`AUTO_EXPECTED_MATVECS` (``bench/study_auto.py``, ``bench/results/auto.md``). A decoder is
costed on the ``"explicit"`` path when its linearization declares ``path = "explicit"``
(cached factors: a matvec costs no primal), on the ``"generic"`` path otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AUTO_COST_MODEL",
    "AUTO_EXPECTED_MATVECS",
    "AUTO_MEASURED_MS",
    "CGCost",
    "CostPath",
    "ExactCost",
    "PathCosts",
    "choose_method",
    "predicted_costs",
]

CostPath = Literal["explicit", "generic"]


@dataclass(frozen=True)
class ExactCost:
    """Step time of the exact path in ms at B = 64: fixed + per_tangent·d + per_tangent_pair·d².

    Attributes:
        fixed: the primal and the call's overhead.
        per_tangent: one tangent pushed through the decoder, and its backward.
        per_tangent_pair: JᵀJ and A⁻¹Jᵀ (d² D per sample).
    """

    fixed: float
    per_tangent: float
    per_tangent_pair: float

    def ms(self, d: float) -> float:
        """Predicted time at latent dimension d."""
        return self.fixed + self.per_tangent * d + self.per_tangent_pair * d * d


@dataclass(frozen=True)
class CGCost:
    """Step time of the CG path in ms at B = 64:
    fixed + per_probe·K + m·(per_matvec + per_probe_matvec·K) + lanczos·K·m³ + ends·K·m·d.

    Attributes:
        fixed: the primal and the call's overhead.
        per_probe: the differentiable tangent of one probe, and its backward.
        per_matvec: the fixed part of one batched matvec (on the generic path it re-runs the
            primal).
        per_probe_matvec: the per-probe part of one batched matvec.
        lanczos: the Lanczos eigen-solves of the quadrature (m³ per system).
        ends: the d-wide ends of each product (K·m·d).
    """

    fixed: float
    per_probe: float
    per_matvec: float
    per_probe_matvec: float
    lanczos: float
    ends: float

    def ms(self, d: float, K: int, m: float) -> float:
        """Predicted time at latent dimension d, K probes and m batched matvecs."""
        return (
            self.fixed
            + self.per_probe * K
            + m * (self.per_matvec + self.per_probe_matvec * K)
            + self.lanczos * K * m**3
            + self.ends * K * m * d
        )


@dataclass(frozen=True)
class PathCosts:
    """The cost of both methods on one linearization path."""

    exact: ExactCost
    cg: CGCost


AUTO_COST_MODEL: dict[str, PathCosts] = {
    "explicit": PathCosts(
        exact=ExactCost(fixed=2.06, per_tangent=0.3865, per_tangent_pair=0.002816),
        cg=CGCost(
            fixed=1.939,
            per_probe=0.4453,
            per_matvec=0.1783,
            per_probe_matvec=0.1506,
            lanczos=1.283e-05,
            ends=1.075e-03,
        ),
    ),
    "generic": PathCosts(
        exact=ExactCost(fixed=3.274, per_tangent=0.4882, per_tangent_pair=0.005054),
        cg=CGCost(
            fixed=4.64,
            per_probe=0.4192,
            per_matvec=1.257,
            per_probe_matvec=0.3899,
            lanczos=1.424e-05,
            ends=1.365e-03,
        ),
    ),
}
"""Step times of each method per path, fitted (non-negative least squares on relative error) to
:data:`AUTO_MEASURED_MS`. Per matvec the generic path pays about 1.3 ms (it re-runs the
primal), the explicit one about 0.18 ms plus 0.15 per probe."""

AUTO_MEASURED_MS: dict[str, tuple[tuple[int, float, float, float], ...]] = {
    "explicit": (
        (4, 3.5, 3.6, 7.1),
        (8, 5.6, 4.5, 9.1),
        (16, 9.3, 5.6, 11.7),
        (32, 17.8, 7.1, 14.7),
        (64, 37.6, 10.6, 26.8),
        (128, 86.6, 40.3, 123.3),
        (256, 322.6, 336.2, 1536.9),
    ),
    "generic": (
        (4, 5.1, 11.3, 17.9),
        (8, 7.8, 15.5, 26.1),
        (16, 13.0, 20.8, 32.5),
        (32, 24.6, 25.7, 43.3),
        (64, 52.3, 42.1, 71.9),
        (128, 138.2, 136.7, 298.1),
        (256, 502.8, 717.8, 2118.5),
    ),
}
"""Measured step times (d, exact ms, CG K = 1 ms, CG K = 4 ms) of one training step of the log
det term: MLP decoder d -> 256 -> 256 -> 784, B = 64, float32, quiet 2-core CPU, methods
interleaved in one run (``bench/study_auto.py --time``, ``bench/results/auto.md``). The cost
model picks the faster method at all 28 of these points, and on the three rectangular flows of
``bench/step_cost.py`` (whole ML steps: exact for the d = 1 von Mises flow, CG for the
MINIBOONE-shaped flow and the MNIST preset), which it was not fitted to. For another decoder
or device, ``auto_calibrate=True`` times both methods instead
(:mod:`rnf_fast.engine.calibrate`)."""

AUTO_EXPECTED_MATVECS: tuple[tuple[int, float], ...] = (
    (4, 4.0),
    (8, 6.3),
    (16, 9.0),
    (32, 12.0),
    (64, 20.3),
    (128, 71.0),
    (256, 256.0),
)
"""Batched matvecs of CG (K = 1, default tolerance, mean of 3 probe draws) against d on the
standard MLP problem (bench/study_auto.py; K = 4 needs up to 10% more). A trained digits flow
(d = 10) needs 8.25 (bench/results/precond.md)."""


def _interp_log2(table: tuple[tuple[int, float], ...], d: float) -> float:
    x = math.log2(min(max(d, table[0][0]), table[-1][0]))
    for (d0, y0), (d1, y1) in zip(table, table[1:]):
        if x <= math.log2(d1):
            t = (x - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
            return y0 + t * (y1 - y0)
    return table[-1][1]


def predicted_costs(
    d: int, K: int, *, path: str = "generic", matvecs: float | None = None
) -> tuple[float, float]:
    """Predicted step times (exact, cg) in ms at B = 64 from :data:`AUTO_COST_MODEL`.

    Arguments:
        d: latent dimension, clamped to the measured range 4..256.
        K: probes per sample of CG.
        path: ``"explicit"`` or ``"generic"``.
        matvecs: CG's batched matvecs m; default: :data:`AUTO_EXPECTED_MATVECS` at d.

    Returns:
        (exact ms, cg ms).

    Example:
        >>> exact, cg = predicted_costs(64, 1, path="explicit")
        >>> cg < exact
        True
    """
    if path not in AUTO_COST_MODEL:
        raise ValueError(f"path must be one of {sorted(AUTO_COST_MODEL)}, got {path!r}")
    d = min(max(d, AUTO_EXPECTED_MATVECS[0][0]), AUTO_EXPECTED_MATVECS[-1][0])
    m = _interp_log2(AUTO_EXPECTED_MATVECS, d) if matvecs is None else float(matvecs)
    costs = AUTO_COST_MODEL[path]
    return costs.exact.ms(d), costs.cg.ms(d, K, m)


def choose_method(
    d: int, K: int, *, path: str = "generic", matvecs: float | None = None
) -> Literal["exact", "cg"]:
    """The ``method="auto"`` rule: the method with the lower :func:`predicted_costs`.

    On the explicit path CG with K = 1 wins from d = 8 to 128 (exact below, and at 256 where CG
    needs d matvecs), with K = 4 at d = 32 to 64; on the generic ``torch.func`` path exact wins
    except with K = 1 at d = 64 and 128 (:data:`AUTO_MEASURED_MS`). Outside d = 4..256 the
    decision at the nearest measured d is used.

    Arguments:
        d: latent dimension.
        K: probes per sample the stochastic path would use.
        path: ``"explicit"`` (a linearization with cached factors) or ``"generic"``.
        matvecs: expected CG matvecs, if known better than the default (e.g. with a
            preconditioner, or from an earlier step's ``LogdetInfo.cg.matvecs``).

    Returns:
        ``"exact"`` or ``"cg"``.

    Example:
        >>> choose_method(16, 1, path="explicit"), choose_method(16, 1, path="generic")
        ('cg', 'exact')
    """
    exact, cg = predicted_costs(d, K, path=path, matvecs=matvecs)
    return "cg" if cg < exact else "exact"
