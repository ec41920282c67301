"""The fitted state of one K-FAC / EK-FAC layer block, and the covariance accumulator it is fitted from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import InfluenceLensError

GRAM_FRACTION = 0.5
"""A covariance is eigendecomposed through its Gram matrix while it has seen at most this fraction × dim rows."""


RANDOMIZED_RATIO = 4
"""A dense covariance is cut to ``rank`` eigenpairs by :func:`leading_eigh` when ``rank`` × this ≤ its size (full
``eigh`` otherwise)."""
POWER_ITERATIONS = 3
OVERSAMPLE = 64


SYMMETRIC_BLOCK = 288
"""Columns per block of a dense covariance: only the blocks on and below the diagonal are accumulated (the
matrix is symmetric), ``(k + 1) / 2k`` of the products for ``k`` blocks, and mirrored once before use."""


class Covariance:
    """Accumulates ``Σ scale · x xᵀ`` over rows ``x``; keeps the rows themselves while there are few of them."""

    def __init__(self, dim: int):
        self.dim = dim
        self.rows: list[torch.Tensor] | None = []
        self.n_rows = 0
        self.dense: torch.Tensor | None = None
        self.blocks = [slice(a, min(a + SYMMETRIC_BLOCK, dim)) for a in range(0, dim, SYMMETRIC_BLOCK)]

    def add(self, x: torch.Tensor, scale: float = 1.0) -> None:
        """``x``: ``(N, dim)`` rows, each counted ``scale`` times."""
        if self.rows is not None and self.n_rows + len(x) <= GRAM_FRACTION * self.dim:
            self.rows.append(x * math.sqrt(scale) if scale != 1 else x)
            self.n_rows += len(x)
            return
        if self.rows is not None:  # switch to a dense accumulator
            self.dense = torch.zeros(self.dim, self.dim, dtype=x.dtype, device=x.device)
            for r in self.rows:
                self._accumulate(r, 1.0)
            self.rows = None
        self._accumulate(x, scale)

    def _accumulate(self, x: torch.Tensor, scale: float) -> None:
        assert self.dense is not None
        for i, rows in enumerate(self.blocks):
            for cols in self.blocks[: i + 1]:
                self.dense[rows, cols].addmm_(x[:, rows].T, x[:, cols], alpha=scale)

    def _symmetric(self) -> torch.Tensor:
        """The accumulated ``Σ scale · x xᵀ`` with its upper blocks mirrored from the lower ones."""
        assert self.dense is not None
        for i, rows in enumerate(self.blocks):
            for cols in self.blocks[:i]:
                self.dense[cols, rows] = self.dense[rows, cols].T
        return self.dense

    def eig(
        self, n: int, dtype: torch.dtype, device: torch.device, rank: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Eigenpairs of ``(1/n) Σ x xᵀ`` in ascending order: ``Q (dim, r)`` with orthonormal columns, eigenvalues
        ``(r,)``, and whether the factor is projected (``dim > rank``: only ``Q``'s span is kept).

        ``r = dim`` for dense covariances; fewer (nonzero eigenvalues only) for those kept as rows; at most
        ``rank`` (the largest eigenvalues) when given. A factor larger than ``rank`` is projected even when it has
        seen fewer than ``rank`` independent rows, so that the fitted subset's size does not switch a layer
        between dropping and keeping (at ``1/λ``) the directions outside ``Q``.
        """
        if self.dense is not None:
            m = self._symmetric()
            m = (m + m.T) / (2 * n)
            if rank is not None and rank * RANDOMIZED_RATIO <= self.dim:
                evals, q = leading_eigh(m, rank)
                return q, evals.clamp_min(0), True
            evals, q = robust_eigh(m)
            first = _first_kept(len(evals), rank)
            return q[:, first:], evals[first:].clamp_min(0), first > 0
        if not self.rows:
            return (
                torch.zeros(self.dim, 0, dtype=dtype, device=device),
                torch.zeros(0, dtype=dtype, device=device),
                False,
            )
        x = torch.cat(self.rows)  # (N, dim)
        gram = x @ x.T / n
        s, u = robust_eigh((gram + gram.T) / 2)
        keep = s > s.max().clamp_min(0) * 1e-10
        s, u = s[keep], u[:, keep]
        first = _first_kept(len(s), rank)
        s, u = s[first:], u[:, first:]  # only the kept eigenvectors are lifted to dim
        return (x.T @ u) / torch.sqrt(s * n), s, rank is not None and self.dim > rank


def _first_kept(count: int, rank: int | None) -> int:
    """Index of the first of ``count`` ascending eigenpairs that ``rank`` keeps (0: all of them)."""
    return 0 if rank is None else max(count - rank, 0)


