"""Rankings and detection metrics over influence results; plain numpy/pandas/sklearn, no plotting.

Conventions: ``influences`` is (n_test, n_train) float32 with positive = helpful (the training point lowered
that test point's loss); every suspicion ``score`` is (n_train,) with *higher = more likely mislabeled*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

RECALL_FRACTIONS = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class Signal:
    """A mislabel-suspicion signal: ``key`` in results, ``label`` for people, ``explanation`` for the app."""

    key: str
    label: str
    explanation: str


SIGNALS: dict[str, Signal] = {s.key: s for s in (
    Signal("mean_loss", "High loss during training",
           "The given label's cross-entropy averaged over every epoch's training pass. A flipped label "
           "disagrees with what the image looks like, so it stays hard to fit for many epochs, even if the "
           "final model memorises it in the end. Best measured signal (see README), hence the default."),
    Signal("checkpoint_self_influence", "Self-influence over training (TracIn-style)",
           "Self-influence I(z, z) summed over the checkpoints kept during training. A flipped label is "
           "hard to fit, so it has a large, self-reinforcing gradient for most of training, even if the "
           "final model has memorised it."),
    Signal("mean_margin", "Low margin during training",
           "Minus the mean margin (logit of the given label minus the best other logit) over all "
           "epochs' training passes: points whose given label the model kept disagreeing with."),
    Signal("self_influence", "Self-influence (final model)",
           "I(z, z) at the final model: how much the point supports its own prediction. High for "
           "atypical or mislabeled points, but weak once the model has memorised the flips."),
    Signal("neg_mean_test_influence", "Harmful to the test set",
           "Minus the mean influence over all test images: points whose removal would lower the test loss."),
    Signal("training_loss", "Training loss (baseline)",
           "Cross-entropy of the given label at the final model: the obvious baseline."),
)}


def top_k(influence_row: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``k`` most helpful and ``k`` most harmful training points for one test point.

    ``influence_row``: (n_train,); ``candidates``: optional (n_train,) bool mask (e.g. same label only).
    Returns (helpful (≤k,), harmful (≤k,)), most extreme first.
    """
    pos = np.flatnonzero(candidates) if candidates is not None else np.arange(len(influence_row))
    order = pos[np.argsort(-influence_row[pos], kind="stable")]
    return order[:k], order[::-1][:k]


def mean_influence(influences: np.ndarray) -> np.ndarray:
    """(n_train,) mean influence of each training point over the test set."""
    return influences.mean(axis=0)


def detection_metrics(scores: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUROC and the fraction of flips found after inspecting the top 5 / 10 / 20 % by score."""
    flipped = np.asarray(flipped, bool)
    out = {"auroc": float(roc_auc_score(flipped, scores)) if 0 < flipped.sum() < len(flipped) else float("nan")}
    order = np.argsort(-scores, kind="stable")
    for f in RECALL_FRACTIONS:
        k = int(np.ceil(f * len(scores)))
        out[f"recall_at_{round(f * 100)}pct"] = float(flipped[order[:k]].sum() / max(flipped.sum(), 1))
    return out


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> pd.DataFrame:
    """Fraction of flips found vs fraction of the training set inspected, best score first."""
    flipped = np.asarray(flipped, bool)
    found = np.cumsum(flipped[np.argsort(-scores, kind="stable")])
    n = len(scores)
    return pd.DataFrame({"inspected": np.arange(1, n + 1) / n, "found": found / max(flipped.sum(), 1)})


def corruption_table(influence: np.ndarray, labels: np.ndarray, flipped: np.ndarray,
                     classes: list[str]) -> pd.DataFrame:
    """The reference notebook's table: per given label, mean influence of clean and corrupted points."""
    rows = []
    for c, name in enumerate(classes):
        own = labels == c
        clean, bad = influence[own & ~flipped], influence[own & flipped]
        rows.append({"label": name, "n_clean": int(len(clean)), "n_corrupted": int(len(bad)),
                     "mean_clean": float(clean.mean()) if len(clean) else np.nan,
                     "mean_corrupted": float(bad.mean()) if len(bad) else np.nan})
    df = pd.DataFrame(rows)
    df["difference"] = df["mean_clean"] - df["mean_corrupted"]
    return df


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) per-sample cross-entropy of ``labels`` under ``probs`` (n, K)."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
