"""coupling_tangent / coupling_cotangent (Triton, interpreted) against their PyTorch
references and a float64 truth."""

import pytest
import torch
from rnf_fast.kernels.coupling import coupling_cotangent, coupling_tangent

from rnf_fast.ops import reference
from rnf_fast.testing import assert_within_2x

# (B, K, m, P): affine (P = 2) with m past one block of 1024 features, P = 1, a spline-like
# P = 23 (one block of 32), P = 70 (three chunks of 32, the last masked), P = 8 exactly, P = 0.
SHAPES = [
    (2, 3, 5, 2),
    (2, 2, 1100, 2),
    (3, 2, 7, 1),
    (2, 2, 37, 23),
    (2, 3, 40, 70),
    (2, 3, 64, 8),
    (2, 1, 4, 0),
]


def _factors(B, K, m, P):
    return torch.rand(B, m) + 0.5, torch.randn(B, m, P)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_coupling_tangent_matches_reference(shape, packed):
    B, K, m, P = shape
    dy_dx, dy_dtheta = _factors(*shape)
    dx_t, dtheta = torch.randn(B, K, m), torch.randn(B, K, m, P)
    args = (dx_t, dtheta, dy_dx, dy_dtheta)
    got = coupling_tangent(*args, packed=packed)
    ref = reference.coupling_tangent(*args)
    truth = reference.coupling_tangent(*(a.double() for a in args))
    assert_within_2x(f"coupling_tangent{shape}", got, ref, truth)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_coupling_cotangent_matches_reference(shape, packed):
    B, K, m, P = shape
    dy_dx, dy_dtheta = _factors(*shape)
    dy_t = torch.randn(B, K, m)
    dx_t, dtheta = coupling_cotangent(dy_t, dy_dx, dy_dtheta, packed=packed)
    ref_x, ref_theta = reference.coupling_cotangent(dy_t, dy_dx, dy_dtheta)
    true_x, true_theta = reference.coupling_cotangent(
        dy_t.double(), dy_dx.double(), dy_dtheta.double()
    )
    assert_within_2x(f"coupling_cotangent{shape} dx", dx_t, ref_x, true_x)
    if P > 0:
        assert_within_2x(f"coupling_cotangent{shape} dtheta", dtheta, ref_theta, true_theta)
    assert dtheta.shape == (B, K, m, P)


def test_coupling_reads_strided_factors():
    # Factors sliced out of a wider buffer (non-contiguous) give the same result.
    B, K, m, P = 2, 3, 6, 2
    buf = torch.randn(B, 2 * m, P)
    dy_dtheta, dy_dx = buf[:, ::2], torch.rand(B, 2 * m)[:, 1::2]
    dx_t, dtheta = torch.randn(B, K, m), torch.randn(B, K, m, P)
    got = coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta)
    ref = reference.coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta)
    truth = reference.coupling_tangent(
        dx_t.double(), dtheta.double(), dy_dx.double(), dy_dtheta.double()
    )
    assert_within_2x("coupling_tangent strided", got, ref, truth)


def test_coupling_rejects_bad_input():
    dy_dx, dy_dtheta = torch.rand(2, 5), torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match="dy_dx must be"):
        coupling_cotangent(torch.randn(2, 3, 5), torch.rand(2, 4), dy_dtheta)
    with pytest.raises(ValueError, match="dy_dtheta must be"):
        coupling_cotangent(torch.randn(2, 3, 5), dy_dx, torch.randn(2, 5))
    with pytest.raises(ValueError, match="dtheta must be"):
        coupling_tangent(torch.randn(2, 3, 5), torch.randn(2, 3, 5, 3), dy_dx, dy_dtheta)
    with pytest.raises(ValueError, match="dy_t must be"):
        coupling_cotangent(torch.randn(2, 5), dy_dx, dy_dtheta)
    with pytest.raises(TypeError, match="dy_dx must be float32"):
        coupling_cotangent(torch.randn(2, 3, 5), dy_dx.double(), dy_dtheta)