def robust_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric PSD ``m (dim, dim)``: ``(eigenvalues (dim,), Q (dim, dim))`` in ``m``'s
    dtype and device.

    LAPACK's solver can fail to converge on rank-deficient covariances with clustered zero eigenvalues (seen on a
    whole ResNet18 at 16 px in float32 and float64). Then the decomposition is retried on ``m + δI`` with ``δ`` =
    1e-6, 1e-4, then 1e-2 × the mean eigenvalue (the shift is subtracted from the eigenvalues again; the
    eigenvectors of ``m + δI`` are those of ``m``), and last in float64 on the CPU.
    """
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        pass
    scale = float(torch.diagonal(m).mean().abs()) or 1.0
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    for relative in (1e-6, 1e-4, 1e-2):
        delta = relative * scale
        try:
            evals, q = torch.linalg.eigh(m + delta * eye)
            return evals - delta, q
        except torch.linalg.LinAlgError:
            continue
    try:
        evals, q = torch.linalg.eigh(m.detach().to("cpu", torch.float64))
    except torch.linalg.LinAlgError as e:
        raise InfluenceLensError(
            f"The eigendecomposition of a {m.shape[0]}×{m.shape[0]} K-FAC covariance did not converge, even "
            "after shifting it and in float64.",
            "fit on more training images, or use scope='head' or another method (cg, arnoldi)",
        ) from e
    return evals.to(m.device, m.dtype), q.to(m.device, m.dtype)


def leading_eigh(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of a symmetric PSD ``m (dim, dim)``, ascending: ``(eigenvalues (rank,),
    Q (dim, rank))``, by a randomized range finder with :data:`POWER_ITERATIONS` power iterations (Halko et al.
    2011) and an exact ``eigh`` of the ``(rank + OVERSAMPLE)``-sized projection. Cost ``O(dim²·rank)`` instead of
    ``O(dim³)``; the start vectors come from a fixed seed, so the result is reproducible on one device.

    On a synthetic 4,609 × 4,609 covariance (decaying spectrum) it took 1.4 s against 8.7 s for ``eigh`` (2 CPU
    cores).
    """
    k = min(m.shape[0], rank + OVERSAMPLE)
    gen = torch.Generator(device=m.device).manual_seed(0)
    y = m @ torch.randn(m.shape[0], k, generator=gen, dtype=m.dtype, device=m.device)
    for _ in range(POWER_ITERATIONS):
        y = m @ torch.linalg.qr(y)[0]
    basis = torch.linalg.qr(y)[0]
    projected = basis.T @ m @ basis
    evals, u = robust_eigh((projected + projected.T) / 2)
    return evals[-rank:], basis @ u[:, -rank:]


@dataclass
class LayerFactors:
    """The fitted curvature of one layer block ``[W | b]`` ``(out, d)``: ``H ≈ (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ``."""

    weight_name: str | None
    bias_name: str | None
    weight_shape: tuple[int, ...]
    q_a: torch.Tensor  # (d, r_A)
    q_g: torch.Tensor  # (out, r_G)
    eigenvalues: torch.Tensor  # (r_G, r_A)
    projected: bool = False  # bases cut by a rank: the complement is dropped, not given zero curvature
    _scoring: dict[torch.dtype, LayerFactors] = field(default_factory=dict, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.weight_name or ''}|{self.bias_name or ''}"

    @property
    def full_rank(self) -> bool:
        return self.q_a.shape[0] == self.q_a.shape[1] and self.q_g.shape[0] == self.q_g.shape[1]

    @property
    def mean_eigenvalue(self) -> float:
        """``trace / (out·d)`` of the block's curvature (directions outside rank-deficient bases count as 0)."""
        return float(self.eigenvalues.sum()) / (self.q_g.shape[0] * self.q_a.shape[0])

    def scoring(self, dtype: torch.dtype) -> LayerFactors:
        """The factors influences are scored with, in ``dtype`` (cached): the same bases completed to square ones
        (complement columns get eigenvalue 0), or, when ``projected``, the bases as they are."""
        if dtype not in self._scoring:
            if self.projected:
                q_a, q_g = self.q_a, self.q_g
            else:
                q_a, q_g = complete_basis(self.q_a), complete_basis(self.q_g)
            evals = self.eigenvalues.new_zeros(q_g.shape[1], q_a.shape[1])
            evals[: self.eigenvalues.shape[0], : self.eigenvalues.shape[1]] = self.eigenvalues
            self._scoring[dtype] = LayerFactors(
                self.weight_name,
                self.bias_name,
                self.weight_shape,
                q_a.to(dtype),
                q_g.to(dtype),
                evals.to(dtype),
                self.projected,
            )
        return self._scoring[dtype]


def complete_basis(q: torch.Tensor) -> torch.Tensor:
    """``q (dim, r)`` with orthonormal columns, extended to an orthonormal ``(dim, dim)`` basis (``q`` first)."""
    dim, r = q.shape
    if r == dim:
        return q
    full, _ = torch.linalg.qr(torch.cat([q, torch.eye(dim, dtype=q.dtype, device=q.device)], dim=1))
    return torch.cat([q, full[:, r:]], dim=1)


def sandwich(left: torch.Tensor, mid: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ mid @ right`` for ``mid (k, p, q)``, multiplied in the cheaper order."""
    (m, p), q, r = left.shape, mid.shape[2], right.shape[1]
    if m * p * q + m * q * r <= p * q * r + m * p * r:
        return (left @ mid) @ right
    return left @ (mid @ right)
