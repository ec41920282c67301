"""Experiments on a run's labels: the corruption experiment and the reference notebook's claim, checked per run.

The corruption experiment flips a share of the training labels, retrains and recomputes influences, so one can
see whether the flips stand out. The reference notebook claims that flipped images have *lower mean influence*
on the test set than clean ones; :func:`notebook_claim` checks that claim on a run's own numbers (the signal's
AUROC and the per-label table) and says what the run's corruption mode implies for it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .analysis import corruption_table, detection_metrics
from .data import parse_spec
from .display import ClaimCheck, check_notebook_claim
from .errors import InfluenceLensError
from .pipeline import DEFAULT_SETTINGS, InfluenceResult, InfluenceSettings, compute_influence
from .progress import Progress, tagged
from .run import Run
from .storage import stable_hash
from .training import TrainConfig, keyed_settings, train

# --- names of runs ------------------------------------------------------------------------------------------


def run_title(config: TrainConfig, class_names: Sequence[str] | None = None) -> str:
    """A human-readable name: dataset, classes and flip share, e.g. "tiny-imagenet goldfish+lemon 10% flipped".

    ``class_names``: display names of the classes (default: ``config.classes`` as given). Up to three classes
    are named (first synonym only: "goldfish, Carassius auratus" → "goldfish"), more are counted; the corruption
    mode is named when it is not random.
    """
    kind, path = parse_spec(config.dataset)
    dataset = {"demo": "digits", "folder": Path(path).name or "folder"}.get(kind, kind)
    names = list(class_names if class_names is not None else config.classes or [])
    if not names:
        classes = "all classes"
    elif len(names) <= 3:
        classes = "+".join(n.split(",")[0].strip() for n in names)
    else:
        classes = f"{len(names)} classes"
    if config.corrupt_fraction <= 0:
        flips = "no flips"
    else:
        flips = f"{config.corrupt_fraction:.0%} flipped" + (
            f" ({config.corrupt_mode})" if config.corrupt_mode != "random" else ""
        )
    return f"{dataset} {classes} {flips}"


def run_dir_name(config: TrainConfig, class_names: Sequence[str] | None = None) -> str:
    """A folder (and URL) name for the run of ``config``: :func:`run_title` made safe for paths and links, plus
    8 hex digits of the config's hash so that different settings never share a folder, e.g.
    ``tiny-imagenet-goldfish+lemon-10pct-flipped-3fa9c1e2``."""
    slug = re.sub(r"[^A-Za-z0-9+._-]+", "-", run_title(config, class_names).replace("%", "pct")).strip("-.")
    return f"{slug}-{stable_hash(keyed_settings(config), length=8)}"


# --- the notebook's claim -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotebookClaim:
    """The reference notebook's claim checked on one run: the ``check`` (verdict, AUROC, labels where it held,
    what the corruption mode implies; :class:`~.display.ClaimCheck`) and the per-label ``table`` it rests on
    (:func:`~.analysis.corruption_table`: n_clean, n_corrupted, mean_clean, mean_corrupted, difference)."""

    check: ClaimCheck
    table: pd.DataFrame


def notebook_claim(result: InfluenceResult) -> NotebookClaim:
    """Check "flipped images have lower mean influence than clean ones" on the run of ``result``, from its own
    numbers: the per-label table of mean test influence and the AUROC of minus the mean influence as a detector
    of the flips. A run without flipped labels is an error (there is nothing to check)."""
    run = result.run
    flipped = run.flipped()
    if not flipped.any():
        raise InfluenceLensError(
            "This run has no flipped labels, so the notebook's claim cannot be checked.",
            "start a corruption experiment, or train with --corrupt-fraction 0.1",
        )
    table = corruption_table(result.mean_influence, run.labels("train"), flipped, run.classes)
    auroc = detection_metrics(result.signals["neg_mean_test_influence"], flipped)["auroc"]
    return NotebookClaim(check_notebook_claim(table, auroc, run.corruption["mode"]), table)


# --- the corruption experiment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptionOutcome:
    """The runs of one corruption experiment: ``clean`` (top-influence only; the base run when it had no flips),
    ``corrupted`` with its influence ``result``, and the notebook's ``claim`` checked on it."""

    clean: Run | None
    corrupted: Run
    result: InfluenceResult
    claim: NotebookClaim


def run_corruption_experiment(
    base: Run,
    fraction: float,
    mode: str,
    runs_root: str | Path,
    settings: InfluenceSettings = DEFAULT_SETTINGS,
    device: str = "auto",
    progress: Progress | None = None,
) -> CorruptionOutcome:
    """Retrain ``base``'s configuration with ``fraction`` of the training labels flipped, recompute influences.

    ``mode``: ``random`` (random images) or ``top-influence`` (per class, the images a clean run of the same
    configuration finds most helpful by mean test influence: ``base`` itself when it has no flipped labels, else
    a clean run trained first). New runs go to ``runs_root / run_dir_name(config)`` (cached: an identical
    experiment returns at once). ``progress`` stages are prefixed with "clean run: " or "flipped run: ". Costs
    one training and one influence computation of ``base``'s size, plus one of each for a clean run in
    top-influence mode (the clean run's training is skipped when ``base`` has no flips).
    """
    if not 0 < fraction < 1:
        raise InfluenceLensError(
            f"The share of labels to flip must be between 0 and 1, not {fraction}.", "for example 0.1 for 10 %"
        )
    runs_root = Path(runs_root)
    config = dataclasses.replace(TrainConfig.from_run(base), corrupt_fraction=0.0, corrupt_mode="random")
    clean, scores = None, None
    if mode == "top-influence":
        clean_progress = tagged(progress, "clean run")
        clean = (
            base
            if not base.flipped().any()
            else train(config, runs_root / run_dir_name(config, base.classes), device=device, progress=clean_progress)
        )
        clean_result = compute_influence(clean, settings, device=device, progress=clean_progress)
        scores = clean_result.mean_influence.tolist()
    flipped_config = dataclasses.replace(config, corrupt_fraction=fraction, corrupt_mode=mode, corrupt_scores=scores)
    flipped_progress = tagged(progress, "flipped run")
    corrupted = train(
        flipped_config, runs_root / run_dir_name(flipped_config, base.classes), device=device, progress=flipped_progress
    )
    result = compute_influence(corrupted, settings, device=device, progress=flipped_progress)
    return CorruptionOutcome(clean, corrupted, result, notebook_claim(result))
