"""Check a ranking by retraining: remove a test image's top-k helpful (or harmful) training images, retrain with the
run's own recipe, and compare the change of the test image's loss and margin with what the influences predict.

Conventions (README, "Influence: definitions and conventions"): an influence ``I(z, z_test)`` is a per-sample
up-weighting influence, positive = helpful, so removing the set ``S`` changes the test loss by about
``Δ = Σ_{z ∈ S} I(z, z_test) / n`` (``n`` training images). The predicted probabilities follow from the run's own
``p`` (``predictions.npz``): the test label ``y`` gets ``p_y' = p_y · exp(−Δ)`` and the other classes share the
rest in their current proportions, so the predicted margin ``log p_y' − max_{c≠y} log p_c'`` (the logit of ``y``
minus the largest other logit) and whether the predicted class changes follow from ``Δ`` alone. The measured values
come from the retrained model's logits on the test image.

The direction of a check: ``helpful`` (the images that support the test image's label: removing them should flip a
right prediction), ``harmful`` (those that push it away: removing them should flip a wrong one) or ``random``
(the control: as many random training images with the same labels as the image's own direction would remove, never
those). Each check costs one training; it is kept in the run directory (``checks/``, one JSON file per run training,
influence entry, test image, direction and k) and listed by :func:`checks`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .errors import InfluenceLensError
from .measured import measured_for
from .pipeline import InfluenceResult
from .progress import Progress
from .run import Run
from .storage import atomic_write_json, read_json, stable_hash

log = logging.getLogger(__name__)

DIRECTIONS = ("helpful", "harmful", "random")
REMOVED = {"helpful": "most helpful", "harmful": "most harmful", "random": "random, same labels"}
"""What a check of each direction removes, in words."""
MAX_SHARE = 0.05
"""The default k is at most this share of the training set (at least one image)."""
RANKING_K = 20
"""k removed by default (at most :data:`MAX_SHARE` of the training set) when a method's values are not loss changes,
so that no k can be predicted."""
LOSS_UNITS_SLOPE = (0.25, 4.0)
"""A method's values count as loss changes when the benchmarks measured the retrained models' loss changes at this
range of multiples of the predicted ones (its ``slope``, ``benchmarks/measured.json``)."""
CHECK_VERSION = 1
PROB_FLOOR = 1e-30
"""Probabilities below this are taken as this before their logarithm (float32 softmax outputs can be 0)."""

Retrain = Callable[[np.ndarray], np.ndarray]
"""``exclude (n_train,) bool → (n_classes,)`` logits of the test image under the model retrained without them."""


@dataclass(frozen=True)
class Prediction:
    """What removing a set predicts: the test loss change ``loss_change`` (nats), the margin after (logit of the test
    label minus the largest other logit) and whether the predicted class changes."""

    loss_change: float
    margin: float
    flips: bool


def margin(log_probs: np.ndarray, label: int) -> float:
    """Log-probability (or logit) of ``label`` minus the largest other one, for ``(n_classes,)`` values."""
    others = np.delete(np.asarray(log_probs, np.float64), label)
    return float(log_probs[label] - others.max())


def predict(probs: np.ndarray, label: int, loss_change: np.ndarray | float) -> list[Prediction]:
    """Predictions for the loss changes ``loss_change`` (scalar or (m,)) of a test image whose class probabilities
    are ``probs (n_classes,)`` and whose label is ``label`` (see the module docstring)."""
    p = np.clip(np.asarray(probs, np.float64), PROB_FLOOR, 1.0)
    delta = np.atleast_1d(np.asarray(loss_change, np.float64))
    log_py = np.minimum(np.log(p[label]) - delta, 0.0)  # the loss cannot fall below zero
    rest = np.log1p(-np.minimum(np.exp(log_py), 1 - 1e-15)) - np.log1p(-min(p[label], 1 - 1e-15))
    log_other = np.log(np.delete(p, label).max()) + rest
    margins = log_py - log_other
    before = margin(np.log(p), label) > 0
    return [Prediction(float(d), float(m), bool((m > 0) != before)) for d, m in zip(delta, margins, strict=True)]


def reference_direction(probs: np.ndarray, label: int) -> str:
    """The direction whose removal should flip the prediction: ``helpful`` when it is right, else ``harmful``."""
    return "helpful" if int(np.argmax(probs)) == label else "harmful"


def ranked(row: np.ndarray, direction: str) -> np.ndarray:
    """Training positions ``(n_train,)`` int64, most helpful (``helpful``) or most harmful (``harmful``) first."""
    return np.argsort(-row if direction == "helpful" else row, kind="stable")


def max_k(n_train: int) -> int:
    """The largest default k: :data:`MAX_SHARE` of the training set, at least one."""
    return max(1, int(MAX_SHARE * n_train))


def smallest_flipping_k(row: np.ndarray, probs: np.ndarray, label: int, direction: str) -> int | None:
    """The smallest k up to :func:`max_k` whose top-k removal in ``direction`` is predicted to flip the prediction of
    the test image with influences ``row (n_train,)``, class probabilities ``probs`` and label ``label``; None if
    none is."""
    n = len(row)
    changes = np.cumsum(row[ranked(row, direction)][: max_k(n)].astype(np.float64)) / n
    flips = [p.flips for p in predict(probs, label, changes)]
    return flips.index(True) + 1 if True in flips else None


def random_removal(train_labels: np.ndarray, like: np.ndarray, seed: int) -> np.ndarray:
    """Random training positions with the label counts of the positions ``like`` and none of them (the control);
    fewer when a label has too few other images. Seeded, so a check can be repeated."""
    rng = np.random.default_rng(seed)
    pool = np.ones(len(train_labels), bool)
    pool[like] = False
    chosen = [
        rng.choice(np.flatnonzero(pool & (train_labels == c)), min(m, int((pool & (train_labels == c)).sum())), False)
        for c, m in zip(*np.unique(train_labels[like], return_counts=True), strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def loss_units_note(result: InfluenceResult) -> str | None:
    """Why ``result``'s values are not loss changes (then a check shows the measured change only), or None."""
    settings = result.meta.get("settings", {})
    method, scope = settings.get("method", "direct"), settings.get("scope", "head")
    scope_key = scope if scope in ("head", "all") else "modules"
    found = measured_for(method, scope_key)
    if found is not None and found.slope is not None:
        lo, hi = LOSS_UNITS_SLOPE
        if lo <= found.slope <= hi:
            return None
        return (
            f"{method} on {'the last layer' if scope_key == 'head' else 'the whole network'} orders the training "
            f"images, but its values are not loss changes (retraining measured changes {found.slope:.2g}× its "
            "values), so only the measured change is shown."
        )
    if scope_key == "head":
        return None
    return f"{method} was not measured against retraining on this scope, so only the measured change is shown."


