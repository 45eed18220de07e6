"""The import layers of rnf_fast: every import goes down a layer or stays inside its package.

Bottom to top::

    kernels < ops < flows < linearize < engine < models < training, evaluation < runs, machine
    < cli < rnf_fast/__init__.py (the public API, which re-exports)

- ``kernels`` (shipped as ``rnf_fast.kernels``) imports nothing of rnf_fast.
- ``checks`` (the one input check of row tensors) imports nothing of rnf_fast; every layer but
  kernels may use it, data included.
- ``data`` stands apart: it imports nothing of rnf_fast but itself; any layer above kernels may
  use it.
- ``testing`` (dense truth, closeness rule) may import ops, flows, linearize, engine and models;
  it is test support, so no library module imports it.
- ``_C``, the compiled extension, may be imported from ops up.
- Imports inside one package (``engine.api`` -> ``engine.cg``) are fine; packages that share a
  layer (training and evaluation; runs and machine) do not import each other.

The modules are parsed with ``ast``, never imported: every ``import`` and ``from … import`` counts,
at module level, inside functions and under ``if TYPE_CHECKING:``, with relative imports resolved,
and so do ``importlib.import_module`` calls whose name starts with a literal.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder of the checkout -> the package it is installed as (setup.py's package_dir).
PACKAGES = {"rnf_fast": ROOT / "rnf_fast", "rnf_fast.kernels": ROOT / "kernels"}

API = "rnf_fast"  # the layer of rnf_fast/__init__.py
RANK = {
    "kernels": 0,
    "ops": 1,
    "flows": 2,
    "linearize": 3,
    "engine": 4,
    "models": 5,
    "training": 6,
    "evaluation": 6,
    "runs": 7,
    "machine": 7,
    "cli": 8,
    API: 9,
}
EXTENSION = "_C"
DATA = "data"
CHECKS = "checks"
TESTING = "testing"
TESTING_MAY_IMPORT = {"ops", "flows", "linearize", "engine", "models", EXTENSION}
KNOWN = set(RANK) | {EXTENSION, DATA, CHECKS, TESTING}


@dataclass(frozen=True)
class Edge:
    """One import of ``imported`` (the ``names`` of a ``from … import``) by the module
    ``importer``, at ``path``:``line``."""

    importer: str
    imported: str
    path: str
    line: int
    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        names = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}{names}"


def layer(module: str) -> str | None:
    """The layer of a dotted module name: the package below ``rnf_fast`` (``rnf_fast`` itself
    for the public API); None outside rnf_fast."""
    parts = module.split(".")
    if parts[0] != "rnf_fast":
        return None
    return API if len(parts) == 1 else parts[1]


def library_sources() -> dict[str, tuple[str, str]]:
    """{module name: (path relative to the checkout, source)} of every module of the library."""
    sources = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            sources[name] = (str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    return sources


def _resolve(module: str, path: str, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import …`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if Path(path).name != "__init__.py":  # a module's package is its parent
        base = base[:-1]
    if level - 1 >= len(base):
        raise ValueError(f"{path}: a relative import goes above the top-level package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _literal_prefix(node: ast.expr) -> str | None:
    """The literal start of a string or f-string expression, if any."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            # Only the dotted part before the formatted field is known: "rnf_fast.data.{m}".
            return first.value.rpartition(".")[0]
    return None


