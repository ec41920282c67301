"""The linear datamodeling score (LDS, Park et al. 2023 "TRAK"): how well an influence matrix predicts retraining.

M models are trained on random subsets of the training set (``subset_indices``); each model's output on every
test point is measured (the true label's margin, ``true_label_margin``, or minus the loss). A method predicts
model m's output on test point t as ``Σ_{i∈S_m} I[t, i]`` (positive = helpful); the LDS of test point t is the
Spearman correlation, across the M models, between measured and predicted, and the score is its mean over the
test points with the standard error of that mean (``lds``). ``benchmarks/lds.py`` trains the models and scores
every method's matrix with these functions.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

SUBSET_SEED = 20231
"""Base of every subset's random draw: subset m is ``default_rng([SUBSET_SEED, m]).choice(...)``."""


def subset_indices(model_index: int, n_train: int, fraction: float) -> np.ndarray:
    """(round(fraction · n_train),) sorted int64 indices of model ``model_index``'s training subset."""
    rng = np.random.default_rng([SUBSET_SEED, model_index])
    return np.sort(rng.choice(n_train, int(round(fraction * n_train)), replace=False)).astype(np.int64)


def true_label_margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) float64 ``logit_y − logsumexp(logits of the other classes)`` for logits (n, K), labels y (n,)."""
    logits = np.asarray(logits, np.float64)
    own = logits[np.arange(len(y)), y]
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    top = others.max(1)
    return own - (top + np.log(np.exp(others - top[:, None]).sum(1)))


def lds(influences: np.ndarray, masks: np.ndarray, measured: np.ndarray) -> dict:
    """Linear datamodeling score of an influence matrix.

    ``influences (n_test, n_train)``: positive = helpful (raises ``measured``); ``masks (M, n_train)`` bool: the
    training subset of each model; ``measured (M, n_test)``: each model's output on each test point, oriented so
    that helpful training data raises it (the margin, or minus the loss). Prediction for model m and test point
    t: ``Σ_{i∈S_m} I[t, i]``. Returns ``{"lds": mean over test points of the Spearman correlation across the
    M models, "se": its standard error, "per_test": (n_test,) correlations (NaN where either side is constant),
    "n_test": test points with a defined correlation, "n_models": M}``.
    """
    predicted = masks.astype(np.float64) @ np.asarray(influences, np.float64).T  # (M, n_test)
    rp, rm = rankdata(predicted, axis=0), rankdata(np.asarray(measured, np.float64), axis=0)
    rp -= rp.mean(0)
    rm -= rm.mean(0)
    denom = np.sqrt((rp * rp).sum(0) * (rm * rm).sum(0))
    per_test = np.divide((rp * rm).sum(0), denom, out=np.full(denom.shape, np.nan), where=denom > 0)
    valid = per_test[np.isfinite(per_test)]
    se = float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else float("nan")
    return {
        "lds": float(valid.mean()) if len(valid) else float("nan"),
        "se": se,
        "per_test": per_test,
        "n_test": int(len(valid)),
        "n_models": int(len(masks)),
    }


def paired_difference(per_test: np.ndarray, reference: np.ndarray) -> dict:
    """Mean over test points of ``per_test − reference`` (per-test-point LDS) and its standard error."""
    d = (per_test - reference)[np.isfinite(per_test - reference)]
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n_test": int(len(d))}


def magnitude(masks: np.ndarray, losses: np.ndarray, influences: np.ndarray, full_losses: np.ndarray) -> dict:
    """How well the matrix's scale matches: for every model m and test point t, the measured loss change
    ``losses[m, t] − full_losses[t]`` against the predicted ``Σ_{i∉S_m} I[t, i] / n_train`` (removing the part
    left out). ``masks (M, n_train)``, ``losses (M, n_test)``, ``full_losses (n_test,)``. Least-squares slope
    through the origin (1 = calibrated) and Pearson r, pooled over (m, t)."""
    n_train = masks.shape[1]
    predicted = (~masks).astype(np.float64) @ np.asarray(influences, np.float64).T / n_train
    measured = (losses - full_losses[None, :])[:, : len(influences)]
    pred, meas = predicted.ravel(), measured.ravel()
    return {
        "slope": float(pred @ meas / (pred @ pred)) if pred.any() else None,
        "pearson": float(np.corrcoef(pred, meas)[0, 1]) if pred.std() > 0 else None,
    }
