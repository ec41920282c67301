"""The run directory: everything about one trained model, readable without re-running anything.

Layout (all files written atomically; ``train_key`` is written last and marks a complete training)::

    config.json        dataset spec, classes, split and training settings, weights ("pretrained"/"scratch")
    samples.csv        id, split (train/val/test), label (as trained, maybe corrupted), true_label, flipped
    corruption.json    how labels were flipped: {"mode", "fraction", "seed", "flipped": {id: true_label}}
    history.json       per epoch: train_loss, val_loss, seconds
    dynamics.npz       loss, margin: (n_epochs, n_train) float32, from each epoch's training pass
    predictions.npz    probs_train/probs_val/probs_test: (n, n_classes) float32 at the final model
    metrics.json       f1_test, confusion_matrix, accuracy_test, timings_s, ...
    checkpoints/       epoch_<e>.pt (evenly spaced) and final.pt: ResNet18 state_dicts
    influence/<key>/   cached influence results (see influence_core.pipeline)
    reviews.sqlite     the mislabel review store
    train_key          hash of data ids + labels + config; equal key = cached training
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import ImageSet, ImageView, ModelInputs, load_dataset
from .errors import InfluenceLensError
from .model import build_resnet18, load_checkpoint
from .storage import read_json

SPLITS = ("train", "val", "test")


class Run:
    """Read access to a finished run directory (see the module docstring for its files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "train_key").is_file():
            raise InfluenceLensError(
                f"{self.path} is not a finished run directory (no train_key).",
                "train first: influence-core train --dataset SPEC --run-dir DIR",
            )

    # --- metadata --------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        return read_json(self.path / "config.json")

    @cached_property
    def metrics(self) -> dict:
        return read_json(self.path / "metrics.json")

    @cached_property
    def history(self) -> list[dict]:
        return read_json(self.path / "history.json")

    @cached_property
    def corruption(self) -> dict:
        return read_json(self.path / "corruption.json")

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def samples(self) -> pd.DataFrame:
        """One row per sample: id, split, label, true_label, flipped, position (index within its split)."""
        df = pd.read_csv(self.path / "samples.csv", dtype={"id": str})
        df["position"] = df.groupby("split").cumcount()
        return df

    def part(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        return self.samples[self.samples["split"] == split].reset_index(drop=True)

    def ids(self, split: str) -> list[str]:
        return self.part(split)["id"].tolist()

    def labels(self, split: str) -> np.ndarray:
        """Labels as trained on, (k,) int64 (training labels may be corrupted)."""
        return self.part(split)["label"].to_numpy(np.int64)

    def true_labels(self, split: str) -> np.ndarray:
        return self.part(split)["true_label"].to_numpy(np.int64)

    def flipped(self) -> np.ndarray:
        """(n_train,) bool: which training labels were flipped by the corruption step."""
        return self.part("train")["flipped"].to_numpy(bool)

    @cached_property
    def dynamics(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "dynamics.npz") as f:
            return {k: f[k] for k in f.files}

    @cached_property
    def predictions(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "predictions.npz") as f:
            return {k: f[k] for k in f.files}

    # --- model -----------------------------------------------------------------------------------------
    def checkpoint_paths(self) -> list[Path]:
        """Intermediate checkpoints in epoch order, then ``final.pt``."""
        ckpt = self.path / "checkpoints"
        epochs = sorted(ckpt.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        return epochs + [ckpt / "final.pt"]

    def load_model(self, checkpoint: str | Path | None = None) -> nn.Module:
        """ResNet18 with the run's weights (``final.pt`` unless given), on the CPU, in eval mode."""
        model, _ = build_resnet18(self.n_classes, pretrained=False)
        load_checkpoint(model, checkpoint or self.path / "checkpoints" / "final.pt")
        return model.eval()

    # --- data ------------------------------------------------------------------------------------------
    @cached_property
    def dataset(self) -> ImageSet:
        """The run's dataset as read now (images memory-mapped from the image cache when it was built)."""
        cfg = self.config
        try:
            return load_dataset(cfg["dataset"], cfg["class_keys"], cfg["image_size"], on_bad_image="skip")
        except InfluenceLensError as e:
            raise InfluenceLensError(
                f"The run's dataset {cfg['dataset']!r} cannot be opened here: {e.problem}",
                "copy the data to the same path, or reopen the run where it was computed") from e

    @cached_property
    def _positions(self) -> np.ndarray:
        """(n_samples,) int64: where each row of ``samples.csv`` is in :attr:`dataset`."""
        pos = {i: k for k, i in enumerate(self.dataset.ids)}
        missing = [i for i in self.samples["id"] if i not in pos]
        if missing:
            raise InfluenceLensError(f"{len(missing)} sample(s) of the run are no longer in the dataset, "
                                     f"e.g. {missing[0]}.", "restore the files or retrain the run")
        return np.array([pos[i] for i in self.samples["id"]], dtype=np.int64)

    def images(self, split: str) -> ImageView:
        """Display images of one split, in split order: a lazy ``(k, S, S, 3)`` uint8 view (index it)."""
        return ImageView(self.dataset.images, self._positions[(self.samples["split"] == split).to_numpy()])

    def tensors(self, split: str) -> tuple[ModelInputs, torch.Tensor]:
        """Normalised inputs of one split, read lazily (``x[rows] -> (k, 3, S, S)`` float32), and labels (k,)
        int64 (as trained on)."""
        positions = self._positions[(self.samples["split"] == split).to_numpy()]
        return ModelInputs(self.dataset.images, positions), torch.tensor(self.labels(split))
