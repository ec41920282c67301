"""Label corruption for experiments: flip training labels and remember which ones."""

from __future__ import annotations

import numpy as np

from .errors import InfluenceLensError


def flip_random(labels: np.ndarray, fraction: float, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction * n)`` labels chosen at random to a different random class.

    Returns ``(new_labels (n,) int64, flipped positions (k,) int64 sorted)``.
    """
    _check(fraction, n_classes)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    k = int(round(fraction * len(labels)))
    picked = np.sort(rng.choice(len(labels), size=k, replace=False))
    new = labels.copy()
    shift = rng.integers(1, n_classes, size=k)  # never 0: the new class always differs
    new[picked] = (labels[picked] + shift) % n_classes
    return new, picked


def flip_top_influence(
    labels: np.ndarray, influence: np.ndarray, fraction: float, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, flip the ``fraction`` of points with the highest influence (the reference notebook's choice).

    ``influence``: (n,) e.g. mean influence over the test set. Flipped points go to a random other class.
    """
    _check(fraction, n_classes)
    labels = np.asarray(labels, dtype=np.int64)
    influence = np.asarray(influence, dtype=np.float64)
    if influence.shape != labels.shape:
        raise InfluenceLensError(
            f"The influence vector has shape {influence.shape}, the labels {labels.shape}.",
            "pass one influence value per training sample",
        )
    rng = np.random.default_rng(seed)
    per_class = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        per_class.append(members[np.argsort(-influence[members], kind="stable")[:k]])
    picked = np.sort(np.concatenate(per_class)).astype(np.int64)
    new = labels.copy()
    new[picked] = (labels[picked] + rng.integers(1, n_classes, size=len(picked))) % n_classes
    return new, picked


def _check(fraction: float, n_classes: int) -> None:
    if not 0 <= fraction < 1:
        raise InfluenceLensError(f"Corruption fraction {fraction} must be in [0, 1).", "for example 0.1 for 10 %")
    if n_classes < 2:
        raise InfluenceLensError("Label flipping needs at least two classes.")
