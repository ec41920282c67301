"""The fitted state of one K-FAC / EK-FAC layer block, and the covariance accumulator it is fitted from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import InfluenceLensError

GRAM_FRACTION = 0.5
"""A covariance is eigendecomposed through its Gram matrix while it has seen at most this fraction × dim rows."""


class Covariance:
    """Accumulates ``Σ x xᵀ`` over rows ``x``; keeps the rows themselves while there are few of them."""

    def __init__(self, dim: int):
        self.dim = dim
        self.rows: list[torch.Tensor] | None = []
        self.n_rows = 0
        self.dense: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``(N, dim)`` rows, already scaled."""
        if self.rows is not None and self.n_rows + len(x) <= GRAM_FRACTION * self.dim:
            self.rows.append(x)
            self.n_rows += len(x)
            return
        if self.rows is not None:  # switch to a dense accumulator
            self.dense = torch.zeros(self.dim, self.dim, dtype=x.dtype, device=x.device)
            for r in self.rows:
                self.dense.addmm_(r.T, r)
            self.rows = None
        assert self.dense is not None
        self.dense.addmm_(x.T, x)

    def eig(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs of ``(1/n) Σ x xᵀ``: ``Q (dim, r)`` with orthonormal columns, eigenvalues ``(r,)``.

        ``r = dim`` for dense covariances; fewer (nonzero eigenvalues only) for those kept as rows.
        """
        if self.dense is not None:
            evals, q = robust_eigh((self.dense + self.dense.T) / (2 * n))
            return q, evals.clamp_min(0)
        if not self.rows:
            return torch.zeros(self.dim, 0, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device)
        x = torch.cat(self.rows)  # (N, dim)
        gram = x @ x.T / n
        s, u = robust_eigh((gram + gram.T) / 2)
        keep = s > s.max().clamp_min(0) * 1e-10
        s, u = s[keep], u[:, keep]
        q = (x.T @ u) / torch.sqrt(s * n)
        return q, s


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


@dataclass
class LayerFactors:
    """The fitted curvature of one layer block ``[W | b]`` ``(out, d)``: ``H ≈ (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ``."""

    weight_name: str | None
    bias_name: str | None
    weight_shape: tuple[int, ...]
    q_a: torch.Tensor  # (d, r_A)
    q_g: torch.Tensor  # (out, r_G)
    eigenvalues: torch.Tensor  # (r_G, r_A)
    _completed: dict[torch.dtype, LayerFactors] = field(default_factory=dict, repr=False, compare=False)

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

    def completed(self, dtype: torch.dtype) -> LayerFactors:
        """The same factors with square bases (complement columns get eigenvalue 0), in ``dtype``; cached."""
        if dtype not in self._completed:
            q_a, q_g = complete_basis(self.q_a), complete_basis(self.q_g)
            evals = self.eigenvalues.new_zeros(q_g.shape[1], q_a.shape[1])
            evals[: self.eigenvalues.shape[0], : self.eigenvalues.shape[1]] = self.eigenvalues
            self._completed[dtype] = LayerFactors(
                self.weight_name, self.bias_name, self.weight_shape, q_a.to(dtype), q_g.to(dtype), evals.to(dtype)
            )
        return self._completed[dtype]


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
