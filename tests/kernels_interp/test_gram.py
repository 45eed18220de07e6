"""gram (Triton, interpreted) against rnf_fast.ops.reference.gram and an exact or float64 truth."""

import pytest
import torch
from rnf_fast.kernels.gram import gram

from rnf_fast.ops import reference
from rnf_fast.testing import assert_within_2x

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
