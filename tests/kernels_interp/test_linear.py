"""scaled_linear (Triton, interpreted) against its PyTorch reference and a float64 truth."""

import pytest
import torch
from rnf_fast.kernels import linear, tuning
from rnf_fast.kernels.linear import scaled_linear

from rnf_fast.ops import reference
from rnf_fast.testing import assert_within_2x

from .spies import KernelSpy, count_timings

# (B, K, n_in, n_out): masked edges on every axis, several tiles of rows (B·K > 64), of outputs
# (n_out > 64) and of the reduction (n_in > 32), exact powers of two, a narrow d -> 16 layer.
SHAPES = [(3, 5, 7, 13), (2, 1, 33, 70), (1, 3, 16, 16), (5, 17, 3, 1), (2, 4, 64, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("scaled", [True, False])
def test_scaled_linear_matches_reference(shape, transpose, scaled):
    B, K, n_in, n_out = shape
    X = torch.randn(B, K, n_out if transpose else n_in)
    W = torch.randn(n_out, n_in)
    S = torch.rand(B, n_out) + 0.5 if scaled else None
    got = scaled_linear(X, W, S, transpose=transpose)
    ref = reference.scaled_linear(X, W, S, transpose=transpose)
    S64 = None if S is None else S.double()
    truth = reference.scaled_linear(X.double(), W.double(), S64, transpose=transpose)
    assert got.dtype == torch.float32
    assert_within_2x(f"scaled_linear{shape} transpose={transpose}", got, ref, truth)


@pytest.mark.parametrize("transpose", [False, True])
def test_scaled_linear_takes_a_strided_weight(transpose):
    # A weight stored transposed (W = Wt.T, non-contiguous) is read through its strides.
    B, K, n_in, n_out = 2, 3, 20, 40
    W = torch.randn(n_in, n_out).T
    X = torch.randn(B, K, n_out if transpose else n_in)
    S = torch.rand(B, n_out)
    got = scaled_linear(X, W, S, transpose=transpose)
    ref = reference.scaled_linear(X, W, S, transpose=transpose)
    truth = reference.scaled_linear(X.double(), W.double(), S.double(), transpose=transpose)
    assert_within_2x("scaled_linear strided W", got, ref, truth)


def test_scaled_linear_rejects_bad_input():
    X, W, S = torch.randn(2, 3, 4), torch.randn(5, 4), torch.rand(2, 5)
    with pytest.raises(ValueError, match=r"X must be \(B, K, 4\)"):
        scaled_linear(torch.randn(2, 3, 5), W, S)
    with pytest.raises(ValueError, match="S must be"):
        scaled_linear(X, W, torch.rand(2, 4))
    with pytest.raises(ValueError, match="S must be"):
        scaled_linear(torch.randn(2, 3, 5), W, torch.rand(2, 4), transpose=True)
    with pytest.raises(ValueError, match="W must be"):
        scaled_linear(X, torch.randn(5), S)
    with pytest.raises(TypeError, match="W must be float32"):
        scaled_linear(X, W.double(), S)


# ---------------------------------------------------------------- call-time switches
# The interpreter computes every tl.dot with numpy in float32 whatever input_precision says
# (Triton 3.7's interpreter reads no TF32 rounding): the tf32x3 runs below check the plumbing
# (the switch reaches the kernel, every tile gives the right answer), not tf32x3's accuracy,
# which only a GPU run measures (bench/gpu_bench.py, kernels section).


def _problem(B, K, n_in, n_out, transpose):
    X = torch.randn(B, K, n_out if transpose else n_in)
    W = torch.randn(n_out, n_in)
    S = torch.rand(B, n_out) + 0.5
    truth = reference.scaled_linear(X.double(), W.double(), S.double(), transpose=transpose)
    return (X, W, S), reference.scaled_linear(X, W, S, transpose=transpose), truth


@pytest.mark.parametrize("precision", tuning.PRECISIONS)
@pytest.mark.parametrize("transpose", [False, True])
def test_scaled_linear_each_precision(precision, transpose):
    args, ref, truth = _problem(3, 5, 150, 40, transpose)  # two reduction segments
    got = scaled_linear(*args, transpose=transpose, precision=precision)
    assert_within_2x(f"scaled_linear {precision}", got, ref, truth)


@pytest.mark.parametrize(
    "precision, config",
    [(p, c) for p in tuning.PRECISIONS for c in linear.AUTOTUNE_CONFIGS[p]],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_scaled_linear_each_autotune_config(precision, config, transpose):
    # Masked edges on every axis of every tile, two reduction segments of 128.
    args, ref, truth = _problem(3, 13, 150, 70, transpose)
    got = scaled_linear(*args, transpose=transpose, precision=precision, config=config)
    assert_within_2x(f"scaled_linear {precision} {config}", got, ref, truth)


def test_scaled_linear_reads_the_precision_switch_at_each_call(monkeypatch):
    spy = KernelSpy(linear._scaled_linear_kernel)
    monkeypatch.setattr(linear, "_scaled_linear_kernel", spy)
    args = _problem(2, 3, 20, 40, False)[0]
    monkeypatch.delenv(tuning.PRECISION_ENV, raising=False)
    scaled_linear(*args)
    monkeypatch.setenv(tuning.PRECISION_ENV, "tf32x3")
    scaled_linear(*args)
    scaled_linear(*args, precision="ieee")  # the argument wins over the variable
    assert [k["INPUT_PRECISION"] for k in spy.launches] == ["ieee", "tf32x3", "ieee"]
    # Unset, the default tiles of today: 64 rows, 64 outputs (N = 40 > 32), 8 warps.
    first = spy.launches[0]
    assert (first["BLOCK_M"], first["BLOCK_N"], first["BLOCK_R"], first["num_warps"]) == (
        64,
        64,
        32,
        8,
    )
    monkeypatch.setenv(tuning.PRECISION_ENV, "tf32")
    with pytest.raises(ValueError, match="RNF_FAST_TRITON_PRECISION must be one of"):
        scaled_linear(*args)
    with pytest.raises(ValueError, match="precision must be one of"):
        scaled_linear(*args, precision="fp16")


def test_scaled_linear_autotunes_once_per_shape(monkeypatch, fresh_tuning):
    # RNF_FAST_TRITON_AUTOTUNE=1, read at the call: every configuration of the set is timed on
    # the first call for a shape, none on the second; the result is right either way.
    timed = count_timings(monkeypatch, tuning)
    spy = KernelSpy(linear._scaled_linear_kernel)
    monkeypatch.setattr(linear, "_scaled_linear_kernel", spy)
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.delenv(tuning.PRECISION_ENV, raising=False)
    args, ref, truth = _problem(2, 3, 33, 20, True)
    last = []
    for _ in range(2):
        got = scaled_linear(*args, transpose=True)
        assert_within_2x("scaled_linear autotuned", got, ref, truth)
        k = spy.launches[-1]
        last.append((k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_R"], k["num_warps"]))
    assert len(timed) == len(linear.AUTOTUNE_CONFIGS["ieee"])
    (choice,) = tuning.tuned_choices().values()
    assert choice in linear.AUTOTUNE_CONFIGS["ieee"]
    assert last == [choice, choice]  # the result comes from the chosen tiles
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    scaled_linear(*_problem(2, 3, 34, 20, True)[0], transpose=True)  # a new shape, not tuned
    assert len(timed) == len(linear.AUTOTUNE_CONFIGS["ieee"])
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="RNF_FAST_TRITON_AUTOTUNE must be 0 or 1"):
        scaled_linear(*args, transpose=True)


def test_scaled_linear_rejects_an_unchecked_config():
    # Only configurations the sm_90 compile check covers may launch.
    args = _problem(2, 3, 20, 40, False)[0]
    with pytest.raises(ValueError, match="config must be one of"):
        scaled_linear(*args, config=(128, 128, 32, 8))
    with pytest.raises(ValueError, match="config must be one of"):
        scaled_linear(*args, precision="ieee", config=(64, 128, 16, 8))  # tf32x3's alone
