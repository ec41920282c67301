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

import numpy as np
import pandas as pd

from .analysis import corruption_table, detection_metrics, mean_influence
from .data import parse_spec
from .errors import InfluenceLensError
from .pipeline import DEFAULT_SETTINGS, InfluenceResult, InfluenceSettings, compute_influence
from .progress import Progress, tagged
from .run import Run
from .storage import stable_hash
from .training import TrainConfig, train

CORRUPT_MODES = ("random", "top-influence")
HELD, NOT_HELD, PARTLY = "held", "did not hold", "partly held"
CHANCE_BAND = 0.1
"""An AUROC within this distance of 0.5 is reported as "near chance"."""

MODE_IMPLICATIONS = {
    "random": "The flipped images were picked at random, so nothing made them special before the flip: this run is "
              "a fair test of whether low mean influence finds wrong labels.",
    "top-influence": "The flipped images were the ones a clean run found most helpful (the highest mean influence "
                     "in their class), as in the reference notebook. Flipping the label of a helpful image makes it "
                     "harmful by construction, so low mean influence is expected here and says little about finding "
                     "labels that are wrong by accident; random flips are the fair test.",
}


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
            f" ({config.corrupt_mode})" if config.corrupt_mode != "random" else "")
    return f"{dataset} {classes} {flips}"


def run_dir_name(config: TrainConfig, class_names: Sequence[str] | None = None) -> str:
    """A folder (and URL) name for the run of ``config``: :func:`run_title` made safe for paths and links, plus
    8 hex digits of the config's hash so that different settings never share a folder, e.g.
    ``tiny-imagenet-goldfish+lemon-10pct-flipped-3fa9c1e2``."""
    slug = re.sub(r"[^A-Za-z0-9+._-]+", "-", run_title(config, class_names).replace("%", "pct")).strip("-.")
    settings = dataclasses.asdict(config) | {"split": list(config.split)}
    return f"{slug}-{stable_hash(settings, length=8)}"


# --- the notebook's claim -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NotebookClaim:
    """Whether "flipped images have lower mean influence than clean ones" held on one run.

    ``verdict``: :data:`HELD` (in every label), :data:`NOT_HELD` (in none) or :data:`PARTLY`; ``auroc``: of
    minus the mean influence as a detector of the flips (0.5 = chance, 1 = perfect); ``table``: the notebook's
    per-label table (:func:`analysis.corruption_table`) with a ``held`` column (None where a label has no clean
    or no flipped image); ``mode`` and ``fraction``: the run's corruption.
    """

    verdict: str
    n_labels_held: int
    n_labels_compared: int
    auroc: float
    table: pd.DataFrame
    mode: str
    fraction: float

    @property
    def summary(self) -> str:
        """One paragraph: the verdict with its numbers."""
        per_label = (f"in {self.n_labels_held} of the {self.n_labels_compared} labels with both clean and flipped "
                     "images, the flipped ones have the lower mean influence")
        if abs(self.auroc - 0.5) <= CHANCE_BAND:
            strength = "near chance"
        elif self.auroc > 0.5:
            strength = "better than chance"
        else:
            strength = "worse than chance: the flips rank as *more* helpful"
        return (f"The claim {self.verdict}: {per_label}. As a detector of the flips, low mean influence reaches "
                f"AUROC {self.auroc:.2f} ({strength}; 0.5 is chance, 1.0 perfect).")

    @property
    def implication(self) -> str:
        """What the run's corruption mode means for the claim."""
        return MODE_IMPLICATIONS[self.mode]


