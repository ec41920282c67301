"""``cg``: preconditioned conjugate gradients on ``(H + λI) x = g``, all right-hand sides at once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InfluenceLensError
from .base import Grads, IterativeInverse, Method, positive
from .ops import detached, iter_per_sample_grads, row_dot


@dataclass(frozen=True)
class CG(Method):
    """Batched preconditioned CG with matrix-free curvature products (one training pass per iteration).

    * ``tol``: a column stops once its relative residual ``‖r‖/‖g‖ ≤ tol``.
    * ``maxiter``: iterations at most; columns that did not reach ``tol`` raise a warning.
    * ``preconditioner``: ``"none"`` (default) is plain CG; ``"jacobi"`` uses ``diag(F) + λ`` with
      ``F = (1/n) Σ ∇ℓ_i ∇ℓ_iᵀ`` (the empirical Fisher, one per-sample-gradient pass in ``fit``). Measured on a
      shared machine at λ = 1e-3 against float64 truth: trained ResNet18 head (goldfish/lemon, 440 images) after
      100 iterations 2.3e-5 plain vs 3.3e-4 Jacobi (50: 6.4e-3 vs 1.8e-2); trained 1,370-parameter CNN at
      tol 1e-5 both 5.8e-5 / 5.7e-5.
    * ``rhs_chunk``: columns iterated together (default: as many as fit 96 MiB per stacked vector).

    ``H + λI`` must be positive definite on the Krylov space; with ``curvature="hessian"`` away from a
    minimum it may not be, which raises a clear error (use Gauss-Newton or a larger ``λ``).
    """

    name = "cg"
    tol: float = 1e-5
    maxiter: int = 100
    preconditioner: Literal["jacobi", "none"] = "none"
    rhs_chunk: int | None = None

    def __post_init__(self):
        positive("CG", tol=self.tol, maxiter=self.maxiter, rhs_chunk=self.rhs_chunk)
        if self.preconditioner not in ("jacobi", "none"):
            raise InfluenceLensError(f"Unknown cg preconditioner {self.preconditioner!r}.", "use 'jacobi' or 'none'")


class CGInverse(IterativeInverse):
    """The solver of :class:`CG`; ``iterations`` is the number the last solve used (max over chunks)."""

    method: CG

    def fit(self, model, params, batches, n_samples, progress=None):
        self.keep_data(model, params, batches, n_samples, progress)  # progress also gets ("cg", it, maxiter)
        self.rhs_chunk = self.method.rhs_chunk
        self.diagonal: Grads | None = None
        self.iterations = 0
        if self.method.preconditioner == "jacobi":
            diagonal = {n: torch.zeros_like(p) for n, p in detached(params).items()}
            done = 0
            for x, y in batches():
                for _, g in iter_per_sample_grads(model, params, x, y):
                    for n in diagonal:
                        diagonal[n] += g[n].square().sum(0)
                done += len(y)
                if progress:
                    progress("preconditioner", done, n_samples)
            self.diagonal = {n: d / n_samples for n, d in diagonal.items()}
        return self

    def _precondition(self, r: Grads, lam: float) -> Grads:
        if self.diagonal is None:
            return r
        return {n: r[n] / (self.diagonal[n] + lam) for n in r}

    def solve(self, grads, damping):
        self.iterations = 0
        return super().solve(grads, damping)

    def solve_chunk(self, b: Grads, lam: float) -> Grads:
        tol, maxiter = self.method.tol, self.method.maxiter
        b_norm = row_dot(b, b).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        x = {n: torch.zeros_like(t) for n, t in b.items()}
        r = {n: t.clone() for n, t in b.items()}
        z = self._precondition(r, lam)
        p = {n: t.clone() for n, t in z.items()}
        rz = row_dot(r, z)
        active = (row_dot(r, r).sqrt() / b_norm > tol).nonzero().flatten()
        for it in range(maxiter):
            if len(active) == 0:
                break
            self.iterations = max(self.iterations, it + 1)
            if self.progress:
                self.progress("cg", it + 1, maxiter)
            pa = {n: t[active] for n, t in p.items()}
            hp = self.curvature_product(pa)
            ap = {n: hp[n] + lam * pa[n] for n in hp}
            curv = row_dot(pa, ap)
            if bool((curv <= 0).any()):
                raise InfluenceLensError(
                    f"cg met non-positive curvature (pᵀ(H+λI)p = {float(curv.min()):.3g}): H + λI is not positive "
                    f"definite with curvature {self.curvature.value!r} and λ = {lam:g}.",
                    "use curvature gauss-newton or a larger regularization",
                )
            alpha = rz[active] / curv
            for n in x:
                shape = (-1,) + (1,) * (x[n].dim() - 1)
                x[n][active] += alpha.view(shape) * pa[n]
                r[n][active] -= alpha.view(shape) * ap[n]
            ra = {n: t[active] for n, t in r.items()}
            za = self._precondition(ra, lam)
            rz_new = row_dot(ra, za)
            beta = rz_new / rz[active]
            for n in p:
                shape = (-1,) + (1,) * (p[n].dim() - 1)
                p[n][active] = za[n] + beta.view(shape) * pa[n]
            rz[active] = rz_new
            residual = row_dot(ra, ra).sqrt() / b_norm[active]
            active = active[residual > tol]
        if len(active):
            worst = float((row_dot(r, r).sqrt() / b_norm).max())
            warnings.warn(
                f"cg stopped after maxiter={maxiter} with relative residual {worst:.2e} > "
                f"tol={tol:g} on {len(active)} of {len(b_norm)} columns; raise maxiter or "
                "regularization",
                stacklevel=3,
            )
        return x


CG.inverse_class = CGInverse