def imports(module: str, path: str, source: str, known: set[str]) -> list[Edge]:
    """Every import in a module's source, at any depth, as absolute module names.

    ``from package import name`` counts as an import of ``package.name`` when that is a module
    in ``known`` (a submodule), else of ``package``.
    """
    edges = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            edges += [Edge(module, alias.name, path, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node.level, node.module)
            found: dict[str, list[str]] = {}
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.setdefault(sub if sub in known else base, []).append(alias.name)
            edges += [Edge(module, m, path, node.lineno, tuple(n)) for m, n in found.items()]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            prefix = _literal_prefix(node.args[0]) if called == "import_module" else None
            edges += [Edge(module, prefix, path, node.lineno)] if prefix else []
    return edges


def violation(edge: Edge) -> str | None:
    """Why an import breaks the layers; None when it is allowed."""
    if edge.imported == "kernels" or edge.imported.startswith("kernels."):
        return "a top-level kernels: import rnf_fast.kernels"
    source, target = layer(edge.importer), layer(edge.imported)
    if target is None or target == source:
        return None  # outside rnf_fast, or inside one package
    for name in (source, target):
        if name not in KNOWN:
            return f"rnf_fast.{name} belongs to no layer: give it one in tests/test_layers.py"
    if source == CHECKS:
        return "checks imports nothing of rnf_fast"
    if target == CHECKS:
        return "kernels imports nothing of rnf_fast" if source == "kernels" else None
    if source == DATA:
        return "data imports nothing of rnf_fast but data"
    if target == TESTING:
        return "testing is test support: no library module imports it"
    if source == TESTING:
        allowed = ", ".join(sorted(TESTING_MAY_IMPORT))
        return None if target in TESTING_MAY_IMPORT else f"testing may import only {allowed}"
    if target == DATA:
        return "kernels imports nothing of rnf_fast" if source == "kernels" else None
    if target == EXTENSION:
        return None if RANK[source] >= RANK["ops"] else "only ops and above import _C"
    if RANK[target] < RANK[source]:
        return None
    if RANK[target] == RANK[source]:
        return f"{source} and {target} share a layer: neither imports the other"
    return f"a back-edge: {target} is above {source}"


def back_edges(sources: dict[str, tuple[str, str]]) -> list[str]:
    """Every import among ``sources`` ({module: (path, source)}) that breaks the layers."""
    known = set(sources) | {"rnf_fast._C"}
    found = []
    for module, (path, source) in sources.items():
        for edge in imports(module, path, source, known):
            reason = violation(edge)
            if reason is not None:
                found.append(f"{edge}: {reason}")
    return found


def test_no_import_runs_back_up_a_layer():
    sources = library_sources()
    assert "rnf_fast.kernels.cg" in sources and "rnf_fast.engine.api" in sources
    found = back_edges(sources)
    assert not found, f"{len(found)} import(s) break the layers:\n" + "\n".join(found)


def test_every_package_of_the_library_has_a_layer():
    layers = {layer(module) for module in library_sources()}
    assert layers <= KNOWN, f"modules without a layer: {sorted(layers - KNOWN)}"


def _flagged(module: str, code: str, path: str | None = None) -> list[str]:
    """The layer violations of one synthetic module (``path``: where it would live)."""
    path = path or module.replace(".", "/") + ".py"
    return back_edges({module: (path, code)})


def test_the_check_flags_back_edges_at_any_depth():
    # A module-level back-edge, relative.
    (edge,) = _flagged("rnf_fast.ops.fast", "from ..engine.api import logdet\n")
    assert edge.startswith("rnf_fast/ops/fast.py:1: rnf_fast.ops.fast imports rnf_fast.engine.api")
    assert "back-edge" in edge
    # Inside a function, absolute, from kernels (which imports nothing of rnf_fast).
    code = "import torch\n\n\ndef f():\n    from rnf_fast.ops.reference import CGState\n"
    (edge,) = _flagged("rnf_fast.kernels.cg", code, "kernels/cg.py")
    assert edge.startswith("kernels/cg.py:5: rnf_fast.kernels.cg imports rnf_fast.ops.reference")
    # Under TYPE_CHECKING, in a package __init__ (relative to the package itself).
    code = "if TYPE_CHECKING:\n    from ..training import train\n"
    (edge,) = _flagged("rnf_fast.models", code, "rnf_fast/models/__init__.py")
    assert "imports rnf_fast.training" in edge
    # The public API from inside the library, and a dynamic import with a literal name.
    assert len(_flagged("rnf_fast.engine.api", "from rnf_fast import logdet_grad\n")) == 1
    code = 'importlib.import_module(f"rnf_fast.cli.{name}")\n'
    assert len(_flagged("rnf_fast.flows.base", code)) == 1


def test_the_check_flags_the_special_rules():
    assert _flagged("rnf_fast.data.synthetic", "from ..ops import reference\n")
    assert _flagged("rnf_fast.engine.cg", "from .. import testing\n")
    assert _flagged("rnf_fast.testing", "from .training import train\n")
    assert _flagged("rnf_fast.kernels", "from .. import _C\n", "kernels/__init__.py")
    assert _flagged("rnf_fast.training.trainer", "from ..evaluation import evaluate\n")
    assert _flagged("rnf_fast.benchmarks", "from .ops import reference\n")  # no layer
    assert _flagged("rnf_fast.engine.api", "from .. import baselines\n")  # no layer
    assert _flagged("rnf_fast.ops.triton", "import kernels.linear\n")  # the top-level name
    assert _flagged("rnf_fast.checks", "from .ops import reference\n")
    assert _flagged(
        "rnf_fast.kernels.cg", "from rnf_fast.checks import check_rows\n", "kernels/cg.py"
    )


def test_the_check_allows_imports_down_and_sideways():
    allowed = {
        "rnf_fast.linearize.flows": "from ..flows.base import Flow\nfrom .modules import f\n",
        "rnf_fast.ops.cpp": "from .. import _C\nfrom ..kernels import allow_triton\n",
        "rnf_fast.runs": "from .data import load_dataset\nfrom .training import train\n",
        "rnf_fast.testing": "from .ops import reference\nfrom .engine.api import logdet\n",
        "rnf_fast.data.images": "from rnf_fast.data.registry import Dataset\nimport torch\n",
        "rnf_fast.data.synthetic": "from rnf_fast.checks import check_rows\n",
        "rnf_fast": "from .engine.api import logdet_grad\nfrom . import models\n",
        "rnf_fast.cli": "from .machine import machine_info\nfrom .runs import train_run\n",
    }
    for module, code in allowed.items():
        path = "rnf_fast/__init__.py" if module == "rnf_fast" else None
        assert _flagged(module, code, path) == [], module
