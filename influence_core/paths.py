"""One description of a run directory: every file name lives here, and only here.

Layout (all files written atomically; ``train_key`` is written last and marks a complete training)::

    config.json        dataset spec, classes, split and training settings, weights ("pretrained"/"scratch")
    samples.csv        id, split (train/val/test), label (as trained, maybe corrupted), true_label, flipped
    corruption.json    how labels were flipped: {"mode", "fraction", "seed", "flipped": {id: true_label}}
    history.json       per epoch: train_loss, val_loss, seconds
    dynamics.npz       loss, margin: (n_epochs, n_train) float32, from each epoch's training pass
    predictions.npz    probs_train/probs_val/probs_test: (n, n_classes) float32 at the final model
    metrics.json       f1_test, confusion_matrix, accuracy_test, timings_s, ...
    checkpoints/       epoch_<e>.pt (evenly spaced) and final.pt: ResNet18 state_dicts
    influence/<key>/   cached influence results (see :class:`InfluencePaths`)
    second_pass.npz    loss (n_train,) under a retrain without the top suspects, left_out, key (:mod:`.second_pass`)
    checks/            retraining checks of the rankings, one JSON file each (:mod:`.counterfactual`)
    reviews.sqlite     the mislabel review store
    train_key          hash of data ids + labels + config; equal key = cached training (also in config.json)

Beside the run directory ``<name>`` in its parent folder (see :mod:`influence_core.rundir`)::

    .<name>.lock       advisory lock held by ``train`` and ``influence`` while they write (survives a retrain)
    .<name>.new-<pid>  a new training being built by process ``pid``; renamed to ``<name>`` when complete
    .<name>.old        the previous run during the swap; the next call finishes or undoes an interrupted swap
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TRAIN_KEY_FIELD = "train_key"
"""The field of ``config.json`` that repeats the ``train_key`` file (both are checked before a cache hit)."""
TEMP_PREFIX = ".tmp-"
"""Influence entries are written to ``influence/.tmp-<key>-<pid>`` and renamed into place when complete."""


@dataclass(frozen=True)
class InfluencePaths:
    """Files of one cached influence entry ``run_dir/influence/<key>/`` (see :mod:`influence_core.pipeline`)."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def influences(self) -> Path:
        """(n_test, n_train) float32 zarr array, one shard per training column block (:mod:`.results`)."""
        return self.root / "influences.zarr"

    @property
    def top_helpful_positions(self) -> Path:
        return self.root / "top_helpful_positions.npy"

    @property
    def top_helpful_values(self) -> Path:
        return self.root / "top_helpful_values.npy"

    @property
    def top_harmful_positions(self) -> Path:
        return self.root / "top_harmful_positions.npy"

    @property
    def top_harmful_values(self) -> Path:
        return self.root / "top_harmful_values.npy"

    @property
    def mean_influence(self) -> Path:
        return self.root / "mean_influence.npy"

    @property
    def mean_influence_by_label(self) -> Path:
        return self.root / "mean_influence_by_label.npy"

    @property
    def histogram_edges(self) -> Path:
        return self.root / "histogram_edges.npy"

    @property
    def histogram_counts(self) -> Path:
        return self.root / "histogram_counts.npy"

    @property
    def self_influence(self) -> Path:
        return self.root / "self_influence.npy"

    @property
    def checkpoint_self_influence(self) -> Path:
        return self.root / "checkpoint_self_influence.npy"

    @property
    def curvature(self) -> Path:
        return self.root / "curvature.pt"

    def is_complete(self) -> bool:
        """Whether the entry was renamed into place (temporary ``.tmp-*`` folders never count)."""
        return not self.root.name.startswith(TEMP_PREFIX) and self.meta.is_file()


@dataclass(frozen=True)
class RunPaths:
    """Where each file of the run directory ``root`` lives (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples.csv"

    @property
    def corruption(self) -> Path:
        return self.root / "corruption.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def dynamics(self) -> Path:
        return self.root / "dynamics.npz"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.npz"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / "final.pt"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch}.pt"

    def epoch_checkpoints(self) -> list[Path]:
        """The intermediate checkpoints on disk, in epoch order."""
        return sorted(self.checkpoints.glob("epoch_*.pt"), key=lambda p: int(p.stem.removeprefix("epoch_")))

    @property
    def influence(self) -> Path:
        return self.root / "influence"

    def influence_entry(self, key: str) -> InfluencePaths:
        return InfluencePaths(self.influence / key)

    def influence_temp(self, key: str, pid: int) -> Path:
        """Where process ``pid`` writes the influence entry ``key`` before renaming it into place."""
        return self.influence / f"{TEMP_PREFIX}{key}-{pid}"

    @property
    def second_pass(self) -> Path:
        return self.root / "second_pass.npz"

    @property
    def checks(self) -> Path:
        """Folder of the retraining checks: ``<influence key>_t<test>_<direction>_k<k>.json`` (:mod:`.counterfactual`)."""
        return self.root / "checks"

    def check(self, entry: str, test: int, direction: str, k: int) -> Path:
        return self.checks / f"{entry}_t{test}_{direction}_k{k}.json"

    @property
    def reviews(self) -> Path:
        return self.root / "reviews.sqlite"

    @property
    def train_key(self) -> Path:
        return self.root / "train_key"

    @property
    def lock(self) -> Path:
        return self._sibling("lock")

    @property
    def staging_prefix(self) -> str:
        """Name prefix of the staging folders ``.<name>.new-<pid>`` beside the run."""
        return self._sibling("new-").name

    def staging(self, pid: int) -> Path:
        """The folder in which process ``pid`` builds a new run before swapping it in."""
        return self._sibling(f"new-{pid}")

    @property
    def previous(self) -> Path:
        """Where the old run waits during the swap."""
        return self._sibling("old")

    def training_outputs(self) -> tuple[Path, ...]:
        """What a training writes; everything else in the folder (the review store, the user's own files) is
        carried over to a new training of the same folder."""
        return (
            self.config,
            self.samples,
            self.corruption,
            self.history,
            self.dynamics,
            self.predictions,
            self.metrics,
            self.checkpoints,
            self.influence,
            self.second_pass,
            self.checks,
            self.train_key,
        )

    def _sibling(self, suffix: str) -> Path:
        """``.<name>.<suffix>`` in the parent folder (the name of the absolute path, so ``.`` works too)."""
        absolute = Path(os.path.abspath(self.root))
        return absolute.parent / f".{absolute.name}.{suffix}"
