"""``import rnf_fast`` loads the log-det engine and nothing heavy it does not need at once.

torch._dynamo (pulled in by ``torch.compiler.disable`` at decoration time, and with it Triton
and sympy) cost about a second, as much as torch itself; matplotlib and the trainer load on
first use. The time is measured by bench/import_time.py, not here: this test checks what is
loaded, which does not depend on the machine's load.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch._dynamo", "triton", "sympy", "matplotlib", "rnf_fast.training", "rnf_fast.models")


def _loaded_after(code: str) -> list[str]:
    listing = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    probe = f"{code}\nimport sys, json\n{listing}"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_rnf_fast_loads_nothing_heavy():
    assert _loaded_after("import rnf_fast") == []


def test_a_logdet_call_loads_nothing_heavy_either():
    code = (
        "import torch, rnf_fast\n"
        "from rnf_fast.testing import mlp_decoder\n"
        "rnf_fast.logdet_grad(mlp_decoder(2, 4), torch.randn(3, 2).double(), method='cg').sum()"
    )
    assert _loaded_after(code) == []


def test_logdet_grad_is_excluded_from_compilation_once_dynamo_is_loaded():
    # The lazily applied torch.compiler.disable: a compiled caller breaks its graph at the
    # call (dynamo reports it) and the call runs eagerly with the same value.
    import torch
    import torch._dynamo

    import rnf_fast
    from rnf_fast.testing import mlp_decoder

    dec = mlp_decoder(2, 4).double()
    z = torch.randn(3, 2, dtype=torch.float64)

    def f(z):
        return rnf_fast.logdet_grad(dec, z * 1.0, method="exact").sum()

    explanation = torch._dynamo.explain(f)(z)
    assert explanation.graph_break_count >= 1
    assert any("disable" in str(b.reason) for b in explanation.break_reasons)
    compiled = torch.compile(f, backend="eager")
    torch.testing.assert_close(compiled(z), f(z))
