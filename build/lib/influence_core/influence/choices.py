"""The choices an influence computation offers, each defined once: curvatures, scopes, damping and method options.

The CLI, the app and the benchmarks read their option lists from here (methods: :data:`.base.METHODS`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import InfluenceLensError


class Curvature(StrEnum):
    """Which matrix ``H`` approximates the curvature of the mean training loss."""

    GAUSS_NEWTON = "gauss-newton"
    """``(1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i``: positive semi-definite (for softmax + CE: the Fisher)."""
    HESSIAN = "hessian"
    """``(1/n) Σ_i ∇²ℓ_i``: exact, but indefinite away from a minimum."""

    @classmethod
    def parse(cls, value: str) -> Curvature:
        try:
            return cls(value)
        except ValueError:
            raise InfluenceLensError(f"Unknown curvature {value!r}.", f"use one of {', '.join(cls)}") from None


class Scope(StrEnum):
    """Which parameters influence is taken over (besides an explicit tuple of module names)."""

    HEAD = "head"
    """The last ``nn.Linear`` of the model, on backbone features computed once per image set."""
    ALL = "all"
    """Every ``nn.Conv2d`` and ``nn.Linear`` weight and bias."""


ScopeArg = Scope | tuple[str, ...]
"""A scope: :class:`Scope` or the names of modules (as in ``model.named_modules()``) whose parameters count."""


def parse_scope(value: str | Sequence[str]) -> ScopeArg:
    """``"head"`` / ``"all"`` → :class:`Scope`; a sequence of module names, or a comma-separated string of them
    (``"layer4.1.conv2,fc"``), → tuple of names."""
    if isinstance(value, Scope):
        return value
    if isinstance(value, str):
        if value in Scope.__members__.values():
            return Scope(value)
        value = [part.strip() for part in value.split(",") if part.strip()]
    names = tuple(value)
    if not names or not all(isinstance(n, str) for n in names):
        raise InfluenceLensError(
            f"Unknown scope {value!r}.", f"use {' or '.join(repr(s.value) for s in Scope)} or a list of module names"
        )
    return names


def scope_text(scope: ScopeArg) -> str:
    """The scope as one line of text (inverse of :func:`parse_scope`)."""
    return scope.value if isinstance(scope, Scope) else ",".join(scope)


@dataclass(frozen=True)
class Damping:
    """``λ`` of ``(H + λI)⁻¹``, absolute or relative to the curvature's scale, per block.

    * ``Damping.absolute(1e-3)``: ``λ = 1e-3`` for every block.
    * ``Damping.relative_to_top(1e-5)``: ``λ_b = 1e-5 × the largest eigenvalue of block b`` (condition number
      about ``1/fraction``; never below what float32 gradients resolve while ``fraction ≥ 1e-6``). The defaults
      (:func:`default_damping`) are of this kind.
    * ``Damping.relative(0.1)``: ``λ_b = 0.1 × mean eigenvalue of block b`` (Kronfluence's heuristic).

    The blocks are the method's: one per Linear/Conv2d layer for ``kfac``/``ekfac``, the whole scope for the others
    (whose largest eigenvalue comes from their fit or from power iteration, and whose mean eigenvalue is
    ``trace(H)/p``, exact for ``direct``, estimated for the matrix-free methods).

    ``value`` is λ or the fraction. Written as text (CLI, app): ``"1e-3"``, ``"top:1e-5"`` or ``"rel:0.1"``
    (:meth:`parse`).
    """

    value: float
    relative_to: str = ""
    """``""`` (absolute), ``"top"`` (the block's largest eigenvalue) or ``"mean"`` (its mean eigenvalue)."""

    def __post_init__(self):
        if not float(self.value) > 0:
            raise InfluenceLensError(
                f"regularization must be positive, got {self.value!r}.",
                "use e.g. 1e-3 (absolute), top:1e-5 or rel:0.1 (relative to the curvature)",
            )
        if self.relative_to not in _PREFIXES:
            raise InfluenceLensError(
                f"Unknown damping kind {self.relative_to!r}.", "use absolute, relative_to_top or relative"
            )
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def absolute(cls, value: float) -> Damping:
        return cls(value)

    @classmethod
    def relative_to_top(cls, fraction: float) -> Damping:
        """``λ_b = fraction × largest eigenvalue of block b``."""
        return cls(fraction, "top")

    @classmethod
    def relative(cls, fraction: float) -> Damping:
        """``λ_b = fraction × mean eigenvalue of block b``."""
        return cls(fraction, "mean")

    @classmethod
    def of(cls, value: float | Damping) -> Damping:
        """A float is an absolute λ."""
        return value if isinstance(value, Damping) else cls(value)

    @classmethod
    def parse(cls, text: str) -> Damping:
        """``"1e-3"`` (absolute), ``"top:1e-5"`` (relative to the largest eigenvalue) or ``"rel:0.1"`` (to the
        mean eigenvalue)."""
        text = text.strip()
        kind = next((k for k, prefix in _PREFIXES.items() if prefix and text.startswith(prefix)), "")
        try:
            value = float(text[len(_PREFIXES[kind]) :])
        except ValueError:
            raise InfluenceLensError(
                f"Cannot read regularization {text!r}.",
                "use a number (e.g. 1e-3), top:FRACTION (e.g. top:1e-5) or rel:FRACTION (e.g. rel:0.1)",
            ) from None
        return cls(value, kind)

    @classmethod
    def argument(cls, text: str) -> Damping:
        """:meth:`parse` as an argparse ``type=``: unreadable text is a usage error with the fix, not a traceback."""
        try:
            return cls.parse(text)
        except InfluenceLensError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def __str__(self) -> str:
        return f"{_PREFIXES[self.relative_to]}{self.value:g}"

    def describe(self) -> str:
        """For people: ``"1e-05 × each block's largest eigenvalue"``, ``"0.001"``."""
        what = {"": "", "top": " × each block's largest eigenvalue", "mean": " × each block's mean eigenvalue"}
        return f"{self.value:g}{what[self.relative_to]}"

    def resolve(self, mean_eigenvalue: float | None, top_eigenvalue: float | None) -> float:
        """λ for a block whose curvature has these mean and largest eigenvalues (needed only when relative)."""
        if not self.relative_to:
            return self.value
        reference = top_eigenvalue if self.relative_to == "top" else mean_eigenvalue
        if reference is None:
            raise InfluenceLensError(
                f"Relative damping needs the curvature's {self.relative_to} eigenvalue, which this fitted state "
                "does not have.",
                "fit again, or use an absolute regularization",
            )
        return self.value * reference


_PREFIXES = {"": "", "top": "top:", "mean": "rel:"}
"""Damping kind → its prefix as text."""


def default_damping(scope: ScopeArg) -> Damping:
    """The damping chosen by the linear datamodeling score of goldfish vs lemon (``benchmarks/lds.py``, README
    "Linear datamodeling score"): ``1e-3 ×`` the largest eigenvalue on the head, ``1e-5 ×`` each layer's largest
    on any larger scope (the whole network's layers want about the least damping float32 resolves)."""
    return Damping.relative_to_top(HEAD_DAMPING if scope == Scope.HEAD else NETWORK_DAMPING)


HEAD_DAMPING = 1e-3
"""Default fraction of the head's largest curvature eigenvalue (:func:`default_damping`)."""
NETWORK_DAMPING = 1e-5
"""Default fraction of each layer's largest curvature eigenvalue beyond the head (:func:`default_damping`)."""


def method_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["rank=1024", "fit_examples=none"]`` → ``{"rank": 1024, "fit_examples": None}``: each value read as an int,
    a float, ``none``, else kept as text; a later key wins. (Whether the method has such options is checked by
    :meth:`.base.Method.named`.)"""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise InfluenceLensError(f"Method option {pair!r} is not KEY=VALUE.", "write e.g. rank=1024")
        out[key.strip()] = _option_value(text.strip())
    return out


def _option_value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
