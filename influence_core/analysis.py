"""Rankings and detection metrics over influence results; plain numpy/pandas/sklearn, no plotting.

Conventions: ``influences`` is (n_test, n_train) float32 with positive = helpful (the training point lowered
that test point's loss); every suspicion ``score`` is (n_train,) with *higher = more likely mislabeled*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from .errors import InfluenceLensError

if TYPE_CHECKING:
    from .review import Action

RECALL_FRACTIONS = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class Signal:
    """A mislabel-suspicion signal: ``key`` in results, ``label`` for people, ``explanation`` for the app."""

    key: str
    label: str
    explanation: str


SIGNALS: dict[str, Signal] = {
    s.key: s
    for s in (
        Signal(
            "mean_loss",
            "High loss during training",
            "The given label's cross-entropy averaged over every epoch's training pass. A flipped label "
            "disagrees with what the image looks like, so it stays hard to fit for many epochs, even if the "
            "final model memorises it in the end. The best first signal on every run tested, hence the default "
            "until a second pass is computed.",
        ),
        Signal(
            "loss_without_suspects",
            "Loss after retraining without the top suspects (second pass)",
            "The given label's cross-entropy under a model retrained without the top suspects by high training "
            "loss (10 % of the training set by default): most flips are out of that training, so the model is "
            "cleaner and judges the suspects out of sample. Costs one more training; better than the first pass "
            "on every run tested, hence the default once computed.",
        ),
        Signal(
            "checkpoint_self_influence",
            "Self-influence over training (TracIn-style)",
            "Self-influence I(z, z) summed over the checkpoints kept during training. A flipped label is "
            "hard to fit, so it has a large, self-reinforcing gradient for most of training, even if the "
            "final model has memorised it.",
        ),
        Signal(
            "mean_margin",
            "Low margin during training",
            "Minus the mean margin (logit of the given label minus the best other logit) over all "
            "epochs' training passes: points whose given label the model kept disagreeing with.",
        ),
        Signal(
            "self_influence",
            "Self-influence (final model)",
            "I(z, z) at the final model: how much the point supports its own prediction. High for "
            "atypical or mislabeled points, but weak once the model has memorised the flips.",
        ),
        Signal(
            "neg_mean_test_influence",
            "Harmful to the test set",
            "Minus the mean influence over all test images: points whose removal would lower the test loss.",
        ),
        Signal(
            "training_loss",
            "Training loss (baseline)",
            "Cross-entropy of the given label at the final model: the obvious baseline.",
        ),
    )
}


DEFAULT_SIGNAL = "mean_loss"
"""The signal ranked by default until a second pass is computed: best first-pass AUROC measured on real data."""


def suspicion_signals(
    labels: np.ndarray,
    probs_train: np.ndarray,
    dynamics: Mapping[str, np.ndarray],
    self_influence: np.ndarray | None = None,
    mean_influence: np.ndarray | None = None,
    checkpoint_self_influence: np.ndarray | None = None,
    second_pass_loss: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every suspicion signal a run and its influence result give: key (in :data:`SIGNALS` order) → (n_train,)
    float64, higher = more suspicious.

    ``labels`` (n,) given training labels; ``probs_train`` (n, C) the final model's probabilities;
    ``dynamics["loss"]``, ``dynamics["margin"]`` (epochs, n) per epoch of training; ``self_influence`` (n,) and
    ``mean_influence`` (n,) of the final model; ``checkpoint_self_influence`` (checkpoints, n), summed into
    ``checkpoint_self_influence`` when there is more than one checkpoint; ``second_pass_loss`` (n,) when a second
    pass was computed. Without the influence inputs (not computed yet), the signals of training alone.
    """
    out = {
        "training_loss": cross_entropy(probs_train, labels).astype(np.float64),
        "mean_margin": -np.asarray(dynamics["margin"]).mean(0).astype(np.float64),
        "mean_loss": np.asarray(dynamics["loss"]).mean(0).astype(np.float64),
    }
    if self_influence is not None:
        out["self_influence"] = np.asarray(self_influence, np.float64)
    if mean_influence is not None:
        out["neg_mean_test_influence"] = -np.asarray(mean_influence, np.float64)
    if checkpoint_self_influence is not None and len(checkpoint_self_influence) > 1:
        out["checkpoint_self_influence"] = np.asarray(checkpoint_self_influence).sum(0).astype(np.float64)
    if second_pass_loss is not None:
        out["loss_without_suspects"] = np.asarray(second_pass_loss, np.float64)
    return {k: out[k] for k in SIGNALS if k in out}


def best_signal(signals: Mapping[str, np.ndarray]) -> str:
    """The signal to rank by: the second pass once computed, else :data:`DEFAULT_SIGNAL`, else final-model
    self-influence."""
    return next(k for k in ("loss_without_suspects", DEFAULT_SIGNAL, "self_influence") if k in signals)


