"""Influence functions for image classifiers: the :class:`InfluenceModel` engine and its configured methods.

Importing this package registers every method in :data:`METHODS`: ``direct``, ``cg``, ``lissa``,
``arnoldi``, ``kfac`` and ``ekfac``.
"""

from .arnoldi import Arnoldi
from .base import METHODS, Grads, InverseCurvature, Method
from .cg import CG
from .choices import (
    Curvature,
    Damping,
    Scope,
    ScopeArg,
    default_damping,
    method_options,
    parse_scope,
    scope_text,
)
from .direct import Direct
from .engine import ImageSource, InfluenceFactors, InfluenceModel
from .kfac import EKFAC, KFAC
from .lissa import LiSSA

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "METHODS",
    "Arnoldi",
    "Curvature",
    "Damping",
    "Direct",
    "Grads",
    "ImageSource",
    "InfluenceFactors",
    "InfluenceModel",
    "InverseCurvature",
    "LiSSA",
    "Method",
    "Scope",
    "ScopeArg",
    "default_damping",
    "method_options",
    "parse_scope",
    "scope_text",
]