@dataclass(frozen=True)
class Check:
    """One retraining check of test image ``test`` (position in the test split) against influence entry ``entry``.

    ``removed``: training positions left out (``k`` of them, fewer for a random control short of images);
    ``k_reason``: how k was chosen; ``before_*``/``after_*``: the test image's loss (nats), margin (logit of its
    label minus the largest other) and predicted class, from the run and from the retrained model;
    ``predicted_*``: what the influences predict (None when their values are not loss changes, ``units_note``
    then says why); ``flipped``: whether the retrained model predicts another class; ``seconds``: the retraining."""

    run_key: str
    entry: str
    method: str
    test: int
    direction: str
    k: int
    k_reason: str
    removed: list[int]
    before_loss: float
    before_margin: float
    before_class: int
    after_loss: float
    after_margin: float
    after_class: int
    flipped: bool
    predicted_loss_change: float | None
    predicted_margin: float | None
    predicted_flip: bool | None
    units_note: str | None
    seconds: float
    version: int = CHECK_VERSION

    @property
    def loss_change(self) -> float:
        return self.after_loss - self.before_loss

    @property
    def margin_change(self) -> float:
        return self.after_margin - self.before_margin

    def describe(self, classes: list[str]) -> str:
        """One line for people: what was removed, what changed, what was predicted."""
        what = REMOVED[self.direction]
        flip = (
            f"prediction flipped ({classes[self.before_class]} → {classes[self.after_class]})"
            if self.flipped
            else f"prediction stayed {classes[self.after_class]}"
        )
        measured = f"test loss {self.loss_change:+.3f}, margin {self.margin_change:+.2f}"
        line = f"Test image #{self.test}, {len(self.removed)} training images removed ({what}): {flip}; {measured}"
        if self.predicted_loss_change is not None and self.predicted_margin is not None:
            line += (
                f" (predicted loss {self.predicted_loss_change:+.3f}, margin "
                f"{self.predicted_margin - self.before_margin:+.2f}, "
                f"{'a flip' if self.predicted_flip else 'no flip'})"
            )
        return line + "."


