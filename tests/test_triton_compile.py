"""Every Triton kernel, in every configuration its launcher can choose, compiles for sm_90.

No GPU is needed: ``triton.compile`` with an explicit target runs the whole pipeline down to a
cubin (Triton ships ptxas). The interpreter accepts what a GPU compile rejects (tl.dot with a
dimension under 16, non-power-of-two blocks), so this check stands beside the interpreted tests.
It runs in a subprocess without TRITON_INTERPRET (this file executed as a script) and in a
fresh cache, so nothing is skipped as already compiled.

Each compiled kernel is also assembled by Triton's ptxas with ``-v``: a configuration that spills
registers fails the check. Its PTX must use tensor cores (mma.sync or wgmma) exactly where the
configuration asks for them: the tf32x3 input precision of RNF_FAST_TRITON_PRECISION must, IEEE
products (the default) and the kernels without tl.dot must not.

It runs once per Triton install present: the environment's own, and Triton 3.6.0 (what the GPU
machine runs) from the folder ``triton-3.6`` of the environment (``.venv/triton-3.6``, put there by
scripts/setup.sh), first on the subprocess's PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = ("cuda", 90, 32)  # sm_90 (H100/H200), warp size 32
TRITON_36 = Path(sys.prefix) / "triton-3.6"


def _pointer(dtype) -> str:
    import torch

    return "*" + {torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def configurations() -> list[tuple[str, object, dict, dict, int]]:
    """(label, kernel, signature, constexprs, num_warps) for every configuration the launchers
    of rnf_fast.kernels can launch: the fixed tiles and the autotuned sets, in every input
    precision of RNF_FAST_TRITON_PRECISION where the kernel has a float32 tl.dot."""
    import torch
    from rnf_fast.kernels import cg, coupling, gram, linear, tuning

    configs = []
    f32 = "*fp32"
    for precision in tuning.PRECISIONS:
        for tiles in linear.AUTOTUNE_CONFIGS[precision]:  # the default tiles among them
            block_m, block_n, block_r, num_warps = tiles
            for transpose in (False, True):
                for has_scale in (False, True):
                    sig = {a: f32 for a in ("x_ptr", "w_ptr", "s_ptr", "y_ptr")}
                    sig |= {a: "i32" for a in ("M", "N", "R", "K", "stride_wr", "stride_wn")}
                    const = {
                        "HAS_SCALE": has_scale,
                        "TRANSPOSE": transpose,
                        "BLOCK_M": block_m,
                        "BLOCK_N": block_n,
                        "BLOCK_R": block_r,
                        "BLOCK_SEG": linear.BLOCK_SEG,
                        "INPUT_PRECISION": precision,
                    }
                    label = (
                        f"scaled_linear {precision} tiles={tiles} transpose={transpose} "
                        f"scale={has_scale}"
                    )
                    configs.append((label, linear._scaled_linear_kernel, sig, const, num_warps))
    for transpose in (False, True):
        for packed in (False, True):
            for block_p in coupling.BLOCK_P_CHOICES:
                names = ("t_ptr", "th_ptr", "dx_ptr", "dth_ptr", "out_ptr", "out_th_ptr")
                sig = {a: f32 for a in names} | {a: "i32" for a in ("K", "m", "P", "rows")}
                const = {
                    "TRANSPOSE": transpose,
                    "PACKED": packed,
                    "BLOCK_M": coupling.BLOCK_ELEMENTS // block_p,
                    "BLOCK_P": block_p,
                }
                label = f"coupling transpose={transpose} packed={packed} BLOCK_P={block_p}"
                configs.append((label, coupling._coupling_kernel, sig, const, 4))
    for dtype, choices in gram.AUTOTUNE_CONFIGS.items():
        # float64 has no tl.dot: its launcher always passes "ieee".
        precisions = tuning.PRECISIONS if dtype == torch.float32 else ("ieee",)
        for tiles in choices:  # the fixed tiles among them
            block_i, block_d, num_warps = tiles
            for precision in precisions:
                sig = {"j_ptr": _pointer(dtype), "a_ptr": _pointer(dtype)}
                sig |= {a: "i32" for a in ("D", "d", "stride_jb", "stride_jD", "stride_jd")}
                const = {
                    "USE_DOT": dtype == torch.float32,
                    "BLOCK_I": block_i,
                    "BLOCK_D": block_d,
                    "INPUT_PRECISION": precision,
                }
                label = f"gram {dtype} {precision} tiles={tiles}"
                configs.append((label, gram._gram_kernel, sig, const, num_warps))
    for dtype in cg.DTYPES:
        for block_d in cg.BLOCK_D_CHOICES:
            fp = _pointer(dtype)
            sig = {a: fp for a in ("x_ptr", "r_ptr", "p_ptr", "ap_ptr", "rr_ptr", "bb_ptr")}
            sig |= {"active_ptr": "*i1", "breakdown_ptr": "*i1", "steps_ptr": "*i64"}
            sig |= {a: fp for a in ("alphas_ptr", "betas_ptr", "alpha_ptr")}
            sig |= {a: "i32" for a in ("N", "d", "max_iter", "it")} | {"tol2": "fp64"}
            const = {"BLOCK_N": cg.BLOCK_ELEMENTS // block_d, "BLOCK_D": block_d}
            label = f"cg_update {dtype} BLOCK_D={block_d}"
            configs.append((label, cg._cg_update_kernel, sig, const, cg.NUM_WARPS[dtype]))
    return configs


# A tensor-core instruction in the PTX: mma.sync (Ampere-style) or wgmma (Hopper warpgroups).
_MMA = re.compile(r"^\s*(@!?%p\d+\s+)?(wgmma\.mma_async|mma\.sync)", re.MULTILINE)


def tensor_core_mismatch(const: dict, ptx: str) -> str | None:
    """None when the PTX uses tensor cores exactly where the configuration asks for them:
    tf32x3 must (mma or wgmma instructions), IEEE products and the kernels without tl.dot
    must not (they run on the FMA units)."""
    wanted = const.get("INPUT_PRECISION") == "tf32x3"
    found = _MMA.search(ptx) is not None
    if found == wanted:
        return None
    return "no mma/wgmma instruction in the PTX" if wanted else "mma/wgmma in IEEE PTX"


def compile_one(kernel, sig: dict, const: dict, num_warps: int) -> str | None:
    """Compile one configuration for the target; None on success, else the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = sig | {name: "constexpr" for name in const}
    try:
        src = ASTSource(fn=kernel, signature=sig, constexprs=const)
        compiled = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": num_warps})
    except Exception as exc:  # report every failing configuration, not the first
        return f"{type(exc).__name__}: {exc}"[:2000]
    if not compiled.asm.get("cubin"):
        return "no cubin produced"
    return tensor_core_mismatch(const, compiled.asm["ptx"]) or register_spills(compiled.asm["ptx"])


