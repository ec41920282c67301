"""``direct``: the explicit curvature matrix and its eigendecomposition (exact; small blocks only)."""

from __future__ import annotations

import torch

from ..errors import InfluenceLensError
from .base import Grads, InverseCurvature
from .ops import curvature_matrix, flatten, n_params, shapes, unflatten


class DirectInverse(InverseCurvature):
    """Builds ``H`` (``p × p``) exactly, then ``H = V diag(μ) Vᵀ`` so ``(H + λI)⁻¹ g = V diag(1/(μ+λ)) Vᵀ g``.

    Options: ``max_params`` (default 20 000): larger blocks are refused, since the matrix takes ``4p²``
    bytes and the eigendecomposition ``O(p³)`` time. Changing ``λ`` afterwards costs nothing.
    """

    name = "direct"

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", max_params: int = 20_000):
        super().__init__(regularization, curvature, max_params=max_params)
        self.max_params = int(max_params)
        self.eigenvalues: torch.Tensor | None = None  # (p,) float64
        self.eigenvectors: torch.Tensor | None = None  # (p, p) float32, columns
        self._shapes: dict[str, torch.Size] = {}

    def fit(self, model, params, batches, n_samples, progress=None):
        p = n_params(params)
        if p > self.max_params:
            raise InfluenceLensError(
                f"Method 'direct' would build a {p:,} × {p:,} curvature matrix ({4 * p * p / 2**30:.1f} GiB); "
                f"it is limited to blocks of {self.max_params:,} parameters.",
                "use method cg, arnoldi or ekfac for this scope, or scope 'head'",
            )
        matrix = curvature_matrix(model, params, batches, n_samples, self.curvature, progress)
        values, vectors = torch.linalg.eigh(matrix)
        self.eigenvalues, self.eigenvectors = values, vectors.float()
        self._shapes = shapes(params)
        return self

    def solve(self, grads: Grads) -> Grads:
        if self.eigenvectors is None:
            raise InfluenceLensError("Method 'direct' was asked to solve before it was fitted.", "call fit() first")
        flat = flatten(grads)
        if self.eigenvectors.device != flat.device:
            self.eigenvalues, self.eigenvectors = self.eigenvalues.to(flat.device), self.eigenvectors.to(flat.device)
        coeffs = flat @ self.eigenvectors
        scale = (1.0 / (self.eigenvalues + self.regularization)).to(coeffs)
        solved = (coeffs * scale) @ self.eigenvectors.T
        return unflatten(solved, self._shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.eigenvectors is None:
            return {}
        sizes = {f"shape.{n}": torch.tensor(list(s), dtype=torch.int64) for n, s in self._shapes.items()}
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors, **sizes}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.eigenvalues, self.eigenvectors = state["eigenvalues"], state["eigenvectors"]
        self._shapes = {k[len("shape."):]: torch.Size(v.tolist()) for k, v in state.items() if k.startswith("shape.")}
