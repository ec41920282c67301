"""``direct``: the explicit curvature matrix, factorised (exact; small blocks only)."""

from __future__ import annotations

import warnings

import torch

from ..errors import InfluenceLensError
from .base import Grads, InverseCurvature
from .ops import curvature_matrix, flatten, n_params, shapes, unflatten


class DirectInverse(InverseCurvature):
    """Builds ``H`` (``p × p``) exactly and solves with a Cholesky factor of ``H + λI`` (float64).

    When ``H + λI`` is not positive definite (``curvature="hessian"`` away from a minimum) it falls back to
    an LU factor and warns: the influence values are then of doubtful meaning. :meth:`set_regularization`
    refactors the kept matrix (``O(p³/3)``, no pass over the data).

    Options: ``max_params`` (default 20 000): larger blocks are refused, since the matrix takes ``4p²``
    bytes (plus ``8p²`` for the factor).
    """

    name = "direct"

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", max_params: int = 20_000):
        super().__init__(regularization, curvature, max_params=max_params)
        self.max_params = int(max_params)
        self.matrix: torch.Tensor | None = None  # (p, p) float32, the mean curvature H
        self._factor: tuple[str, tuple[torch.Tensor, ...]] | None = None
        self._shapes: dict[str, torch.Size] = {}

    def fit(self, model, params, batches, n_samples, progress=None):
        p = n_params(params)
        if p > self.max_params:
            raise InfluenceLensError(
                f"Method 'direct' would build a {p:,} × {p:,} curvature matrix ({4 * p * p / 2**30:.1f} GiB); "
                f"it is limited to blocks of {self.max_params:,} parameters.",
                "use method cg, arnoldi or ekfac for this scope, or scope 'head'",
            )
        self.matrix = curvature_matrix(model, params, batches, n_samples, self.curvature, progress).float()
        self._shapes = shapes(params)
        self._factorise()
        return self

    def _factorise(self) -> None:
        shifted = self.matrix.double()
        shifted.diagonal().add_(self.regularization)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            self._factor = ("cholesky", (factor,))
            return
        warnings.warn(f"H + λI is not positive definite (curvature {self.curvature!r}, λ = {self.regularization:g}); "
                      "solving with LU. Use gauss-newton or a larger regularization for meaningful influences.",
                      stacklevel=3)
        self._factor = ("lu", torch.linalg.lu_factor(shifted))

    def set_regularization(self, value: float) -> None:
        super().set_regularization(value)
        if self.matrix is not None:
            self._factorise()

    def solve(self, grads: Grads) -> Grads:
        if self._factor is None:
            raise InfluenceLensError("Method 'direct' was asked to solve before it was fitted.", "call fit() first")
        flat = flatten(grads)
        kind, factor = self._factor
        if factor[0].device != flat.device:
            factor = tuple(t.to(flat.device) for t in factor)
            self._factor = (kind, factor)
        rhs = flat.double().T
        solved = torch.cholesky_solve(rhs, factor[0]) if kind == "cholesky" else torch.linalg.lu_solve(*factor, rhs)
        return unflatten(solved.T.to(flat.dtype), self._shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.matrix is None:
            return {}
        sizes = {f"shape.{n}": torch.tensor(list(s), dtype=torch.int64) for n, s in self._shapes.items()}
        return {"matrix": self.matrix, **sizes}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.matrix = state["matrix"]
        self._shapes = {k[len("shape."):]: torch.Size(v.tolist()) for k, v in state.items() if k.startswith("shape.")}
        self._factorise()
