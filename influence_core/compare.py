"""Before and after: what a child run (corrected labels, :mod:`influence_core.fixes`) changed against its parent.

Both runs predict the same test images (the child keeps the parent's split), so the comparison is paired: the
difference of test accuracy and macro F1 gets a 95 % bootstrap interval over test images (the same resampled
images for both runs), and every test image whose prediction changed is listed as *fixed* (wrong before, right
after) or *broken* (right before, wrong after). Every number comes from the two runs' own files.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .errors import InfluenceLensError
from .fixes import lineage, parent_of, true_labels_dir
from .paths import RunPaths
from .run import Run
from .second_pass import load_second_pass

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, index: np.ndarray | None = None) -> np.ndarray:
    """Macro F1 over the classes present in the truth or the predictions (scikit-learn's ``average="macro"``).

    ``y_true``, ``y_pred``: (n,) int class indices; ``index``: (B, n) int resampled rows (None: the rows as
    they are, B = 1). Returns (B,) float64."""
    index = np.arange(len(y_true))[None] if index is None else index
    t, p = y_true[index], y_pred[index]  # (B, n)
    scores, present = [], []
    for c in range(n_classes):
        is_t, is_p = t == c, p == c
        tp = (is_t & is_p).sum(1)
        denominator = is_t.sum(1) + is_p.sum(1)  # 2 tp + fp + fn
        scores.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
        present.append(denominator > 0)
    scores_a, present_a = np.array(scores), np.array(present)
    return (scores_a * present_a).sum(0) / np.maximum(present_a.sum(0), 1)


def paired_difference(
    y_true: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    n_classes: int,
    n_boot: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``after - before`` for accuracy and macro F1 on the same test images, each with a percentile bootstrap
    interval (``CONFIDENCE``) over the images: ``{"accuracy": {"before", "after", "difference", "low", "high"},
    "f1": {...}}``."""
    metrics = {
        "accuracy": lambda pred, idx: (pred == y_true)[idx].mean(-1),
        "f1": lambda pred, idx: macro_f1(y_true, pred, n_classes, idx),
    }
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    for rows in np.array_split(np.arange(n_boot), max(1, n_boot // 100)):  # 100 resamples in memory at a time
        idx = rng.integers(0, len(y_true), (len(rows), len(y_true)))
        for name, metric in metrics.items():
            diffs[name].append(metric(after, idx) - metric(before, idx))
    whole = np.arange(len(y_true))[None]
    tail = (1 - CONFIDENCE) / 2 * 100
    out = {}
    for name, metric in metrics.items():
        b, a, d = float(metric(before, whole)[0]), float(metric(after, whole)[0]), np.concatenate(diffs[name])
        out[name] = {
            "before": b,
            "after": a,
            "difference": a - b,
            "low": float(np.percentile(d, tail)),
            "high": float(np.percentile(d, 100 - tail)),
        }
    return out


def compare_runs(after: Run, before: Run | None = None, *, n_boot: int = BOOTSTRAP_SAMPLES) -> dict:
    """Everything the before / after view shows, as plain JSON-able values. ``before`` defaults to the parent of
    ``after`` (:func:`influence_core.fixes.parent_of`). The two runs must have the same classes and test images.

    Keys: ``before`` / ``after`` (name, accuracy, f1, n_train, flips_in_training), ``difference`` (see
    :func:`paired_difference`), ``per_class`` (class, precision / recall before and after), ``confusion``
    (before / after, rows = true class), ``fixed`` / ``broken`` (test ids whose prediction changed), ``changes``
    (relabelled / excluded, from the lineage, None when ``after`` is no child of ``before``), ``flips`` (for runs
    with labels flipped on purpose: how many were in the parent's training set, corrected, excluded, left),
    ``second_pass`` (the parent's second-pass test accuracy, or None), ``true_labels`` (the run on the true labels,
    as ``before``, when it was trained; None otherwise)."""
    before = before or parent_of(after)
    if before.classes != after.classes:
        raise InfluenceLensError(
            f"{after.path.name} and {before.path.name} have different classes.", "compare runs of the same classes"
        )
    test_ids = after.ids("test")
    if test_ids != before.ids("test"):
        raise InfluenceLensError(
            f"{after.path.name} and {before.path.name} were tested on different images.",
            "compare a corrected run with the run it was made from (same split)",
        )
    y = after.true_labels("test")
    pred_before, pred_after = (r.predictions["probs_test"].argmax(1) for r in (before, after))
    k = after.n_classes
    labels = list(range(k))
    p_b, r_b, _, _ = precision_recall_fscore_support(y, pred_before, labels=labels, zero_division=0)
    p_a, r_a, _, _ = precision_recall_fscore_support(y, pred_after, labels=labels, zero_division=0)
    record = lineage(after)
    changes = (
        {"relabelled": record["relabelled"], "excluded": record["excluded"]}
        if record is not None and record.get("parent_key") == before.key
        else None
    )
    return {
        "before": _summary(before, y, pred_before),
        "after": _summary(after, y, pred_after),
        "difference": paired_difference(y, pred_before, pred_after, k, n_boot),
        "per_class": [
            {
                "class": name,
                "precision_before": float(p_b[c]),
                "precision_after": float(p_a[c]),
                "recall_before": float(r_b[c]),
                "recall_after": float(r_a[c]),
            }
            for c, name in enumerate(after.classes)
        ],
        "confusion": {
            "before": confusion_matrix(y, pred_before, labels=labels).tolist(),
            "after": confusion_matrix(y, pred_after, labels=labels).tolist(),
        },
        "fixed": [i for i, b, a, t in zip(test_ids, pred_before, pred_after, y, strict=True) if b != t and a == t],
        "broken": [i for i, b, a, t in zip(test_ids, pred_before, pred_after, y, strict=True) if b == t and a != t],
        "changes": changes,
        "flips": _flips(before, after),
        "second_pass": _second_pass_accuracy(before),
        "true_labels": _true_labels(before, test_ids, y),
    }


def _summary(run: Run, y: np.ndarray, pred: np.ndarray) -> dict:
    return {
        "name": run.path.name,
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "f1": float(macro_f1(y, pred, run.n_classes)[0]),
        "n_train": len(run.ids("train")),
        "flips_in_training": int(run.flipped().sum()),
    }


def _flips(before: Run, after: Run) -> dict | None:
    """Labels flipped on purpose in ``before``'s training set and what became of them in ``after``: ``before``
    (how many), ``corrected``, ``excluded``, ``left`` (still wrong), ``new_errors`` (other images whose label
    now differs from the truth, e.g. a wrong correction); None when ``before`` had no flips."""
    ids = before.part("train")["id"][before.flipped()]
    if not len(ids):
        return None
    train = after.part("train").set_index("id")
    kept = ids[ids.isin(train.index)]
    wrong = train.loc[kept, "label"] != train.loc[kept, "true_label"]
    return {
        "before": len(ids),
        "corrected": int((~wrong).sum()),
        "excluded": len(ids) - len(kept),
        "left": int(wrong.sum()),
        "new_errors": int(after.flipped().sum() - wrong.sum()),
    }


def _true_labels(run: Run, test_ids: list[str], y: np.ndarray) -> dict | None:
    """The summary of the run trained on the true labels (:func:`~influence_core.fixes.true_labels_dir`) when it
    exists and ``run`` had labels flipped on purpose, else None."""
    path = true_labels_dir(run)
    if not run.flipped().any() or not RunPaths(path).train_key.is_file():
        return None
    clean = Run(path)
    if clean.ids("test") != test_ids:
        return None
    return _summary(clean, y, clean.predictions["probs_test"].argmax(1))


def _second_pass_accuracy(run: Run) -> float | None:
    second = load_second_pass(run)
    return None if second is None else float(second.accuracy_test)
