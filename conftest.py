"""pytest configuration of the checkout: the ``>>>`` examples of the library run as doctests.

``--doctest-modules`` (set in pyproject.toml) collects doctests from the library only, the
modules under ``rnf_fast/`` and ``kernels/``: the tests and the benchmark scripts hold no
examples and are not imported for them. Each library module is imported by its package name, so
``kernels/`` is the ``rnf_fast.kernels`` the tests use, not a second, top-level ``kernels``; a
kernel module that needs Triton is skipped where Triton is not installed. Every example runs
with torch seeded, in an empty temporary working directory, so nothing lands in the checkout.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch
from _pytest.doctest import DoctestModule  # not exported by pytest; DoctestItem is

ROOT = Path(__file__).resolve().parent
# Folder of the checkout -> the package it is installed as (setup.py's package_dir).
LIBRARY = {ROOT / "rnf_fast": "rnf_fast", ROOT / "kernels": "rnf_fast.kernels"}


def library_module(path: Path) -> str | None:
    """The dotted name of the library module in the file ``path``; None outside the library."""
    path = path.resolve()
    for folder, package in LIBRARY.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join((package, *parts))
    return None


class LibraryDoctests(DoctestModule):
    """The doctests of one library module, imported by its package name."""

    def _getobj(self) -> ModuleType:
        name = library_module(self.path)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                raise
            pytest.skip(f"{name} needs Triton, which is not installed", allow_module_level=True)
        if Path(module.__file__).resolve() != self.path.resolve():
            raise ImportError(
                f"{name} imports from {module.__file__}, not from the checkout's {self.path}: "
                "install the checkout in editable mode (pip install -e .)"
            )
        return module


class LibraryPackage(pytest.Package):
    """A library package: its ``__init__`` holds no ``setup_module`` to run, so it is not
    imported by path (which would import ``kernels/`` a second time, as ``kernels``)."""

    def setup(self) -> None:
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector):
    """Collect the library's packages as :class:`LibraryPackage`."""
    outcome = yield
    node = outcome.get_result()
    if type(node) is pytest.Package and library_module(path / "__init__.py") is not None:
        outcome.force_result(LibraryPackage.from_parent(parent, path=path))


@pytest.hookimpl(hookwrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Keep doctest collection to the library, importing each module by its package name."""
    outcome = yield
    nodes = []
    for node in outcome.get_result():
        if type(node) is DoctestModule:
            if library_module(file_path) is None:
                continue
            node = LibraryDoctests.from_parent(parent, path=file_path)
        nodes.append(node)
    outcome.force_result(nodes)


@pytest.fixture(autouse=True)
def _doctest_sandbox(request: pytest.FixtureRequest) -> None:
    """Doctests only: seed torch and run in an empty temporary working directory."""
    if isinstance(request.node, pytest.DoctestItem):
        torch.manual_seed(0)
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
