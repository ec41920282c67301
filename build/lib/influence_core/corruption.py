"""Label corruption for experiments: flip training labels and remember which ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InfluenceLensError

if TYPE_CHECKING:
    from .progress import Progress
    from .run import Run


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


def clean_run_scores(clean: Run, device: str = "auto", progress: Progress | None = None) -> np.ndarray:
    """Mean test influence of each training point of ``clean`` (n_train,) float64, for :func:`flip_top_influence`.

    Uses the run's cached default influence entry, computing it if missing. ``clean`` must have no flipped
    labels: the notebook ranks points by their influence in a clean model.
    """
    from .pipeline import DEFAULT_SETTINGS, compute_influence

    n_flipped = int(clean.flipped().sum())
    if n_flipped:
        raise InfluenceLensError(
            f"{clean.path} is not a clean run: {n_flipped} of its training labels are flipped.",
            "train a run without --corrupt-fraction and take the scores from it",
        )
    result = compute_influence(clean, DEFAULT_SETTINGS, device=device, progress=progress)
    return np.asarray(result.mean_influence, dtype=np.float64)


def _check(fraction: float, n_classes: int) -> None:
    if not 0 <= fraction < 1:
        raise InfluenceLensError(f"Corruption fraction {fraction} must be in [0, 1).", "for example 0.1 for 10 %")
    if n_classes < 2:
        raise InfluenceLensError("Label flipping needs at least two classes.")
