"""``direct``: the explicit curvature matrix, factorised (exact; small blocks only)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import InfluenceLensError
from .base import BlockScale, Damping, Grads, InverseCurvature, Method, positive
from .ops import curvature_matrix, flatten, n_params, power_iteration, shape_state, shapes, state_shapes, unflatten


@dataclass(frozen=True)
class Direct(Method):
    """Builds ``H`` (``p × p``) exactly and solves with a Cholesky factor of ``H + λI`` (float64).

    ``max_params``: larger blocks are refused, since the matrix takes ``4p²`` bytes (plus ``8p²`` for the factor).
    """

    name = "direct"
    max_params: int = 20_000

    def __post_init__(self):
        positive("Direct", max_params=self.max_params)


class DirectInverse(InverseCurvature):
    """The exact ``(H + λI)⁻¹`` of :class:`Direct`.

    When ``H + λI`` is not positive definite (``curvature="hessian"`` away from a minimum) it falls back to
    an LU factor and warns: the influence values are then of doubtful meaning. A new ``λ`` refactors the kept
    matrix (``O(p³/3)``, no pass over the data); the factor of the last ``λ`` is kept.
    """

    method: Direct
    matrix: torch.Tensor  # (p, p) float32, the mean curvature H
    shapes: dict[str, torch.Size]
    scale: BlockScale
    factored: tuple[float, tuple[str, tuple[torch.Tensor, ...]]]  # (λ, its factor)

    def fit(self, model, params, batches, n_samples, progress=None):
        p = n_params(params)
        if p > self.method.max_params:
            raise InfluenceLensError(
                f"Method 'direct' would build a {p:,} × {p:,} curvature matrix ({4 * p * p / 2**30:.1f} GiB); "
                f"it is limited to blocks of {self.method.max_params:,} parameters.",
                "use method cg, arnoldi or ekfac for this scope, or scope 'head'",
            )
        self.load_state_dict(
            {
                "matrix": curvature_matrix(model, params, batches, n_samples, self.curvature, progress).float(),
                **shape_state(shapes(params)),
            }
        )
        return self

    def block_scales(self, with_mean: bool, with_top: bool = False) -> dict[str, BlockScale]:
        return {"": self.scale}

    def _factor(self, lam: float) -> tuple[str, tuple[torch.Tensor, ...]]:
        if self.factored[0] == lam:
            return self.factored[1]
        shifted = self.matrix.double()
        shifted.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            result = ("cholesky", (factor,))
        else:
            warnings.warn(
                f"H + λI is not positive definite (curvature {self.curvature.value!r}, λ = {lam:g}); "
                "solving with LU. Use gauss-newton or a larger regularization for meaningful influences.",
                stacklevel=4,
            )
            result = ("lu", torch.linalg.lu_factor(shifted))
        self.factored = (lam, result)
        return result

    def solve(self, grads: Grads, damping: Damping) -> Grads:
        (lam,) = self.block_regularization(damping).values()
        kind, factor = self._factor(lam)
        flat = flatten(grads)
        rhs = flat.double().T.to(factor[0].device)
        solved = torch.cholesky_solve(rhs, factor[0]) if kind == "cholesky" else torch.linalg.lu_solve(*factor, rhs)
        return unflatten(solved.T.to(flat), self.shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.matrix, **shape_state(self.shapes)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.matrix = state["matrix"]
        self.shapes = state_shapes(state)
        self.scale = BlockScale(
            float(self.matrix.double().trace()) / len(self.matrix),
            abs(power_iteration(lambda v: {"": v[""] @ self.matrix}, {"": self.matrix[0]}, steps=50)),
        )
        self.factored = (float("nan"), ("", ()))


Direct.inverse_class = DirectInverse
