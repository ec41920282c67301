"""The contract between the influence engine and its inverse-curvature methods.

Conventions used by every method (and stated in the README):

* ``ℓ_i(θ) = CE(f(x_i; θ), y_i)`` is the per-sample loss, *not* divided by ``n``.
* ``H = (1/n) Σ_i ∇²ℓ_i`` is the mean Hessian (``curvature="hessian"``) or the mean Gauss-Newton matrix
  ``(1/n) Σ_i J_iᵀ ∇²_f ℓ_i J_i`` (``curvature="gauss-newton"``) over the *training* set, weighted per
  sample (an uneven last chunk counts by its size, never as a whole batch).
* Influence ``I(z, z_test) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z)``; positive = helpful (removing ``z`` raises the
  test loss by about ``I / n``). Self-influence is ``I(z, z)``.

A *method* is a small frozen configuration (:class:`Method`: ``Direct()``, ``CG(maxiter=50)``, ``EKFAC()``, …)
that builds a fresh :class:`InverseCurvature` for every fit; ``λ`` is not part of either: it is passed to each
solve as a :class:`~.choices.Damping`, so it lives in one place (the engine).

A *block* is a named set of parameters (``dict[str, nn.Parameter]``); gradients for a block travel as
``dict[str, Tensor]`` with a leading batch axis: ``grads[name]`` has shape ``(k, *param.shape)``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InfluenceLensError
from ..progress import Progress  # progress(stage, done, total)
from .choices import Curvature, Damping
from .ops import (
    SOLVE_BYTES,
    Batches,
    Grads,
    concat,
    curvature_matvec,
    detached,
    hutchinson_mean_eigenvalue,
    power_iteration,
    rows_per_chunk,
    split,
)

FLOAT32_RESOLUTION = 1e-6
"""Smallest usable ``λ`` relative to the largest eigenvalue of its block: gradients and curvature products are
float32 (relative error ~``6e-8``), and the solve amplifies that error by the condition number
``(μ_max + λ)/λ``; below this ratio the influences are dominated by rounding (see the README)."""


@dataclass(frozen=True)
class BlockScale:
    """Size of one block's curvature: ``mean`` eigenvalue (``trace/p``) and the ``top`` one (``None``: unknown or
    not asked for)."""

    mean: float | None
    top: float | None = None


@dataclass(frozen=True)
class Method:
    """A configured inverse-curvature method; subclasses are frozen dataclasses whose fields are its options.

    Subclasses register themselves in :data:`METHODS` under their ``name``.
    """

    name: ClassVar[str] = ""
    supports: ClassVar[tuple[Curvature, ...]] = (Curvature.GAUSS_NEWTON, Curvature.HESSIAN)
    inverse_class: ClassVar[type[InverseCurvature]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    @classmethod
    def named(cls, name: str, **options) -> Method:
        """The method registered as ``name`` with ``options`` (unknown names and options are clear errors)."""
        if name not in METHODS:
            raise InfluenceLensError(f"Unknown influence method {name!r}.", f"use one of {', '.join(METHODS)}")
        method = METHODS[name]
        fields = {f.name for f in dataclasses.fields(method)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InfluenceLensError(
                f"Unknown option(s) for method {name!r}: {', '.join(unknown)}.",
                f"use any of {', '.join(sorted(fields)) or '(none)'}",
            )
        return method(**options)

    def fingerprint(self) -> dict[str, Any]:
        """What decides this method's results: its name, its options and the values its ``"auto"`` options resolve
        to. Part of every cache key, so that a changed default is a cache miss instead of a stale result."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def check_curvature(self, curvature: Curvature) -> None:
        if curvature not in self.supports:
            raise InfluenceLensError(
                f"Method {self.name!r} does not support curvature {curvature.value!r}.",
                f"use one of {', '.join(self.supports)}",
            )

    def inverse(self, curvature: Curvature) -> InverseCurvature:
        """A new, unfitted inverse of this method for ``curvature``."""
        self.check_curvature(curvature)
        return self.inverse_class(self, curvature)


