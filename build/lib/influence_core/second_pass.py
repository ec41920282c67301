"""A second pass over the suspected labels: retrain without the top suspects, then score every training image by
the loss of its given label under that model.

A flipped label is found because the model disagrees with it, and a model trained on the flips disagrees less
sharply. Leaving out the top ``share`` of the training set by ``mean_loss`` (the first-pass signal) takes most
flips out of training, so the retrained model is cleaner and scores the suspects out of sample. It costs one
more training (leave-group-out: the run's recipe, seed, batches and augmentation draws, minus the suspects).
Measured gains are in the README ("Finding wrong labels").

File: ``second_pass.npz`` in the run directory (:attr:`~influence_core.paths.RunPaths.second_pass`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .analysis import cross_entropy
from .errors import InfluenceLensError
from .progress import Progress
from .run import Run
from .rundir import run_lock
from .storage import atomic_save_npz, stable_hash
from .training import _predict, retrain_without

SECOND_PASS_SIGNAL = "loss_without_suspects"
"""The signal's key (:data:`~influence_core.analysis.SIGNALS`)."""
DEFAULT_SHARE = 0.1
"""Share of the training set left out of the second pass: the top suspects by ``mean_loss``."""


@dataclass(frozen=True)
class SecondPass:
    """``loss``: (n_train,) float32 cross-entropy of each training image's given label under the model retrained
    without the suspects (eval mode, unaugmented images), higher = more suspicious; ``left_out``: (n_train,) bool,
    the suspects; ``share``: their share of the training set; ``accuracy_test``: the retrained model's test
    accuracy (the run's own is in its metrics); ``seconds``: training and scoring time."""

    loss: np.ndarray
    left_out: np.ndarray
    share: float
    accuracy_test: float
    seconds: float


def load_second_pass(run: Run, share: float | None = None) -> SecondPass | None:
    """The cached second pass of ``run`` (at ``share``; None: at whichever share it was computed), or None (never
    computed, another share, or the run was retrained since)."""
    path = run.paths.second_pass
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            stored = float(f["share"])
            if (share is not None and share != stored) or str(f["key"]) != _key(run, stored):
                return None
            return SecondPass(
                loss=f["loss"],
                left_out=f["left_out"],
                share=stored,
                accuracy_test=float(f["accuracy_test"]),
                seconds=float(f["seconds"]),
            )
    except (OSError, ValueError, KeyError):
        return None  # unreadable: computed again


def suspects(run: Run, share: float) -> np.ndarray:
    """(n_train,) bool: the top ``share`` of the training set by ``mean_loss`` (at least one), left out of the
    second pass."""
    mean_loss = run.dynamics["loss"].mean(0)
    left_out = np.zeros(len(mean_loss), bool)
    left_out[np.argsort(-mean_loss, kind="stable")[: max(1, round(share * len(mean_loss)))]] = True
    return left_out


def label_losses(model, x, y) -> np.ndarray:
    """(n,) cross-entropy of each given label ``y`` under ``model`` (eval mode) on images ``x``."""
    return cross_entropy(_predict(model, x), np.asarray(y))


def compute_second_pass(
    run: Run, share: float = DEFAULT_SHARE, device: str = "auto", progress: Progress | None = None
) -> SecondPass:
    """Retrain ``run`` without its top ``share`` suspects by ``mean_loss`` and score every training image (cached
    in the run directory; a second call returns the cached result)."""
    check_share(share)
    if (cached := load_second_pass(run, share)) is not None:
        return cached
    t0 = time.perf_counter()
    left_out = suspects(run, share)
    model, _ = retrain_without(run, left_out, device=device, progress=progress)
    loss = label_losses(model, *run.tensors("train")).astype(np.float32)
    x_test, y_test = run.tensors("test")
    accuracy = float((_predict(model, x_test).argmax(1) == y_test.numpy()).mean()) if len(y_test) else float("nan")
    result = SecondPass(loss, left_out, share, accuracy, time.perf_counter() - t0)
    with run_lock(run.paths):
        run.require_unchanged()
        atomic_save_npz(
            run.paths.second_pass,
            key=np.array(_key(run, share)),
            loss=loss,
            left_out=left_out,
            share=np.array(share),
            accuracy_test=np.array(accuracy),
            seconds=np.array(result.seconds),
        )
    return result


def check_share(share: float) -> None:
    """Refuse a share of suspects outside (0, 0.5] (NaN included)."""
    if not 0 < share <= 0.5:
        raise InfluenceLensError(
            f"The share of suspects to leave out must be in (0, 0.5], not {share}.", f"for example {DEFAULT_SHARE}"
        )


def _key(run: Run, share: float) -> str:
    return stable_hash("second-pass-v1", run.key, float(share))