def choose_k(result: InfluenceResult, test: int, direction: str) -> tuple[int, str]:
    """The default k for ``direction`` (``random``: that of the image's own direction) and why it was chosen."""
    run = result.run
    label, probs = int(run.labels("test")[test]), run.predictions["probs_test"][test]
    n, cap = len(run.labels("train")), max_k(len(run.labels("train")))
    own = reference_direction(probs, label) if direction == "random" else direction
    if loss_units_note(result) is not None:
        k = min(RANKING_K, cap)
        return k, f"{k} removed: this method's values are not loss changes, so no k is predicted to flip it"
    found = smallest_flipping_k(result.row(test), probs, label, own)
    if found is None:
        return cap, (
            f"no k up to {MAX_SHARE * 100:.0f} % of the training set ({cap} of {n} images) is predicted to flip the "
            f"prediction; {cap} removed"
        )
    return found, f"the smallest k predicted to flip the prediction ({own} images)"


def removal(result: InfluenceResult, test: int, direction: str, k: int) -> np.ndarray:
    """The training positions a check removes: the top ``k`` of ``direction`` or, for ``random``, the control."""
    run = result.run
    row = result.row(test)
    if direction != "random":
        return ranked(row, direction)[:k]
    probs, label = run.predictions["probs_test"][test], int(run.labels("test")[test])
    like = ranked(row, reference_direction(probs, label))[:k]
    return random_removal(run.labels("train"), like, seed=int(stable_hash("random-control", test, k, length=8), 16))


def check_path(result: InfluenceResult, test: int, direction: str, k: int):
    return result.run.paths.check(result.path.name, test, direction, k)


def load_check(result: InfluenceResult, test: int, direction: str, k: int) -> Check | None:
    """The cached check, or None (never computed, or written for an earlier training of the folder)."""
    path = check_path(result, test, direction, k)
    return _read(path, result.run)


