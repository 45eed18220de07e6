"""The log-det engine: ``logdet_grad`` and ``logdet`` with their method options, the exact and
stochastic estimators, the ``"auto"`` cost rule, batched CG with Lanczos bookkeeping, Hutchinson
probes and CG preconditioners.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``api``            :func:`logdet_grad`, :func:`logdet`, :class:`LogdetInfo`: one argument
                   handling for both
``options``        :class:`Exact`, :class:`CG` (a method's options as an object) and the
                   mapping of the flat keywords onto them
``checks``         input and output checks; singular samples and warnings at the user's call
``estimator``      what the estimators share: the call :class:`~.estimator.Context`, the
                   :class:`~.estimator.Estimate`
``exact``          the exact estimator (Cholesky of JᵀJ) and its ``ExactInfo``
``stochastic``     the CG estimator (Hutchinson, CG, SLQ value) and its ``CGInfo``
``auto``           :func:`choose_method`, :func:`predicted_costs`, the measured cost model
``calibrate``      ``method="auto"`` timed on the device (opt-in): :class:`Calibrator`, the
                   decisions' export and import for checkpoints
``truncation``     :class:`Roulette`: CG's randomized truncation (unbiased, fewer iterations)
``cg``             batched conjugate gradients with Lanczos bookkeeping
``probes``         :func:`make_probes`
``precondition``   split preconditioners M = L Lᵀ of JᵀJ
``precision``      the mixed-precision rule: the decoder's products under the caller's
                   autocast, the engine's arithmetic outside it in float32 or float64
=================  ===========================================================================

Layer: above :mod:`rnf_fast.linearize` (the decoder's J v, Jᵀ w) and :mod:`rnf_fast.ops` (the
small numerical ops); below the models and training, which call :func:`logdet_grad`.
"""

from .api import LogdetInfo, logdet, logdet_grad
from .auto import choose_method, predicted_costs
from .calibrate import AutoDecision, Calibrator, calibration_state, load_calibration_state
from .checks import SingularJacobianError
from .options import CG, DEFAULT_CG_TOL, Exact
from .probes import make_probes
from .truncation import Roulette

__all__ = [
    "AutoDecision",
    "CG",
    "Calibrator",
    "DEFAULT_CG_TOL",
    "Exact",
    "LogdetInfo",
    "Roulette",
    "SingularJacobianError",
    "calibration_state",
    "choose_method",
    "logdet",
    "load_calibration_state",
    "logdet_grad",
    "make_probes",
    "predicted_costs",
]
