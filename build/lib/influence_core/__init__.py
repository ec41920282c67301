"""Influence Lens: find the training images behind a prediction, and the labels that look wrong.

Plain library (no Streamlit): data loading and label corruption (:mod:`.data`, :mod:`.corruption`), cached
ResNet18 training (:mod:`.training`, :mod:`.run`), influence functions (:mod:`.influence`, :mod:`.pipeline`),
analysis (:mod:`.analysis`), corruption experiments and the notebook's claim (:mod:`.experiments`), the review store
(:mod:`.review`) and the CLI (:mod:`.cli`).
"""

from .data import ImageSet, Split, available_classes, load_dataset, split_dataset
from .errors import InfluenceLensError
from .run import Run
from .training import TrainConfig, train

__all__ = [
    "ImageSet",
    "InfluenceLensError",
    "Run",
    "Split",
    "TrainConfig",
    "available_classes",
    "load_dataset",
    "split_dataset",
    "train",
]
