"""``lissa``: the LiSSA / Neumann-series recursion for ``(H + λI)⁻¹ g`` (Agarwal et al. 2017)."""

from __future__ import annotations

import warnings

import torch

from ..errors import InfluenceLensError
from .base import Grads
from .ops import IterativeInverse, detached, power_iteration, row_dot


class LiSSA(IterativeInverse):
    """Iterates ``x ← g + (1 − damping) x − (H + λI) x / scale`` and returns ``x / scale``.

    With ``damping = 0`` the fixed point is exactly ``(H + λI)⁻¹ g``. Convergence condition: every
    eigenvalue ``μ`` of ``H + λI`` must satisfy ``0 < μ < 2·scale`` (so ``H + λI`` must be positive
    definite); the error then shrinks like ``max|1 − μ/scale|^depth``, i.e. it needs about
    ``(scale/μ_min)·ln(1/tol)`` steps — slow for small ``λ``. ``damping > 0`` stabilises the recursion
    at the price of a bias (it solves ``(H + λI + damping·scale·I) x = g``).

    Options: ``depth`` (default 1000, steps at most; each is one pass over the training set),
    ``scale`` (default ``"auto"``: ``0.65 · μ_max`` from 20 power iterations, which minimises the rate
    while keeping a margin for the estimate), ``damping`` (default 0), ``tol`` (default ``1e-5``: a column
    stops once its update is below ``tol`` times its current norm), ``rhs_chunk`` (as in ``cg``).
    """

    name = "lissa"

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", depth: int = 1000,
                 scale: float | str = "auto", damping: float = 0.0, tol: float = 1e-5, rhs_chunk: int | None = None):
        super().__init__(regularization, curvature, depth=depth, scale=scale, damping=damping, tol=tol,
                         rhs_chunk=rhs_chunk)
        if scale != "auto" and not float(scale) > 0:
            raise InfluenceLensError(f"lissa scale must be positive or 'auto', got {scale!r}.",
                                     "use scale='auto' or a value above half the largest eigenvalue of H")
        self.depth, self.scale, self.damping, self.tol = int(depth), scale, float(damping), float(tol)
        self.rhs_chunk = rhs_chunk
        self.top_eigenvalue: float | None = None  # of H (without λ), from power iteration

    def fit(self, model, params, batches, n_samples, progress=None):
        self._keep_data(model, params, batches, n_samples, progress)  # progress also gets ("lissa", step, depth)
        if self.scale == "auto":
            self.top_eigenvalue = abs(power_iteration(self._curvature, detached(params)))
        return self

    def _scale(self) -> float:
        if self.scale == "auto":
            return 0.65 * (self.top_eigenvalue + self.regularization)
        return float(self.scale)

    def _solve_chunk(self, g: Grads) -> Grads:
        scale = self._scale()
        x = {n: t.clone() for n, t in g.items()}
        active = torch.arange(len(next(iter(g.values()))), device=x[next(iter(x))].device)
        for step_index in range(1, self.depth):
            if len(active) == 0:
                break
            if self._progress:
                self._progress("lissa", step_index + 1, self.depth)
            xa = {n: t[active] for n, t in x.items()}
            hx = self._curvature(xa)
            new = {n: g[n][active] + (1 - self.damping - self.regularization / scale) * xa[n] - hx[n] / scale
                   for n in x}
            step = {n: new[n] - xa[n] for n in x}
            norm = row_dot(new, new).sqrt()
            if not bool(torch.isfinite(norm).all()):
                raise InfluenceLensError(
                    f"lissa diverged (scale={scale:.3g}, λ={self.regularization:g}): H + λI has an eigenvalue "
                    f"outside (0, 2·scale).",
                    "use a larger scale or regularization, curvature gauss-newton, or method cg",
                )
            for n in x:
                x[n][active] = new[n]
            active = active[row_dot(step, step).sqrt() > self.tol * norm]
        if len(active):
            warnings.warn(f"lissa used all depth={self.depth} steps before {len(active)} columns reached "
                          f"tol={self.tol:g}; raise depth or regularization", stacklevel=3)
        return {n: t / scale for n, t in x.items()}
