"""Build rnf_fast._C in place, from setup.py's own extension list, without pyproject.toml.

bench/gpu_check.sh runs this in a staging copy of the package (rnf_fast/ with kernels/ as
rnf_fast/kernels, csrc/, setup.py) when ``pip install --no-build-isolation -e .`` fails, for
instance on a machine whose setuptools is too old for the project's pyproject.toml (its
``license = "MIT"`` needs setuptools >= 77). setup.py is run with ``setuptools.setup`` captured,
so the extension (CppExtension or CUDAExtension, flags, sources) is defined in one place; the
build itself is a plain ``build_ext --inplace`` in the current folder.

    cd STAGE && RNF_FAST_REQUIRE_EXTENSION=1 python3 -P path/to/bench/gpu_build.py
"""

from __future__ import annotations

import glob
import runpy
import sys

import setuptools


def captured_setup_arguments(path: str = "setup.py") -> dict:
    """The keyword arguments setup.py passes to ``setuptools.setup``, without running it."""
    captured: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        setuptools.setup = real
    return captured


def main() -> int:
    args = captured_setup_arguments()
    extensions = args.get("ext_modules") or []
    if not extensions:
        print("gpu_build: setup.py defines no extension here (RNF_FAST_NO_EXTENSION set?)")
        return 1
    for ext in extensions:
        kind = "CUDA" if any(s.endswith(".cu") for s in ext.sources) else "C++ only"
        print(f"gpu_build: {ext.name} ({kind}, {len(ext.sources)} sources)")
    setuptools.setup(
        name="rnf_fast",
        ext_modules=extensions,
        cmdclass=args.get("cmdclass", {}),
        script_args=["build_ext", "--inplace"],
    )
    built = glob.glob("rnf_fast/_C*.so") + glob.glob("rnf_fast/_C*.pyd")
    if not built:
        print("gpu_build: no rnf_fast/_C library was produced")
        return 1
    print(f"gpu_build: built {built[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
