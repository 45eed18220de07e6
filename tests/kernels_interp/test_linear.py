"""scaled_linear (Triton, interpreted) against its PyTorch reference and a float64 truth."""

import pytest
import torch
from rnf_fast.kernels.linear import scaled_linear

from rnf_fast.ops import reference
from rnf_fast.testing import assert_within_2x

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
