"""Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before Triton is first imported, so these tests run in their
own process: ``TRITON_INTERPRET=1 python -m pytest tests/kernels_interp`` (which
tests/test_triton_kernels.py launches from the normal run). Without the variable, or without
Triton, nothing here is collected, and the normal run never imports Triton through them.
"""

import importlib.util
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def fresh_tuning():
    """rnf_fast.kernels.tuning with no remembered choice, before the test and after it."""
    from rnf_fast.kernels import tuning

    tuning.clear_tuned()
    yield tuning
    tuning.clear_tuned()