def positive(owner: str, **values: float | None) -> None:
    """Refuse options that must be positive (clear error at construction)."""
    for key, value in values.items():
        if value is not None and not value > 0:
            raise InfluenceLensError(
                f"{owner} option {key} must be positive, got {value!r}.",
                f"use {owner}({key}=...) with a positive value",
            )


class InverseCurvature(ABC):
    """``(H + λI)⁻¹`` for one parameter block: fit the curvature once, then solve for many vectors and any ``λ``."""

    def __init__(self, method: Method, curvature: Curvature):
        self.method = method
        self.curvature = curvature

    @abstractmethod
    def fit(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        batches: Batches,
        n_samples: int,
        progress: Progress | None = None,
    ) -> InverseCurvature:
        """Fit the curvature of the mean training loss w.r.t. ``params``.

        ``n_samples`` is the number of training samples ``batches()`` yields in total. ``model`` is in eval mode.
        """

    @abstractmethod
    def solve(self, grads: Grads, damping: Damping) -> Grads:
        """Return ``(H + λI)⁻¹ g`` for each of the ``k`` vectors in ``grads`` (same shapes)."""

    @abstractmethod
    def block_scales(self, with_mean: bool, with_top: bool = False) -> dict[str, BlockScale]:
        """The curvature's scale per block of this method: the mean eigenvalue only ``with_mean``, and the largest
        at least ``with_top`` (matrix-free methods estimate them with extra passes over the data)."""

    def block_regularization(self, damping: Damping) -> dict[str, float]:
        """``λ`` per block; refuses a ``λ`` below :data:`FLOAT32_RESOLUTION` × the block's top eigenvalue."""
        out = {}
        scales = self.block_scales(with_mean=damping.relative_to == "mean", with_top=damping.relative_to == "top")
        for block, scale in scales.items():
            lam = damping.resolve(scale.mean, scale.top)
            if not math.isfinite(lam) or lam <= 0:
                raise InfluenceLensError(
                    f"Block {block!r} has no curvature to take λ relative to (λ = {lam:g}).",
                    "use an absolute regularization, e.g. 1e-3",
                )
            if scale.top is not None and lam < FLOAT32_RESOLUTION * scale.top:
                raise InfluenceLensError(
                    f"λ = {lam:.3g} is below what float32 gradients resolve for block {block or '(all)'!r}, whose "
                    f"largest curvature eigenvalue is {scale.top:.3g} (condition number "
                    f"{(scale.top + lam) / lam:.2g}); influences would be rounding noise.",
                    f"use regularization ≥ {FLOAT32_RESOLUTION * scale.top:.2g}, or damping relative to the largest "
                    f"eigenvalue (e.g. top:1e-5)",
                )
            out[block] = lam
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors, for the on-disk cache (empty when the method keeps nothing worth caching)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise InfluenceLensError(
                f"Method {self.method.name!r} cannot load a cached state.", "delete the cache and fit again"
            )


