"""The source distribution builds a working rnf_fast, and setup.py's choices about rnf_fast._C.

``test_wheel_from_sdist_imports_outside_the_checkout`` goes the way of a release: an sdist from a
copy of the checkout, a wheel built from that sdist (compiling rnf_fast._C once: about a minute
on 2 cores), the wheel installed into a bare folder and imported from there by a process whose
working directory is outside the checkout. The other tests load setup.py's functions without
running ``setup()``, or build a tiny tree whose only source does not compile.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch's build tools call
SWITCHES = ("RNF_FAST_NO_EXTENSION", "RNF_FAST_REQUIRE_EXTENSION")


def _run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 300):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _env(**extra: str) -> dict[str, str]:
    """This environment without the build switches and PYTHONPATH, plus ``extra``."""
    drop = {*SWITCHES, "PYTHONPATH"}
    return {k: v for k, v in os.environ.items() if k not in drop} | extra


def _copy_checkout(dest: Path) -> Path:
    """Copy the checkout without what .gitignore names (.venv, builds, the in-place _C)."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    ignored = [p.strip().strip("/") for p in lines if p.strip() and not p.startswith("#")]
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", *ignored))
    return dest


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++ or $CXX) on PATH")
def test_wheel_from_sdist_imports_outside_the_checkout(tmp_path):
    src = _copy_checkout(tmp_path / "checkout")
    # RNF_FAST_NO_EXTENSION=1: the sources must reach the sdist through MANIFEST.in, not as the
    # sources of an extension setup.py happened to configure.
    build_sdist = "from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    out = _run(
        [sys.executable, "-c", f"import sys; {build_sdist}", str(tmp_path / "dist")],
        cwd=src, env=_env(RNF_FAST_NO_EXTENSION="1"),
    )  # fmt: skip
    sdist = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        shipped = {Path(m.name).relative_to(top).as_posix() for m in tar.getmembers()}
    wanted = [p for p in ROOT.glob("csrc/**/*") if p.is_file()] + list(ROOT.glob("kernels/*.py"))
    missing = sorted({p.relative_to(ROOT).as_posix() for p in wanted} - shipped)
    assert not missing, f"the sdist lacks {missing}"

    # RNF_FAST_REQUIRE_EXTENSION=1: a failed compile fails here, with its log.
    env = _env(RNF_FAST_REQUIRE_EXTENSION="1", MAX_JOBS="2", TMPDIR=str(tmp_path))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", "wheels", sdist],
        cwd=tmp_path, env=env, timeout=1200,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("rnf_fast-*.whl")
    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel]
    _run(install, cwd=tmp_path, env=env)

    probe = (
        "import json, rnf_fast, rnf_fast._C, rnf_fast.kernels; print(json.dumps({"
        "'_C': rnf_fast._C.__file__, 'kernels': rnf_fast.kernels.__file__, "
        "'report': rnf_fast.backend_report()}))"
    )
    out = _run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(PYTHONPATH=str(site)))
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("_C", "kernels"):  # from the installed wheel, not from the checkout
        assert Path(found[name]).resolve().is_relative_to(site.resolve()), found
    # The device code the "cupy" backend compiles at run time ships in the wheel.
    device_code = {p.relative_to(ROOT / "csrc").as_posix() for p in ROOT.glob("csrc/cuda/*.cuh")}
    device_code |= {p.name for p in ROOT.glob("csrc/*.h")}
    in_wheel = {
        p.relative_to(site / "rnf_fast/csrc").as_posix() for p in site.glob("rnf_fast/csrc/**/*")
    }
    assert device_code and device_code <= in_wheel, sorted(device_code - in_wheel)
    report = {name: (ok, detail) for name, ok, detail in found["report"]}
    assert report["cpp"][0], f"backend 'cpp' is unavailable: {report['cpp'][1]}"


@pytest.fixture
def setup_py(monkeypatch):
    """Load setup.py's functions (without running setup()) under the given build switches."""

    def load(**switches: str) -> dict:
        for name in SWITCHES:
            monkeypatch.delenv(name, raising=False)
        for name, value in switches.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(ROOT / "setup.py"), run_name="setup")

    return load


def test_without_torch_the_package_installs_without_extension(setup_py, monkeypatch):
    # `import torch` raises ImportError, as in an isolated build.
    monkeypatch.setitem(sys.modules, "torch", None)
    get_extensions = setup_py()["get_extensions"]
    with pytest.warns(UserWarning, match="pip install --no-build-isolation"):
        assert get_extensions() == []


@pytest.mark.parametrize("no_extension", ["0", "1"])
def test_required_extension_cannot_be_skipped(setup_py, monkeypatch, no_extension):
    # Skipped by RNF_FAST_NO_EXTENSION=1, or for want of torch at build time.
    monkeypatch.setitem(sys.modules, "torch", None)
    functions = setup_py(RNF_FAST_REQUIRE_EXTENSION="1", RNF_FAST_NO_EXTENSION=no_extension)
    with pytest.raises(SystemExit, match="RNF_FAST_REQUIRE_EXTENSION=1"):
        functions["get_extensions"]()


@pytest.mark.parametrize("release, warns", [("12.4", False), ("13.0", True)])
def test_nvcc_of_another_cuda_major_than_torch_warns(setup_py, tmp_path, release, warns):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.1"\n')
    nvcc.chmod(0o755)
    check_nvcc = setup_py()["check_nvcc"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_nvcc("12.8", str(tmp_path))
    text = "\n".join(str(w.message) for w in caught)
    assert (f"is CUDA {release}" in text and "built with CUDA 12.8" in text) == warns, text


def test_missing_nvcc_warns(setup_py, tmp_path):
    check_nvcc = setup_py()["check_nvcc"]
    with pytest.warns(UserWarning, match="does not run"):
        check_nvcc("12.8", str(tmp_path))


@pytest.mark.parametrize("require", ["0", "1"])
def test_failed_build_warns_or_fails(tmp_path, require):
    # A tree whose one source does not compile: the build warns and goes on, or, under
    # RNF_FAST_REQUIRE_EXTENSION=1, fails.
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "broken.cpp").write_text("#error this source does not compile\n")
    args = [sys.executable, "setup.py", "build_ext", "--build-temp", "tmp", "--build-lib", "lib"]
    env = _env(RNF_FAST_REQUIRE_EXTENSION=require)
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "rnf_fast._C is NOT built: its build failed" in proc.stderr, proc.stderr[-3000:]
    assert (proc.returncode != 0) == (require == "1"), proc.stderr[-3000:]
