"""``cg``: preconditioned conjugate gradients on ``(H + λI) x = g``, all right-hand sides at once."""

from __future__ import annotations

import warnings

import torch

from ..errors import InfluenceLensError
from .base import Grads
from .ops import IterativeInverse, detached, iter_per_sample_grads, row_dot


class ConjugateGradient(IterativeInverse):
    """Batched preconditioned CG with matrix-free curvature products (one training pass per iteration).

    Options:

    * ``tol`` (default ``1e-5``): a column stops once its relative residual ``‖r‖/‖g‖ ≤ tol``.
    * ``maxiter`` (default 100): iterations at most; columns that did not reach ``tol`` raise a warning.
    * ``preconditioner``: ``"jacobi"`` (default) uses ``diag(F) + λ`` with ``F = (1/n) Σ ∇ℓ_i ∇ℓ_iᵀ``
      (the empirical Fisher, one per-sample-gradient pass in :meth:`fit`); ``"none"`` uses plain CG.

    ``H + λI`` must be positive definite on the Krylov space; with ``curvature="hessian"`` away from a
    minimum it may not be, which raises a clear error (use Gauss-Newton or a larger ``λ``).
    ``rhs_chunk`` columns are iterated together (default: as many as fit 96 MiB per stacked vector).
    """

    name = "cg"

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", tol: float = 1e-5,
                 maxiter: int = 100, preconditioner: str = "jacobi", rhs_chunk: int | None = None):
        super().__init__(regularization, curvature, tol=tol, maxiter=maxiter, preconditioner=preconditioner,
                         rhs_chunk=rhs_chunk)
        if preconditioner not in ("jacobi", "none"):
            raise InfluenceLensError(f"Unknown cg preconditioner {preconditioner!r}.", "use 'jacobi' or 'none'")
        self.tol, self.maxiter, self.preconditioner = float(tol), int(maxiter), preconditioner
        self.rhs_chunk = rhs_chunk
        self.diagonal: Grads | None = None
        self.iterations = 0  # iterations used by the last solve (max over chunks)

    def fit(self, model, params, batches, n_samples, progress=None):
        self._keep_data(model, params, batches, n_samples, progress)  # progress also gets ("cg", it, maxiter)
        self.diagonal = None
        if self.preconditioner == "jacobi":
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

    def _matvec(self, vectors: Grads) -> Grads:
        hv = self._curvature(vectors)
        return {n: hv[n] + self.regularization * vectors[n] for n in hv}

    def _precondition(self, r: Grads) -> Grads:
        if self.diagonal is None:
            return r
        return {n: r[n] / (self.diagonal[n] + self.regularization) for n in r}

    def solve(self, grads: Grads) -> Grads:
        self.iterations = 0
        return super().solve(grads)

    def _solve_chunk(self, b: Grads) -> Grads:
        b_norm = row_dot(b, b).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        x = {n: torch.zeros_like(t) for n, t in b.items()}
        r = {n: t.clone() for n, t in b.items()}
        z = self._precondition(r)
        p = {n: t.clone() for n, t in z.items()}
        rz = row_dot(r, z)
        active = (row_dot(r, r).sqrt() / b_norm > self.tol).nonzero().flatten()
        for it in range(self.maxiter):
            if len(active) == 0:
                break
            self.iterations = max(self.iterations, it + 1)
            if self._progress:
                self._progress("cg", it + 1, self.maxiter)
            pa = {n: t[active] for n, t in p.items()}
            ap = self._matvec(pa)
            curv = row_dot(pa, ap)
            if bool((curv <= 0).any()):
                raise InfluenceLensError(
                    f"cg met non-positive curvature (pᵀ(H+λI)p = {float(curv.min()):.3g}): H + λI is not positive "
                    f"definite with curvature {self.curvature!r} and λ = {self.regularization:g}.",
                    "use curvature gauss-newton or a larger regularization",
                )
            alpha = rz[active] / curv
            for n in x:
                shape = (-1,) + (1,) * (x[n].dim() - 1)
                x[n][active] += alpha.view(shape) * pa[n]
                r[n][active] -= alpha.view(shape) * ap[n]
            ra = {n: t[active] for n, t in r.items()}
            za = self._precondition(ra)
            rz_new = row_dot(ra, za)
            beta = rz_new / rz[active]
            for n in p:
                shape = (-1,) + (1,) * (p[n].dim() - 1)
                p[n][active] = za[n] + beta.view(shape) * pa[n]
            rz[active] = rz_new
            residual = row_dot(ra, ra).sqrt() / b_norm[active]
            active = active[residual > self.tol]
        if len(active):
            worst = float((row_dot(r, r).sqrt() / b_norm).max())
            warnings.warn(f"cg stopped after maxiter={self.maxiter} with relative residual {worst:.2e} > "
                          f"tol={self.tol:g} on {len(active)} of {len(b_norm)} columns; raise maxiter or "
                          "regularization",
                          stacklevel=3)
        return x
