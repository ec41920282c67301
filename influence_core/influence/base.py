"""The contract between the influence engine and its inverse-curvature methods.

Conventions used by every method (and stated in the README):

* ``ℓ_i(θ) = CE(f(x_i; θ), y_i)`` is the per-sample loss, *not* divided by ``n``.
* ``H = (1/n) Σ_i ∇²ℓ_i`` is the mean Hessian (``curvature="hessian"``) or the mean Gauss-Newton matrix
  ``(1/n) Σ_i J_iᵀ ∇²_f ℓ_i J_i`` (``curvature="gauss-newton"``) over the *training* set, weighted per
  sample (an uneven last chunk counts by its size, never as a whole batch).
* Influence ``I(z, z_test) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z)``; positive = helpful (removing ``z`` raises the
  test loss by about ``I / n``). Self-influence is ``I(z, z)``.

A *block* is a named set of parameters (``dict[str, nn.Parameter]``); gradients for a block travel as
``dict[str, Tensor]`` with a leading batch axis: ``grads[name]`` has shape ``(k, *param.shape)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..progress import Progress  # progress(stage, done, total)

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(x, y)``: inputs ``(b, ...)`` float32 and labels ``(b,)`` int64, on the engine's device."""


Grads = dict[str, torch.Tensor]


class InverseCurvature(ABC):
    """``(H + λI)⁻¹`` for one parameter block: fit the curvature once, then solve for many vectors.

    Subclasses register themselves in :data:`METHODS` under their ``name``.
    """

    name: str = ""
    supports: tuple[str, ...] = ("gauss-newton", "hessian")

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", **options):
        if curvature not in self.supports:
            from ..errors import InfluenceLensError

            raise InfluenceLensError(
                f"Method {self.name!r} does not support curvature {curvature!r}.",
                f"use one of {', '.join(self.supports)}",
            )
        self.regularization = float(regularization)
        self.curvature = curvature
        self.options = options

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    @abstractmethod
    def fit(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        batches: Callable[[], Iterable[Batch]],
        n_samples: int,
        progress: Progress | None = None,
    ) -> "InverseCurvature":
        """Fit the curvature of the mean training loss w.r.t. ``params``.

        ``batches()`` returns a fresh iterator over the training set in chunks (call it once per pass);
        ``n_samples`` is the number of training samples it yields in total. ``model`` is in eval mode.
        """

    @abstractmethod
    def solve(self, grads: Grads) -> Grads:
        """Return ``(H + λI)⁻¹ g`` for each of the ``k`` vectors in ``grads`` (same shapes)."""

    def set_regularization(self, value: float) -> None:
        """Change ``λ``; methods with a fitted eigendecomposition reuse it instead of refitting."""
        self.regularization = float(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors, for the on-disk cache (empty when the method keeps nothing worth caching)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NotImplementedError(f"{type(self).__name__} cannot load a cached state")


class EigenbasisInverse(InverseCurvature):
    """An inverse that is diagonal in a per-block orthonormal basis: ``(H + λI)⁻¹ = ⊕_b Q_b diag(d_b) Q_bᵀ``.

    Influences then never leave the basis: with coordinates ``r_i = Qᵀ ∇ℓ_i``,
    ``I(z_i, z_t) = Σ_b r_tᵀ diag(d_b) r_i``. The engine uses :meth:`basis_grads` instead of per-sample
    gradients followed by :meth:`solve` whenever it can (K-FAC/EK-FAC: the coordinates come straight from
    layer inputs and output gradients, without forming parameter-sized per-sample gradients first).
    """

    @abstractmethod
    def basis_grads(self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor,
                    y: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``(block, r)`` per block: coordinates ``r (b, ...)`` of each sample's loss gradient in the basis."""

    @abstractmethod
    def inverse_diagonal(self) -> dict[str, torch.Tensor]:
        """``d`` per block, shaped like one sample's coordinates: ``1 / (eigenvalue + λ)``."""


METHODS: dict[str, type[InverseCurvature]] = {}
"""Method name → class; filled as method modules are imported."""
