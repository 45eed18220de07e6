"""The machine and software rnf_fast runs on: what ``rnf-fast info`` prints and what every
benchmark result records (the benchmark harness in ``bench/`` adds the commit).

Top layer, beside :mod:`rnf_fast.cli`: it reads the backends from :mod:`rnf_fast.ops` and the
Triton version from the package metadata (Triton itself is not imported).
"""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from .ops.cpp import unavailable_reason
from .ops.dispatch import available_backends

__all__ = ["machine_info"]


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    """An installed distribution's version, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    """Describe the machine and the software a measurement runs on.

    Returns:
        ``{"rnf_fast", "cpu", "backends", "extension", "triton_used", "threads", "gpu",
        "torch", "triton", "python"}``: rnf_fast's installed version (None when it runs
        without package metadata), the CPU model, its usable backends (fastest first),
        whether the compiled extension ``rnf_fast._C`` loads, whether a backend that runs the
        Triton kernels (``"triton"``, ``"cupy"``) is usable, torch's intra-op threads, the
        CUDA device's name (None without one), and the torch, Triton (None when absent) and
        Python versions.
    """
    backends = available_backends()
    return {
        "rnf_fast": _version("rnf_fast"),
        "cpu": _cpu_name(),
        "backends": backends,
        "extension": unavailable_reason() is None,
        "triton_used": "triton" in backends or "cupy" in backends,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
    }
