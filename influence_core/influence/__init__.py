"""Influence functions for image classifiers: the :class:`InfluenceModel` engine and its methods.

Importing this package registers every method in :data:`METHODS`: ``direct``, ``cg``, ``lissa``,
``arnoldi``, ``kfac`` and ``ekfac``.
"""

from . import arnoldi, cg, direct, kfac, lissa  # noqa: F401  (registration)
from .base import METHODS, Grads, InverseCurvature
from .engine import InfluenceModel, TestFactors

__all__ = ["METHODS", "Grads", "InfluenceModel", "InverseCurvature", "TestFactors"]
