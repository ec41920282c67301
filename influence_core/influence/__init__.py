"""Influence functions for image classifiers: the :class:`InfluenceModel` engine and its methods.

Methods register themselves in :data:`METHODS` on import: ``direct``, ``cg``, ``lissa`` and ``arnoldi``
always; ``kfac``/``ekfac`` when their module (``kfac.py``) is present.
"""

from importlib.util import find_spec

from . import arnoldi, cg, direct, lissa  # noqa: F401  (registration)
from .base import METHODS, Grads, InverseCurvature
from .engine import InfluenceModel, TestFactors

if find_spec(f"{__name__}.kfac") is not None:  # written separately; import errors inside it still surface
    from . import kfac  # noqa: F401

__all__ = ["METHODS", "Grads", "InfluenceModel", "InverseCurvature", "TestFactors"]