def register_spills(ptx: str) -> str | None:
    """None when ptxas (Triton's own) assembles the kernel without spilling registers to local
    memory, else what it reported: a spill turns every accumulator update into memory traffic."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [
                get_ptxas(TARGET[1]).path,
                "--gpu-name",
                f"sm_{TARGET[1]}a",
                "-v",
                str(src),
                "-o",
                str(Path(tmp) / "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return f"ptxas failed: {report[-1000:]}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    if not spills:
        return f"no spill report from ptxas -v: {report[-500:]}"
    return f"spills registers: {report.strip()[-500:]}" if max(spills) > 0 else None


def control_rejected() -> bool:
    """Whether the check has teeth: scaled_linear with a reduction block of 8 (which the
    interpreter runs) must fail to compile (tl.dot needs every dimension >= 16)."""
    label, kernel, sig, const, num_warps = configurations()[0]
    return compile_one(kernel, sig, const | {"BLOCK_R": 8}, num_warps) is not None


def _installed_triton() -> str | None:
    """The version of the environment's own Triton, None without one."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


ENV_TRITON = _installed_triton()
TRITON_INSTALLS = [
    pytest.param(
        None,
        ENV_TRITON,
        id="env",
        marks=pytest.mark.skipif(ENV_TRITON is None, reason="Triton is not installed"),
    ),
    pytest.param(
        TRITON_36,
        "3.6.0",
        id="triton-3.6",
        marks=pytest.mark.skipif(
            not TRITON_36.is_dir(),
            reason=f"no {TRITON_36}: scripts/setup.sh installs triton==3.6.0 there",
        ),
    ),
]


@pytest.mark.parametrize("triton_path, version", TRITON_INSTALLS)
def test_every_kernel_configuration_compiles_for_sm90(tmp_path, triton_path, version):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = [str(triton_path)] if triton_path is not None else []
    env |= {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    env |= {"PYTHONPATH": os.pathsep.join([*path, str(ROOT)])}
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["triton"] == version, f"the check imported Triton {result['triton']}"
    assert result["control_rejected"], (
        "a tl.dot with a reduction block of 8 compiled: the check proves nothing"
    )
    assert result["compiled"] >= 79, result
    # The tensor-core check has teeth both ways: tf32x3 configurations (mma/wgmma required)
    # and IEEE ones (none allowed) were both compiled.
    assert result["tf32x3"] >= 20 and result["compiled"] - result["tf32x3"] >= 20, result
    assert not result["failures"], "\n".join(f"{k}: {v}" for k, v in result["failures"].items())


if __name__ == "__main__":
    start = time.perf_counter()
    failures = {}
    configs = configurations()
    for label, *config in configs:
        error = compile_one(*config)
        if error is not None:
            failures[label] = error
    import triton

    result = {
        "triton": triton.__version__,
        "target": list(TARGET),
        "compiled": len(configs) - len(failures),
        "tf32x3": sum(c[3].get("INPUT_PRECISION") == "tf32x3" for c in configs),
        "failures": failures,
        "control_rejected": control_rejected(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1))
