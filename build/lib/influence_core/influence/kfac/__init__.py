"""K-FAC and EK-FAC, split as Kronfluence does: tracked layer types (:mod:`.layers`), the fitted factors of one
layer (:mod:`.factors`) and the inverse that fits and applies them (:mod:`.inverse`)."""

from .factors import LayerFactors
from .inverse import EKFAC, KFAC, KFACInverse
from .layers import LAYER_TYPES, TrackedLayer

__all__ = ["EKFAC", "KFAC", "KFACInverse", "LAYER_TYPES", "LayerFactors", "TrackedLayer"]