def checks(run: Run) -> list[Check]:
    """Every check kept for the current training of ``run``, by test image, direction and k."""
    folder = run.paths.checks
    found = [_read(p, run) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted((c for c in found if c is not None), key=lambda c: (c.test, DIRECTIONS.index(c.direction), c.k))


def _read(path, run: Run) -> Check | None:
    try:
        data = read_json(path)
        found = Check(**data)
    except (OSError, ValueError, TypeError):
        return None
    return found if found.run_key == run.key and found.version == CHECK_VERSION else None


def summary(found: list[Check]) -> str | None:
    """``"k removed → prediction flipped in x of y checks, random removal flipped it in z of w"`` over ``found``,
    or None when there is none."""
    ranked_checks = [c for c in found if c.direction != "random"]
    controls = [c for c in found if c.direction == "random"]
    if not found:
        return None
    ks = sorted({c.k for c in found})
    k = f"k = {ks[0]}" if len(ks) == 1 else f"k = {ks[0]}–{ks[-1]}"
    parts = []
    if ranked_checks:
        flips = sum(c.flipped for c in ranked_checks)
        parts.append(f"prediction flipped in {flips} of {len(ranked_checks)} checks")
    if controls:
        flips = sum(c.flipped for c in controls)
        parts.append(f"random removal flipped it in {flips} of {len(controls)}")
    return f"{k} removed → " + ", ".join(parts)


def table(found: list[Check], classes: list[str]) -> pd.DataFrame:
    """One row per check: what was removed, predicted and measured changes, and whether the prediction flipped."""
    frame = pd.DataFrame(
        {
            "test image": [f"#{c.test}" for c in found],
            "removed": [f"{len(c.removed)} {REMOVED[c.direction]}" for c in found],
            "prediction": [
                f"{classes[c.before_class]} → {classes[c.after_class]}" + (" (flipped)" if c.flipped else "")
                for c in found
            ],
            "loss change, predicted": [c.predicted_loss_change for c in found],
            "loss change, measured": [c.loss_change for c in found],
            "margin change, predicted": [
                None if c.predicted_margin is None else c.predicted_margin - c.before_margin for c in found
            ],
            "margin change, measured": [c.margin_change for c in found],
            "flip predicted": [
                None if c.predicted_flip is None else ("yes" if c.predicted_flip else "no") for c in found
            ],
            "ranked by": [c.method for c in found],
        }
    )
    return frame.round(3)


def estimated_seconds(run: Run) -> float | None:
    """About how long one check takes: the run's own training time (None when not recorded)."""
    return run.metrics.get("timings_s", {}).get("train")


def require_test_image(run: Run, test: int) -> None:
    """Refuse a test position outside the run's test split."""
    n_test = len(run.labels("test"))
    if not 0 <= test < n_test:
        raise InfluenceLensError(
            f"Test image {test} does not exist in this run (it has {n_test}).",
            f"give a test index from 0 to {n_test - 1}",
        )


def run_check(
    result: InfluenceResult,
    test: int,
    k: int | None = None,
    direction: str | None = None,
    *,
    device: str = "auto",
    progress: Progress | None = None,
    retrain: Retrain | None = None,
) -> Check:
    """Check ``result``'s ranking for test image ``test`` by retraining without ``k`` training images in
    ``direction`` (None: the image's own, :func:`reference_direction`; k None: :func:`choose_k`), or return the
    cached check. ``retrain`` replaces the run's recipe (:func:`training.retrain_without`); the result is kept in
    the run directory either way."""
    run = result.run
    require_test_image(run, test)
    labels = run.labels("test")
    label, probs = int(labels[test]), run.predictions["probs_test"][test]
    direction = direction or reference_direction(probs, label)
    if direction not in DIRECTIONS:
        raise InfluenceLensError(f"Unknown direction {direction!r}.", f"use one of {', '.join(DIRECTIONS)}")
    n = len(run.labels("train"))
    if k is None:
        k, reason = choose_k(result, test, direction)
    elif not 1 <= k < n:
        raise InfluenceLensError(f"k must be from 1 to {n - 1}, not {k}.", f"for example {max_k(n)}")
    else:
        reason = "chosen"
    cached = load_check(result, test, direction, k)
    if cached is not None:
        return cached
    removed = removal(result, test, direction, k)
    exclude = np.zeros(n, bool)
    exclude[removed] = True
    t0 = time.perf_counter()
    logits = (retrain or _recipe(run, test, device, progress))(exclude)
    seconds = time.perf_counter() - t0
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), 0).numpy()
    note = loss_units_note(result)
    predicted = None if note else predict(probs, label, float(result.row(test)[removed].sum()) / n)[0]
    found = Check(
        run_key=run.key,
        entry=result.path.name,
        method=_method(result),
        test=test,
        direction=direction,
        k=k,
        k_reason=reason,
        removed=removed.tolist(),
        before_loss=float(-np.log(max(float(probs[label]), PROB_FLOOR))),
        before_margin=margin(np.log(np.clip(probs, PROB_FLOOR, 1)), label),
        before_class=int(np.argmax(probs)),
        after_loss=float(-log_p[label]),
        after_margin=margin(log_p, label),
        after_class=int(np.argmax(log_p)),
        flipped=int(np.argmax(log_p)) != int(np.argmax(probs)),
        predicted_loss_change=None if predicted is None else predicted.loss_change,
        predicted_margin=None if predicted is None else predicted.margin,
        predicted_flip=None if predicted is None else predicted.flips,
        units_note=note,
        seconds=seconds,
    )
    run.require_unchanged()
    atomic_write_json(check_path(result, test, direction, k), dataclasses.asdict(found))
    log.info("check done in %.0f s: %s", seconds, found.describe(run.classes))
    return found


def _method(result: InfluenceResult) -> str:
    settings = result.meta.get("settings", {})
    scope = settings.get("scope", "head")
    where = (
        {"head": "last layer", "all": "whole network"}.get(scope, "chosen layers")
        if isinstance(scope, str)
        else ("chosen layers")
    )
    return f"{settings.get('method', 'direct')}, {where}"


def _recipe(run: Run, test: int, device: str, progress: Progress | None) -> Retrain:
    """The run's own recipe (:func:`training.retrain_without`), returning the test image's logits."""
    from .training import batched_logits, retrain_without

    def retrain(exclude: np.ndarray) -> np.ndarray:
        model, _ = retrain_without(run, exclude, device=device, progress=progress)
        x_test, _ = run.tensors("test")
        return batched_logits(model, x_test[test : test + 1])[0].double().cpu().numpy()

    return retrain
