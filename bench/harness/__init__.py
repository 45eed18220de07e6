"""The benchmark harness of rnf_fast (lives in the repository's bench/, not in the package).

- :mod:`.problems`: the named problem sizes, each a decoder, latents and the float64 truth.
- :mod:`.baselines`: the competitors: the autodiff Jacobians, the official code's algorithm,
  the free-form surrogate.
- :mod:`.contenders`: the one registry of contenders, the training step, the one check
  against the truth (:func:`verify`).
- :mod:`.measure`: the suite (:func:`run_suite`, :func:`run_case`), the one memory probe
  (:func:`peak_memory`), the machine and commit (:func:`machine_info`).
- :mod:`.report`: the one report: Markdown and plots from a suite or pytest-benchmark JSON.

Import it as ``harness`` with bench/ on ``sys.path``: a script run as ``python bench/X.py``
has it there, pytest puts it there for bench/'s tests, and ``rnf-fast bench`` adds the bench/
of the checkout its package was installed from.
"""

from .contenders import (
    STUDY_CONTENDERS,
    Contender,
    contenders,
    step_closure,
    suite_contenders,
    verify,
)
from .measure import SUITE_BUDGET_S, machine_info, peak_memory, run_case, run_suite
from .problems import PROBLEMS, STUDY_D, SUITES, Problem, ProblemSpec, flow_decoder, make_problem
from .report import markdown, plots

__all__ = [
    "PROBLEMS",
    "STUDY_CONTENDERS",
    "STUDY_D",
    "SUITES",
    "SUITE_BUDGET_S",
    "Contender",
    "Problem",
    "ProblemSpec",
    "contenders",
    "flow_decoder",
    "machine_info",
    "make_problem",
    "markdown",
    "peak_memory",
    "plots",
    "run_case",
    "run_suite",
    "step_closure",
    "suite_contenders",
    "verify",
]