def rank_suspects(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Training positions (≤k,) int64 ordered by descending suspicion ``scores`` (n_train,), ties by position;
    all of them when ``k`` is None. Scores that are not all finite are refused (NaN has no rank)."""
    scores = np.asarray(scores)
    bad = int(scores.size - np.isfinite(scores).sum())
    if bad:
        raise InfluenceLensError(
            f"{bad} of {scores.size} scores are not finite numbers (NaN or infinite), so they cannot be ranked.",
            "the run's files or its influence result are damaged: compute the influence again "
            "(influence-core influence --recompute) or train the run again (--retrain)",
        )
    return np.argsort(-scores, kind="stable")[:k]


def top_k(influence_row: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``k`` most helpful and ``k`` most harmful training points for one test point.

    ``influence_row``: (n_train,); ``candidates``: optional (n_train,) bool mask (e.g. same label only).
    Returns (helpful (≤k,), harmful (≤k,)), most extreme first.
    """
    pos = np.flatnonzero(candidates) if candidates is not None else np.arange(len(influence_row))
    order = pos[rank_suspects(influence_row[pos])]
    return order[:k], order[::-1][:k]


def training_flags(
    ids: Sequence[str], label_names: Sequence[str], flipped: np.ndarray, decisions: Mapping[str, Action] | None = None
) -> pd.DataFrame:
    """One row per training position (index 0..n-1), to mark images wherever a page shows them.

    Columns: id, label (the given label's name), flipped (bool: flipped on purpose by the run),
    review ('mislabeled', 'keep', 'skip', 'exclude' or '' when not reviewed; from ``ReviewStore.decisions_for``),
    corrected_label ('' unless marked mislabeled) and marks (one short text of all that, '' for none).
    """
    decisions = decisions or {}
    found = [decisions.get(str(i)) for i in ids]
    df = pd.DataFrame(
        {
            "id": list(map(str, ids)),
            "label": list(label_names),
            "flipped": np.asarray(flipped, bool),
            "review": [a.decision if a else "" for a in found],
            "corrected_label": [a.corrected_label or "" if a else "" for a in found],
        }
    )
    review_marks = {
        "mislabeled": "marked mislabeled → {}",
        "keep": "label kept by review",
        "skip": "skipped in review",
        "exclude": "excluded from training by review",
        "": "",
    }
    df["marks"] = [
        " · ".join(m for m in ("flipped" if f else "", review_marks[r].format(c)) if m)
        for f, r, c in zip(df["flipped"], df["review"], df["corrected_label"], strict=True)
    ]
    return df


@dataclass(frozen=True)
class RankingNote:
    """What a listed ranking of training images really contains, as counts and one honest sentence."""

    n_listed: int
    n_flipped: int
    n_marked_mislabeled: int
    text: str

    @property
    def has_wrong_labels(self) -> bool:
        """Whether any listed image is flipped or marked mislabeled (then never call the list clean examples)."""
        return self.n_flipped > 0 or self.n_marked_mislabeled > 0


def describe_ranking(ranked: pd.DataFrame, run_has_flips: bool) -> RankingNote:
    """Count the flipped and reviewed-mislabeled images of a ranked list (rows of :func:`training_flags`) and
    say it: e.g. "3 of the 8 images listed have a label flipped on purpose, so this is not a list of clean
    examples: an image can rank here because its label is wrong." ``run_has_flips``: whether the run flipped
    any label at all (otherwise nothing can be said about flips)."""
    n, flipped = len(ranked), int(ranked["flipped"].sum())
    mislabeled = int((ranked["review"] == "mislabeled").sum())
    verb = "has" if flipped == 1 else "have"
    facts = [
        f"{flipped} of the {n} images listed {verb} a label flipped on purpose"
        if run_has_flips
        else "This run flipped no labels on purpose"
    ]
    if mislabeled:
        facts.append(f"{mislabeled} {'is' if mislabeled == 1 else 'are'} marked mislabeled by reviewers")
    text = ", and ".join(facts)
    if flipped or mislabeled:
        text += ", so this is not a list of clean examples: an image can rank here because its label is wrong."
    elif run_has_flips:
        text += " and none is marked mislabeled by reviewers."
    else:
        text += ", and no listed image is marked mislabeled by reviewers."
    return RankingNote(n, flipped, mislabeled, text)


def detection_metrics(scores: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUROC and the fraction of flips found after inspecting the top 5 / 10 / 20 % by score."""
    flipped = np.asarray(flipped, bool)
    out = {"auroc": float(roc_auc_score(flipped, scores)) if 0 < flipped.sum() < len(flipped) else float("nan")}
    found = np.cumsum(flipped[rank_suspects(scores)])  # one sort for every fraction
    for f in RECALL_FRACTIONS:
        out[f"recall_at_{round(f * 100)}pct"] = int(found[int(np.ceil(f * len(flipped))) - 1]) / max(found[-1], 1)
    return out


def detection_curve(scores: np.ndarray, flipped: np.ndarray, points: int = 1000) -> pd.DataFrame:
    """Fraction of flips found vs fraction of the training set inspected, best score first: at most ``points``
    rows, evenly spaced in the number inspected and ending with all of it (exact at every row, for a chart)."""
    flipped = np.asarray(flipped, bool)
    found = np.cumsum(flipped[rank_suspects(scores)])
    n = len(scores)
    inspected = np.unique(np.linspace(1, n, min(n, points)).round().astype(np.int64))
    return pd.DataFrame({"inspected": inspected / n, "found": found[inspected - 1] / max(flipped.sum(), 1)})


def corruption_table(
    influence: np.ndarray, labels: np.ndarray, flipped: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """The reference notebook's table: per given label, mean influence of clean and corrupted points."""
    rows = []
    for c, name in enumerate(classes):
        own = labels == c
        clean, bad = influence[own & ~flipped], influence[own & flipped]
        rows.append(
            {
                "label": name,
                "n_clean": int(len(clean)),
                "n_corrupted": int(len(bad)),
                "mean_clean": float(clean.mean()) if len(clean) else np.nan,
                "mean_corrupted": float(bad.mean()) if len(bad) else np.nan,
            }
        )
    df = pd.DataFrame(rows)
    df["difference"] = df["mean_clean"] - df["mean_corrupted"]
    return df


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) per-sample cross-entropy of ``labels`` under ``probs`` (n, K)."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
