"""Build script: the Python package, its Triton kernels, and the optional extension rnf_fast._C.

The extension is compiled from csrc/ with torch's build tools against the torch it will load
into, so install with ``pip install --no-build-isolation .`` (``-e .`` in a checkout) into an
environment that already has torch. It is a CppExtension, or a CUDAExtension when torch is a
CUDA build and a CUDA toolkit is found (CUDA_HOME).

The extension is optional: without torch at build time (an isolated build), or when the compile
fails, a warning says why and the package installs without it, on its PyTorch fallback.
Environment switches:

    RNF_FAST_NO_EXTENSION=1       skip the extension
    RNF_FAST_REQUIRE_EXTENSION=1  a skipped or failed extension build is an error, and so is a
                                  build without CUDA when torch is a CUDA build
"""

import glob
import os
import re
import subprocess
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE = os.environ.get("RNF_FAST_REQUIRE_EXTENSION", "0") == "1"
FALLBACK = "rnf_fast installs without it and runs its PyTorch fallback."


def warn(message: str) -> None:
    """Warn so that it stands out in a build log. A Python warning, not a print: pip shows the
    warnings of a build even where it hides the build's output (without -v)."""
    rule = "!" * 78
    warnings.warn(f"\n{rule}\n{message}\n{rule}", stacklevel=2)


def not_built(reason: str, consequence: str = FALLBACK) -> None:
    """Warn that (part of) the extension is not built; under RNF_FAST_REQUIRE_EXTENSION=1, fail."""
    if REQUIRE:
        raise SystemExit(f"error: {reason}\n(an error because RNF_FAST_REQUIRE_EXTENSION=1)")
    warn(f"{reason}\n{consequence}")


def check_nvcc(torch_cuda: str, cuda_home: str) -> None:
    """Warn when CUDA_HOME's nvcc and torch differ in CUDA major version (or nvcc does not run):
    the usual cause of a failed CUDA build."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        warn(f"{nvcc} does not run ({exc}): the CUDA build of rnf_fast._C will fail")
        return
    found = re.search(r"release (\d+)\.(\d+)", out.stdout)
    major = torch_cuda.split(".")[0]
    if found and found[1] != major:
        warn(
            f"nvcc in CUDA_HOME={cuda_home} is CUDA {found[1]}.{found[2]}, torch was built with "
            f"CUDA {torch_cuda}: the major versions differ and the CUDA build of rnf_fast._C "
            f"will most likely fail. Point CUDA_HOME at a CUDA {major} toolkit."
        )


def get_extensions() -> list:
    """The extension rnf_fast._C: a CUDAExtension with a CUDA torch and toolkit, else a
    CppExtension; none when skipped."""
    if os.environ.get("RNF_FAST_NO_EXTENSION", "0") == "1":
        if REQUIRE:
            raise SystemExit("error: RNF_FAST_REQUIRE_EXTENSION=1 and RNF_FAST_NO_EXTENSION=1")
        return []
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=HERE))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
    if not sources:
        not_built("rnf_fast._C is NOT built: csrc/*.cpp is missing.")
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError as exc:
        not_built(
            f"rnf_fast._C is NOT built: torch is not importable at build time ({exc}), as in "
            "an isolated build. To build the extension, install torch first, then rnf_fast "
            "with `pip install --no-build-isolation`."
        )
        return []
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None
    if use_cuda and CUDA_HOME is None:
        not_built(
            f"rnf_fast._C is built WITHOUT CUDA: torch is a CUDA {torch.version.cuda} build "
            "but no CUDA toolkit was found (set CUDA_HOME).",
            "CUDA tensors run the PyTorch fallback.",
        )
        use_cuda = False
    if use_cuda:
        check_nvcc(torch.version.cuda, CUDA_HOME)
    # OpenMP: at::parallel_for splits the systems over torch's threads (it shares torch's
    # libgomp), and `omp simd` vectorises the kernels' reductions.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extension = CUDAExtension if use_cuda else CppExtension
    return [
        extension(
            "rnf_fast._C",
            sources + (cuda_sources if use_cuda else []),
            define_macros=[("RNF_FAST_WITH_CUDA", None)] if use_cuda else [],
            extra_compile_args={"cxx": ["-O3", *openmp], "nvcc": ["-O3"]},
            extra_link_args=openmp,
        )
    ]


def get_cmdclass(extensions: list) -> dict:
    """torch's build_ext, turning a failed build into a warning (an error under REQUIRE)."""
    if not extensions:
        return {}
    from torch.utils.cpp_extension import BuildExtension, is_ninja_available

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:
                not_built(
                    f"rnf_fast._C is NOT built: its build failed ({type(exc).__name__}: {exc}). "
                    "The compiler output is above (`pip install -v` shows it)."
                )

    # ninja compiles the sources in parallel (MAX_JOBS); without it, one after another, and
    # quietly (torch's build would warn that it falls back).
    return {"build_ext": OptionalBuildExtension.with_options(use_ninja=is_ninja_available())}


if __name__ == "__main__":  # as pip and `python setup.py` run it; tests import its functions
    extensions = get_extensions()
    setup(
        packages=[
            "rnf_fast",
            "rnf_fast.data",
            "rnf_fast.engine",
            "rnf_fast.evaluation",
            "rnf_fast.flows",
            "rnf_fast.kernels",
            "rnf_fast.linearize",
            "rnf_fast.models",
            "rnf_fast.ops",
            "rnf_fast.training",
            "rnf_fast.csrc",
        ],
        package_dir={
            "rnf_fast": "rnf_fast",
            "rnf_fast.kernels": "kernels",
            "rnf_fast.csrc": "csrc",
        },
        # The CUDA device code, for the "cupy" backend to compile at run time (NVRTC) from a wheel.
        package_data={"rnf_fast.csrc": ["*.h", "cuda/*.cuh"]},
        ext_modules=extensions,
        cmdclass=get_cmdclass(extensions),
    )
