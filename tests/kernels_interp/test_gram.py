"""gram (Triton, interpreted) against rnf_fast.ops.reference.gram and an exact or float64 truth."""

import pytest
import torch
from rnf_fast.kernels import gram as gram_kernels
from rnf_fast.kernels import tuning
from rnf_fast.kernels.gram import gram

from rnf_fast.ops import reference
from rnf_fast.testing import assert_within_2x

from .spies import KernelSpy, count_timings

# (B, D, d): masked tiles (d = 5, 17), several tiles per sample (d = 70 in float32, d = 40 in
# float64), an exact power of two, D below, at and past the chunk of D.
SHAPES = [(3, 37, 5), (2, 100, 16), (2, 33, 17), (1, 20, 70), (2, 8, 40), (1, 1, 3)]


def _dyadic(shape):
    """Entries k / 2^10 with |k| < 2^10: products are multiples of 2^-20 below 1 in magnitude,
    so any sum of fewer than 2^33 of them is exact in float64: JᵀJ in float64 is the truth."""
    return torch.randint(-1023, 1024, shape, dtype=torch.float64) / 1024


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_float32(shape):
    J = torch.randn(shape)
    assert_within_2x(f"gram{shape} float32", gram(J), reference.gram(J), reference.gram(J.double()))


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_float64_is_exact_on_dyadic_data(shape):
    J = _dyadic(shape)
    got = gram(J)
    assert got.dtype == torch.float64
    assert torch.equal(got, reference.gram(J)), "float64 gram must be exact on dyadic data"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_reads_a_transposed_slice(dtype):
    # The engine passes JT[:, :, s : s + block].transpose(1, 2): J strided, not contiguous.
    JT = _dyadic((3, 6, 300)).to(dtype)
    J = JT[:, :, 40:297].transpose(1, 2)
    assert not J.is_contiguous()
    truth = reference.gram(J.double())
    assert_within_2x(f"gram strided {dtype}", gram(J), reference.gram(J), truth)


def test_gram_rejects_bad_input():
    with pytest.raises(ValueError, match=r"J must be \(B, D, d\)"):
        gram(torch.randn(4, 3))
    with pytest.raises(TypeError, match="J must be float32 or float64"):
        gram(torch.randn(2, 4, 3).half())


# ---------------------------------------------------------------- call-time switches
# The interpreter ignores tl.dot's input_precision (numpy float32 products whatever it says):
# the tf32x3 runs check that every tile and precision gives the right answer through the same
# launcher, not tf32x3's accuracy, which only a GPU run measures (bench/gpu_bench.py).

AUTOTUNE_CASES = [
    (dtype, precision, config)
    for dtype, choices in gram_kernels.AUTOTUNE_CONFIGS.items()
    for precision in (tuning.PRECISIONS if dtype == torch.float32 else ("ieee",))
    for config in choices
]


@pytest.mark.parametrize("dtype, precision, config", AUTOTUNE_CASES)
def test_gram_each_autotune_config(dtype, precision, config):
    # d = 37: masked tiles (and several of them) for every BLOCK_I; D = 70: a masked chunk.
    if dtype == torch.float64:
        J = _dyadic((2, 70, 37))
        got = gram(J, config=config)
        assert torch.equal(got, reference.gram(J)), f"{config}: float64 gram must be exact"
    else:
        J = torch.randn(2, 70, 37)
        got = gram(J, precision=precision, config=config)
        truth = reference.gram(J.double())
        assert_within_2x(f"gram {precision} {config}", got, reference.gram(J), truth)


def test_gram_reads_the_precision_switch_at_each_call(monkeypatch):
    # float32 passes the switch to tl.dot; float64 (no tl.dot) always compiles as "ieee".
    spy = KernelSpy(gram_kernels._gram_kernel)
    monkeypatch.setattr(gram_kernels, "_gram_kernel", spy)
    J = torch.randn(2, 40, 20)
    monkeypatch.delenv(tuning.PRECISION_ENV, raising=False)
    gram(J)
    monkeypatch.setenv(tuning.PRECISION_ENV, "tf32x3")
    gram(J)
    gram(J.double())
    assert [k["INPUT_PRECISION"] for k in spy.launches] == ["ieee", "tf32x3", "ieee"]
    # The fixed tiles of today: the first BLOCK_I >= d = 20 of each dtype.
    assert [(k["BLOCK_I"], k["BLOCK_D"], k["num_warps"]) for k in spy.launches] == [
        (32, 32, 4),
        (32, 32, 4),
        (32, 2, 4),
    ]
    monkeypatch.setenv(tuning.PRECISION_ENV, "TF32x3")
    with pytest.raises(ValueError, match="RNF_FAST_TRITON_PRECISION must be one of"):
        gram(J.double())  # checked in float64 too: a typo never passes unseen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_autotunes_once_per_shape(monkeypatch, fresh_tuning, dtype):
    timed = count_timings(monkeypatch, tuning)
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    J = _dyadic((2, 33, 17)).to(dtype)
    for _ in range(2):
        got = gram(J)
        assert_within_2x("gram autotuned", got, reference.gram(J), reference.gram(J.double()))
    choices = gram_kernels.AUTOTUNE_CONFIGS[dtype]
    assert len(timed) == len(choices)
    (choice,) = tuning.tuned_choices().values()
    assert choice in choices
    gram(J, autotune=False)  # the argument wins over the variable
    gram(J[:, :, :16], autotune=False)  # a new shape, not tuned
    assert len(timed) == len(choices)


def test_gram_rejects_an_unchecked_config():
    with pytest.raises(ValueError, match="config must be one of"):
        gram(torch.randn(2, 8, 4), config=(16, 8, 4))  # a float64 tile: tl.dot needs 16