def check_notebook_claim(mean: np.ndarray, labels: np.ndarray, flipped: np.ndarray, classes: Sequence[str],
                         mode: str, fraction: float) -> NotebookClaim:
    """Check the claim on arrays: ``mean`` (n_train,) mean test influence, ``labels`` (n_train,) given label
    codes, ``flipped`` (n_train,) bool; ``mode``/``fraction`` as the run flipped them."""
    flipped = np.asarray(flipped, bool)
    if not flipped.any():
        raise InfluenceLensError("This run has no flipped labels, so the notebook's claim cannot be checked.",
                                 "start a corruption experiment, or train with --corrupt-fraction 0.1")
    if mode not in MODE_IMPLICATIONS:
        raise InfluenceLensError(f"Unknown corruption mode {mode!r}.", f"use one of {', '.join(CORRUPT_MODES)}")
    table = corruption_table(mean, labels, flipped, list(classes))
    compared = (table["n_clean"] > 0) & (table["n_corrupted"] > 0)
    table["held"] = [bool(h) if c else None
                     for h, c in zip(table["mean_corrupted"] < table["mean_clean"], compared, strict=True)]
    n_held, n_compared = sum(h is True for h in table["held"]), int(compared.sum())
    verdict = HELD if n_held == n_compared else NOT_HELD if n_held == 0 else PARTLY
    auroc = detection_metrics(-np.asarray(mean, dtype=np.float64), flipped)["auroc"]
    return NotebookClaim(verdict, n_held, n_compared, auroc, table, mode, float(fraction))


def notebook_claim(result: InfluenceResult) -> NotebookClaim:
    """The notebook's claim checked on the run of ``result`` (mean influence over its test set)."""
    run = result.run
    return check_notebook_claim(mean_influence(result.influences), run.labels("train"), run.flipped(),
                                run.classes, run.corruption["mode"], run.corruption["fraction"])


# --- the corruption experiment ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CorruptionOutcome:
    """The runs of one corruption experiment: ``clean`` (top-influence only; the base run when it had no flips),
    ``corrupted`` with its influence ``result``, and the notebook's ``claim`` checked on it."""

    clean: Run | None
    corrupted: Run
    result: InfluenceResult
    claim: NotebookClaim


def run_corruption_experiment(base: Run, fraction: float, mode: str, runs_root: str | Path,
                              settings: InfluenceSettings = DEFAULT_SETTINGS, device: str = "auto",
                              progress: Progress | None = None) -> CorruptionOutcome:
    """Retrain ``base``'s configuration with ``fraction`` of the training labels flipped, recompute influences.

    ``mode``: ``random`` (random images) or ``top-influence`` (per class, the images a clean run of the same
    configuration finds most helpful by mean test influence: ``base`` itself when it has no flipped labels, else
    a clean run trained first). New runs go to ``runs_root / run_dir_name(config)`` (cached: an identical
    experiment returns at once). ``progress`` stages are prefixed with "clean run: " or "flipped run: ". Costs
    one training and one influence computation of ``base``'s size, plus one of each for a clean run in
    top-influence mode (the clean run's training is skipped when ``base`` has no flips).
    """
    if not 0 < fraction < 1:
        raise InfluenceLensError(f"The share of labels to flip must be between 0 and 1, not {fraction}.",
                                 "for example 0.1 for 10 %")
    if mode not in CORRUPT_MODES:
        raise InfluenceLensError(f"Unknown corruption mode {mode!r}.", f"use one of {', '.join(CORRUPT_MODES)}")
    runs_root = Path(runs_root)
    config = dataclasses.replace(TrainConfig.from_run(base), corrupt_fraction=0.0, corrupt_mode="random")
    clean, scores = None, None
    if mode == "top-influence":
        clean_progress = tagged(progress, "clean run")
        clean = base if not base.flipped().any() else train(config, runs_root / run_dir_name(config, base.classes),
                                                             device=device, progress=clean_progress)
        clean_result = compute_influence(clean, settings, device=device, progress=clean_progress)
        scores = mean_influence(clean_result.influences).tolist()
    flipped_config = dataclasses.replace(config, corrupt_fraction=fraction, corrupt_mode=mode, corrupt_scores=scores)
    flipped_progress = tagged(progress, "flipped run")
    corrupted = train(flipped_config, runs_root / run_dir_name(flipped_config, base.classes), device=device,
                      progress=flipped_progress)
    result = compute_influence(corrupted, settings, device=device, progress=flipped_progress)
    return CorruptionOutcome(clean, corrupted, result, notebook_claim(result))
