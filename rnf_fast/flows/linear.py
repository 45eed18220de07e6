"""Linear flows: fixed feature permutations and an LU-parametrised invertible linear layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Flow, check_channels, check_input, check_positive

__all__ = ["LULinear", "Permutation", "Reverse"]


class _FixedPermutation(Flow):
    """y[:, i] = x[:, perm[i]] along dimension 1 for a fixed perm (n,) kept as a buffer."""

    def __init__(self, perm: Tensor) -> None:
        super().__init__()
        self.num_features = len(perm)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Permute: x (B, n) or (B, C, H, W) -> (y (same shape), zeros (B,))."""
        check_channels("x", x, self.num_features)
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the permutation: y (B, n) or (B, C, H, W) -> (x (same shape), zeros (B,))."""
        check_channels("y", y, self.num_features)
        return y.index_select(1, self.inverse_perm), y.new_zeros(y.shape[0])


class Permutation(_FixedPermutation):
    """A fixed random permutation of the features: y[:, i] = x[:, perm[i]] (log|det| = 0).

    The permutation is a buffer, saved with the ``state_dict``. Acts on dimension 1, so on the
    channels of an image (B, C, H, W).

    Arguments:
        num_features: n for x (B, n), or C for x (B, C, H, W).
        generator: source of the random permutation (the global generator when None).
    """

    def __init__(self, num_features: int, *, generator: torch.Generator | None = None) -> None:
        check_positive("num_features", num_features)
        super().__init__(torch.randperm(num_features, generator=generator))


class Reverse(_FixedPermutation):
    """The permutation that reverses the order of the features (log|det| = 0).

    Arguments:
        num_features: n for x (B, n), or C for x (B, C, H, W).
    """

    def __init__(self, num_features: int) -> None:
        check_positive("num_features", num_features)
        super().__init__(torch.arange(num_features - 1, -1, -1))


class LULinear(Flow):
    """The invertible affine map y = W x + b with W = L (U + diag(s)), identity at initialisation.

    L is unit lower-triangular, U strictly upper-triangular and s = exp(log_s) > 0, so
    log|det W| = Σ log_s and the inverse is two triangular solves. The permutation factor P of a
    full PLU parametrisation is left to a neighbouring ``Permutation`` layer (the builders put
    one before each ``LULinear``); W itself has det > 0.

    Arguments:
        features: n, the width of x (B, n).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        check_positive("features", features)
        self.features = features
        self.lower = nn.Parameter(torch.zeros(features, features))
        self.upper = nn.Parameter(torch.zeros(features, features))
        self.log_s = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def factors(self) -> tuple[Tensor, Tensor]:
        """The triangular factors: L (n, n) unit lower, and U + diag(s) (n, n) upper."""
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, -1) + eye
        U = torch.triu(self.upper, 1) + torch.diag(torch.exp(self.log_s))
        return L, U

    def weight(self) -> Tensor:
        """W = L (U + diag(s)), (n, n)."""
        L, U = self.factors()
        return L @ U

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply y = W x + b: x (B, n) -> (y (B, n), logabsdet (B,))."""
        check_input("x", x, (self.features,))
        y = x @ self.weight().T + self.bias
        return y, self.log_s.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Apply x = W⁻¹ (y - b): y (B, n) -> (x (B, n), logabsdet (B,))."""
        check_input("y", y, (self.features,))
        L, U = self.factors()
        # Rows: x Uᵀ Lᵀ = y - b; solve with Lᵀ (upper, unit) then Uᵀ (lower).
        z = torch.linalg.solve_triangular(
            L.T, y - self.bias, upper=True, left=False, unitriangular=True
        )
        x = torch.linalg.solve_triangular(U.T, z, upper=False, left=False)
        return x, -self.log_s.sum().expand(y.shape[0])
