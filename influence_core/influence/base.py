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
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
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
        """The method registered as ``name`` with ``options`` (unknown names and options, and values of the wrong
        type, are clear errors)."""
        method = registered(name)
        types = option_types(method)
        unknown = sorted(set(options) - set(types))
        if unknown:
            raise InfluenceLensError(
                f"Unknown option(s) for method {name!r}: {', '.join(unknown)}.",
                f"use any of {', '.join(sorted(types)) or '(none)'}",
            )
        for key, value in options.items():
            check_option(name, key, value, types[key])
        return method(**options)

    @classmethod
    def parse(cls, name: str, texts: Iterable[str] = ()) -> Method:
        """The method registered as ``name`` with options given as text, as the CLI's ``--option`` and the app take
        them: ``parse("kfac", ["rank=1024", "fit_examples=none"])`` → ``KFAC(rank=1024, fit_examples=None)``.

        Each value is read as its option's declared type (an integer, a number, ``none`` or one of the option's
        words); text that is not is a clear error naming the option, as is an unknown option. A later key wins.
        """
        method = registered(name)
        types = option_types(method)
        values = {}
        for pair in texts:
            key, sep, text = pair.partition("=")
            key = key.strip()
            if not sep or not key:
                raise InfluenceLensError(f"Method option {pair!r} is not KEY=VALUE.", "write e.g. rank=1024")
            values[key] = read_option(name, key, text.strip(), types[key]) if key in types else text
        return cls.named(name, **values)

    def options(self) -> dict[str, Any]:
        """The options set to something other than their default (``{}`` for a method at its defaults)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def describe(self) -> str:
        """``"kfac"``, ``"kfac, rank=1024"``: the name and the options that differ from the defaults."""
        return "".join([self.name, *(f", {k}={v}" for k, v in self.options().items())])

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


def registered(name: str) -> type[Method]:
    """The method class registered as ``name`` (an unknown name is a clear error)."""
    if name not in METHODS:
        raise InfluenceLensError(f"Unknown influence method {name!r}.", f"use one of {', '.join(METHODS)}")
    return METHODS[name]


def option_types(method: type[Method]) -> dict[str, Any]:
    """Option name → its declared type (``int``, ``int | None``, ``float | Literal["auto"]``, …)."""
    hints = typing.get_type_hints(method)
    return {f.name: hints[f.name] for f in dataclasses.fields(method)}


def _alternatives(hint: Any) -> list[Any]:
    """A declared type as the list of what it allows: types (``int``, ``float``, ``str``, ``NoneType``) and the
    words of a ``Literal``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [alt for arg in typing.get_args(hint) for alt in _alternatives(arg)]
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [hint]


def _expected(alternatives: list[Any]) -> str:
    words = {int: "an integer", float: "a number", str: "text", type(None): "none"}
    return " or ".join(words.get(alt, repr(alt)) for alt in alternatives)


def read_option(method: str, key: str, text: str, hint: Any) -> Any:
    """``text`` read as option ``key``'s declared type ``hint``: one of its words, ``none`` (for None), an
    integer, a finite number, in that order; anything else is a clear error."""
    allowed = _alternatives(hint)
    if text in allowed:
        return text
    if text.lower() == "none" and type(None) in allowed:
        return None
    for kind in (int, float):
        if kind in allowed:
            try:
                value = kind(text)
            except ValueError:
                continue
            if math.isfinite(value):
                return value
    if str in allowed:
        return text
    raise InfluenceLensError(
        f"Method option {key}={text!r} of {method} is not {_expected(allowed)}.",
        f"write e.g. {key}={_default_text(method, key)}",
    )


def check_option(method: str, key: str, value: Any, hint: Any) -> None:
    """Refuse a Python value of the wrong type for option ``key`` (an integer option never takes 1.5 or True)."""
    allowed = _alternatives(hint)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not any(
        (alt is type(None) and value is None)
        or (alt is int and number and isinstance(value, int))
        or (alt is float and number and math.isfinite(value))
        or (alt is str and isinstance(value, str))
        or (isinstance(alt, str) and value == alt)
        for alt in allowed
    ):
        raise InfluenceLensError(
            f"Method option {key}={value!r} of {method} is not {_expected(allowed)}.",
            f"write e.g. {key}={_default_text(method, key)}",
        )


def _default_text(method: str, key: str) -> str:
    default = next(f.default for f in dataclasses.fields(METHODS[method]) if f.name == key)
    return "none" if default is None else str(default)


def positive(owner: str, **values: float | None) -> None:
    """Refuse options that must be positive (clear error at construction)."""
    for key, value in values.items():
        if value is not None and not value > 0:
            raise InfluenceLensError(
                f"{owner} option {key} must be positive, got {value!r}.",
                f"use {owner}({key}=...) with a positive value",
            )


def check_seed(owner: str, seed: int) -> None:
    """Refuse a random seed that numpy and torch generators cannot take (negative, or 2⁶³ and above)."""
    if not 0 <= seed < 2**63:
        raise InfluenceLensError(f"{owner} option seed must be in [0, 2^63), got {seed!r}.", "use e.g. seed=0")


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

    def block_damping(self, damping: Damping) -> dict[str, float]:
        """``λ`` per block; refuses a ``λ`` below :data:`FLOAT32_RESOLUTION` × the block's top eigenvalue."""
        out = {}
        scales = self.block_scales(with_mean=damping.relative_to == "mean", with_top=damping.relative_to == "top")
        for block, scale in scales.items():
            lam = damping.resolve(scale.mean, scale.top)
            if not math.isfinite(lam) or lam <= 0:
                raise InfluenceLensError(
                    f"Block {block!r} has no curvature to take λ relative to (λ = {lam:g}).",
                    "use an absolute damping, e.g. 1e-3",
                )
            if scale.top is not None and lam < FLOAT32_RESOLUTION * scale.top:
                raise InfluenceLensError(
                    f"λ = {lam:.3g} is below what float32 gradients resolve for block {block or '(all)'!r}, whose "
                    f"largest curvature eigenvalue is {scale.top:.3g} (condition number "
                    f"{(scale.top + lam) / lam:.2g}); influences would be rounding noise.",
                    f"use damping ≥ {FLOAT32_RESOLUTION * scale.top:.2g}, or damping relative to the largest "
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
        (lam,) = self.block_damping(damping).values()
        k = next(iter(grads.values())).shape[0]
        size = self.rhs_chunk or rows_per_chunk(params, k, SOLVE_BYTES)
        return concat([self.solve_chunk(part, lam) for part in split(grads, size)])

    @abstractmethod
    def solve_chunk(self, b: Grads, lam: float) -> Grads:
        """``(H + λI)⁻¹ b`` for one group of stacked right-hand sides."""


METHODS: dict[str, type[Method]] = {}
"""Method name → configuration class; filled as method modules are imported (``direct``, ``cg``, ``lissa``,
``arnoldi``, ``kfac``, ``ekfac``)."""
