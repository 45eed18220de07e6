"""Build script: the Python package, its Triton kernels, and the optional extension rnf_fast._C.

The extension is built from csrc/ when sources exist there: CppExtension by default,
CUDAExtension when a CUDA toolchain and a CUDA build of torch are present. It is optional: a
failed build (no compiler, say) warns and installs the package without it. Set
RNF_FAST_NO_EXTENSION=1 to skip it; the package then runs on its PyTorch fallback.
"""

import glob
import os
import sys

from setuptools import setup


def get_extensions():
    """Return the list of extensions to build (empty when there is nothing to build)."""
    if os.environ.get("RNF_FAST_NO_EXTENSION", "0") == "1":
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))
    if not cpu_sources:
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    rel = [os.path.relpath(p, here) for p in cpu_sources]
    # OpenMP: at::parallel_for splits the systems over torch's threads (it shares torch's
    # libgomp), and `omp simd` vectorises the kernels' reductions.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx, link = ["-O3", *openmp], openmp
    if use_cuda:
        rel += [os.path.relpath(p, here) for p in cuda_sources]
        return [
            CUDAExtension(
                "rnf_fast._C",
                rel,
                define_macros=[("RNF_FAST_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                extra_link_args=link,
                optional=True,
            )
        ]
    # optional: a machine without a working compiler still installs, on the PyTorch fallback.
    return [
        CppExtension(
            "rnf_fast._C", rel, extra_compile_args=cxx, extra_link_args=link, optional=True
        )
    ]


def get_cmdclass():
    if not get_extensions():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        """torch's BuildExtension, but a missing or failing compiler skips rnf_fast._C."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                print(
                    f"WARNING: rnf_fast._C was not built ({type(exc).__name__}: {exc}); "
                    "rnf_fast installs without it and runs its PyTorch fallback",
                    file=sys.stderr,
                )

    return {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


setup(
    packages=[
        "rnf_fast",
        "rnf_fast.data",
        "rnf_fast.evaluation",
        "rnf_fast.flows",
        "rnf_fast.kernels",
        "rnf_fast.models",
        "rnf_fast.training",
    ],
    package_dir={"rnf_fast": "rnf_fast", "rnf_fast.kernels": "kernels"},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
)