class EigenbasisInverse(InverseCurvature):
    """An inverse that is diagonal in a per-block orthonormal basis: ``(H + λI)⁻¹ = ⊕_b Q_b diag(d_b) Q_bᵀ``.

    Influences then never leave the basis: with coordinates ``r_i = Qᵀ ∇ℓ_i``,
    ``I(z_i, z_t) = Σ_b r_tᵀ diag(d_b) r_i``. The engine uses :meth:`basis_grads` instead of per-sample
    gradients followed by :meth:`solve` whenever it can (K-FAC/EK-FAC: the coordinates come straight from
    layer inputs and output gradients, without forming parameter-sized per-sample gradients first).
    """

    @abstractmethod
    def basis_grads(
        self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(block, r)`` per block: coordinates ``r (b, ...)`` of each sample's loss gradient in the basis (fresh
        tensors, which the caller may overwrite)."""

    @abstractmethod
    def inverse_diagonal(self, damping: Damping) -> dict[str, torch.Tensor]:
        """``d`` per block, shaped like one sample's coordinates: ``1 / (eigenvalue + λ)``."""

    @abstractmethod
    def basis_self_influence(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        x: torch.Tensor,
        y: torch.Tensor,
        inverse: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Self-influence ``Σ_b Σ_j d_bj r_ij²`` of each sample ``(b,)`` for ``inverse`` = :meth:`inverse_diagonal`:
        what :func:`weighted_squares` gives from :meth:`basis_grads`, computed without forming all coordinates
        where that is cheaper."""


def weighted_squares(r: torch.Tensor, d: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``Σ_j d_j r_ij²`` per sample: eigenbasis coordinates ``r (b, ...)``, inverse diagonal ``d`` → ``(b,)``.

    ``overwrite``: square ``r`` in place (no temporary as large as ``r``: fresh buffers of that size cost page
    faults; on goldfish/lemon's whole ResNet18 self-influence went from 21.2 s to 16.8 s on 2 CPU cores,
    ``benchmarks/engine_timing.py``)."""
    flat = r.reshape(len(r), -1)
    return (flat.square_() if overwrite else flat.square()) @ d.reshape(-1)


class IterativeInverse(InverseCurvature):
    """Base of the methods that solve against the training data at every call (``cg``, ``lissa``).

    :meth:`fit` keeps the data (nothing is cached on disk); :meth:`solve` iterates ``rhs_chunk`` stacked
    right-hand sides at a time (default: as many as fit ``SOLVE_BYTES`` per vector) through
    :meth:`solve_chunk`, which subclasses implement with :meth:`curvature_product`.
    Relative damping uses ``trace(H)/p`` estimated with Rademacher probes (:func:`.ops.hutchinson_mean_eigenvalue`)
    or the largest eigenvalue from power iteration (:func:`.ops.power_iteration`), each computed once per fit.
    """

    rhs_chunk: int | None = None

    def keep_data(self, model, params, batches, n_samples, progress) -> None:
        self.data = (model, params, batches, n_samples)
        self.progress = progress  # subclasses also report their solve iterations through it
        self.mean_eigenvalue: float | None = None
        self.top: float | None = None  # the largest eigenvalue of H, once known

    def curvature_product(self, vectors: Grads) -> Grads:
        """``H v`` (without ``λ``) for each stacked vector: one pass over the training set."""
        model, params, batches, n_samples = self.fitted_data()
        return curvature_matvec(model, params, batches, n_samples, self.curvature, vectors)

    def fitted_data(self):
        if not hasattr(self, "data"):
            raise InfluenceLensError(
                f"Method {self.method.name!r} has no training data to solve against.",
                f"call fit() ({self.method.name} keeps no cached state)",
            )
        return self.data

    def block_scales(self, with_mean: bool, with_top: bool = False) -> dict[str, BlockScale]:
        if with_mean and self.mean_eigenvalue is None:
            self.mean_eigenvalue = hutchinson_mean_eigenvalue(self.curvature_product, detached(self.fitted_data()[1]))
        if with_top and self.top is None:
            self.top = abs(power_iteration(self.curvature_product, detached(self.fitted_data()[1])))
        return {"": BlockScale(self.mean_eigenvalue, self.top)}

    def solve(self, grads: Grads, damping: Damping) -> Grads:
        params = self.fitted_data()[1]
        (lam,) = self.block_regularization(damping).values()
        k = next(iter(grads.values())).shape[0]
        size = self.rhs_chunk or rows_per_chunk(params, k, SOLVE_BYTES)
        return concat([self.solve_chunk(part, lam) for part in split(grads, size)])

    @abstractmethod
    def solve_chunk(self, b: Grads, lam: float) -> Grads:
        """``(H + λI)⁻¹ b`` for one group of stacked right-hand sides."""


METHODS: dict[str, type[Method]] = {}
"""Method name → configuration class; filled as method modules are imported (``direct``, ``cg``, ``lissa``,
``arnoldi``, ``kfac``, ``ekfac``)."""
