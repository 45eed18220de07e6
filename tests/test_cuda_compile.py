"""Every CUDA source of rnf_fast._C compiles for sm_90 with the bare toolkit (no torch, no GPU).

The .cu files include only their own torch-free headers, so ``nvcc -c`` checks them in about a
second each wherever nvcc exists; the CUDA build of the extension needs a CUDA build of torch.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_SOURCES = sorted((Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    if candidate is not None and candidate.exists():
        return str(candidate)
    return shutil.which("nvcc")


NVCC = _nvcc()


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/*.cu is empty"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_every_cuda_source_compiles_for_sm90(tmp_path):
    # Started together: the compiles overlap on a 2-core machine (about 2 s in all).
    runs = {
        src.name: subprocess.Popen(
            [
                NVCC,
                "-c",
                "-std=c++17",
                "-arch=sm_90",
                "-Werror=all-warnings",
                str(src),
                "-o",
                str(tmp_path / f"{src.stem}.o"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in CUDA_SOURCES
    }
    failures = {}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures[name] = out
    assert not failures, "nvcc failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in failures.items())
