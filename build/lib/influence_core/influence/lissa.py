"""``lissa``: the LiSSA / Neumann-series recursion for ``(H + λI)⁻¹ g`` (Agarwal et al. 2017)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InfluenceLensError
from .base import Grads, IterativeInverse, Method, positive
from .ops import detached, power_iteration, row_dot


@dataclass(frozen=True)
class LiSSA(Method):
    """Iterates ``x ← g + (1 − damping) x − (H + λI) x / scale`` and returns ``x / scale``.

    With ``damping = 0`` the fixed point is exactly ``(H + λI)⁻¹ g``. Convergence condition: every
    eigenvalue ``μ`` of ``H + λI`` must satisfy ``0 < μ < 2·scale`` (so ``H + λI`` must be positive
    definite); the error then shrinks like ``max|1 − μ/scale|^depth``, i.e. it needs about
    ``(scale/μ_min)·ln(1/tol)`` steps — slow for small ``λ``. ``damping > 0`` stabilises the recursion
    at the price of a bias (it solves ``(H + λI + damping·scale·I) x = g``).

    * ``depth``: steps at most (each is one pass over the training set).
    * ``scale``: ``"auto"`` is ``0.65 · μ_max`` from 20 power iterations (minimises the rate while keeping a
      margin for the estimate), or a number above half the largest eigenvalue of ``H + λI``.
    * ``damping``: the stabilising bias above (not ``λ``).
    * ``tol``: a column stops once its update is below ``tol`` times its current norm.
    * ``rhs_chunk``: as in ``CG``.
    """

    name = "lissa"
    depth: int = 1000
    scale: float | Literal["auto"] = "auto"
    damping: float = 0.0
    tol: float = 1e-5
    rhs_chunk: int | None = None

    def __post_init__(self):
        positive("LiSSA", depth=self.depth, tol=self.tol, rhs_chunk=self.rhs_chunk)
        if self.scale != "auto" and not float(self.scale) > 0:
            raise InfluenceLensError(
                f"lissa scale must be positive or 'auto', got {self.scale!r}.",
                "use scale='auto' or a value above half the largest eigenvalue of H",
            )
        if not self.damping >= 0:
            raise InfluenceLensError(f"lissa damping must be ≥ 0, got {self.damping!r}.", "use damping=0")


class LiSSAInverse(IterativeInverse):
    """The recursion of :class:`LiSSA`; knows ``H``'s top eigenvalue from power iteration (``scale="auto"``)."""

    method: LiSSA

    def fit(self, model, params, batches, n_samples, progress=None):
        self.keep_data(model, params, batches, n_samples, progress)  # progress also gets ("lissa", step, depth)
        self.rhs_chunk = self.method.rhs_chunk
        if self.method.scale == "auto":
            self.top = abs(power_iteration(self.curvature_product, detached(params)))
        return self

    def solve_chunk(self, g: Grads, lam: float) -> Grads:
        method = self.method
        if method.scale == "auto":
            assert self.top is not None  # from fit
            scale = 0.65 * (self.top + lam)
        else:
            scale = float(method.scale)
        x = {n: t.clone() for n, t in g.items()}
        active = torch.arange(len(next(iter(g.values()))), device=x[next(iter(x))].device)
        for step_index in range(1, method.depth):
            if len(active) == 0:
                break
            if self.progress:
                self.progress("lissa", step_index + 1, method.depth)
            xa = {n: t[active] for n, t in x.items()}
            hx = self.curvature_product(xa)
            new = {n: g[n][active] + (1 - method.damping - lam / scale) * xa[n] - hx[n] / scale for n in x}
            step = {n: new[n] - xa[n] for n in x}
            norm = row_dot(new, new).sqrt()
            if not bool(torch.isfinite(norm).all()):
                raise InfluenceLensError(
                    f"lissa diverged (scale={scale:.3g}, λ={lam:g}): H + λI has an eigenvalue outside (0, 2·scale).",
                    "use a larger scale or regularization, curvature gauss-newton, or method cg",
                )
            for n in x:
                x[n][active] = new[n]
            active = active[row_dot(step, step).sqrt() > method.tol * norm]
        if len(active):
            warnings.warn(
                f"lissa used all depth={method.depth} steps before {len(active)} columns reached "
                f"tol={method.tol:g}; raise depth or regularization",
                stacklevel=4,
            )
        return {n: t / scale for n, t in x.items()}


LiSSA.inverse_class = LiSSAInverse
