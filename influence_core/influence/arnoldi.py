"""``arnoldi``: a low-rank eigendecomposition of ``H`` from a Krylov space (Schioppa et al. 2022)."""

from __future__ import annotations

import torch

from ..errors import InfluenceLensError
from .base import Grads, InverseCurvature
from .ops import curvature_matvec, flatten, n_params, shapes, unflatten


class ArnoldiInverse(InverseCurvature):
    """Arnoldi iteration (with full re-orthogonalisation) on ``H``, keeping the ``rank`` Ritz pairs of
    largest ``|μ|``; then ``(H + λI)⁻¹ g ≈ V diag(1/(μ+λ)) Vᵀ g`` (the projection onto the kept space).

    Options: ``rank`` (default 20), ``krylov_dim`` (default ``min(p, 2·rank + 10)``: curvature products, each
    one pass over the training set), ``seed`` (default 0, the start vector). With ``rank = p`` (and so
    ``krylov_dim = p``) the result is exact. Changing ``λ`` afterwards costs nothing. The basis takes
    ``4·krylov_dim·p`` bytes.
    """

    name = "arnoldi"

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", rank: int = 20,
                 krylov_dim: int | None = None, seed: int = 0):
        super().__init__(regularization, curvature, rank=rank, krylov_dim=krylov_dim, seed=seed)
        if int(rank) < 1:
            raise InfluenceLensError(f"arnoldi rank must be at least 1, got {rank}.", "use e.g. rank=20")
        self.rank, self.krylov_dim, self.seed = int(rank), krylov_dim, int(seed)
        self.eigenvalues: torch.Tensor | None = None  # (r,) float64
        self.eigenvectors: torch.Tensor | None = None  # (p, r) float32
        self._shapes: dict[str, torch.Size] = {}

    def fit(self, model, params, batches, n_samples, progress=None):
        self._shapes = shapes(params)
        p = n_params(params)
        rank = min(self.rank, p)
        steps = min(p, self.krylov_dim or 2 * rank + 10)
        device = next(iter(params.values())).device
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        basis = torch.empty(steps + 1, p, device=device)
        hessenberg = torch.zeros(steps + 1, steps, dtype=torch.float64)
        start = torch.randn(p, generator=gen).to(device)
        basis[0] = start / start.norm()
        for j in range(steps):
            w = flatten(curvature_matvec(model, params, batches, n_samples, self.curvature,
                                         unflatten(basis[j:j + 1], self._shapes)))[0]
            scale = float(w.norm())
            for _ in range(2):  # classical Gram-Schmidt, twice, against the whole basis so far
                coeffs = basis[:j + 1] @ w
                w = w - coeffs @ basis[:j + 1]
                hessenberg[:j + 1, j] += coeffs.double().cpu()
            norm = float(w.norm())
            if progress:
                progress("arnoldi", j + 1, steps)
            if j + 1 == steps:
                break
            if norm <= 1e-6 * max(scale, 1e-30):  # invariant subspace: restart from a fresh orthogonal vector
                w = torch.randn(p, generator=gen).to(device)
                for _ in range(2):
                    w = w - (basis[:j + 1] @ w) @ basis[:j + 1]
                norm = 0.0
            hessenberg[j + 1, j] = norm
            basis[j + 1] = w / w.norm()
        small = hessenberg[:steps, :steps]
        values, vectors = torch.linalg.eigh((small + small.T) / 2)
        keep = values.abs().argsort(descending=True)[:rank]
        self.eigenvalues = values[keep]
        self.eigenvectors = basis[:steps].T @ vectors[:, keep].float().to(device)
        return self

    def solve(self, grads: Grads) -> Grads:
        if self.eigenvectors is None:
            raise InfluenceLensError("Method 'arnoldi' was asked to solve before it was fitted.", "call fit() first")
        flat = flatten(grads)
        if self.eigenvectors.device != flat.device:
            self.eigenvalues, self.eigenvectors = self.eigenvalues.to(flat.device), self.eigenvectors.to(flat.device)
        coeffs = flat @ self.eigenvectors
        solved = (coeffs / (self.eigenvalues + self.regularization).to(coeffs)) @ self.eigenvectors.T
        return unflatten(solved, self._shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.eigenvectors is None:
            return {}
        sizes = {f"shape.{n}": torch.tensor(list(s), dtype=torch.int64) for n, s in self._shapes.items()}
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors, **sizes}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.eigenvalues, self.eigenvectors = state["eigenvalues"], state["eigenvectors"]
        self._shapes = {k[len("shape."):]: torch.Size(v.tolist()) for k, v in state.items() if k.startswith("shape.")}
