"""The run directory: everything about one trained model, readable without re-running anything.

Its files are described in :mod:`influence_core.paths`. Opening a :class:`Run` checks that they are there and
agree (``config.json`` and ``samples.csv`` readable, ``final.pt`` present, one ``samples.csv`` row per column of
the dynamics and per row of the predictions); anything else is an :class:`InfluenceLensError` with a fix.
"""

from __future__ import annotations

import zipfile
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import ImageSet, ImageView, ModelInputs, load_dataset
from .errors import InfluenceLensError
from .model import build_resnet18, load_checkpoint
from .paths import RunPaths
from .rundir import try_recover
from .storage import read_json

SPLITS = ("train", "val", "test")
SAMPLE_COLUMNS = ("id", "split", "label", "true_label", "flipped")
CONFIG_KEYS = ("dataset", "classes", "class_keys", "image_size", "weights")
RETRAIN_FIX = "train the run again with --retrain (its review store is kept)"


class Run:
    """Read access to a finished run directory (files: :class:`~influence_core.paths.RunPaths`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.paths = RunPaths(self.path)
        try_recover(self.paths)
        if not self.paths.train_key.is_file():
            raise InfluenceLensError(
                f"{self.path} is not a finished run directory (no {self.paths.train_key.name}).",
                "train first: influence-core train --dataset SPEC --run-dir DIR",
            )
        self.key = self.paths.train_key.read_text().strip()
        """The training key the run was opened with (see :meth:`require_unchanged`)."""
        if not self.paths.final_checkpoint.is_file():
            raise InfluenceLensError(
                f"The run's final checkpoint {self.paths.final_checkpoint} is missing.", RETRAIN_FIX
            )
        self._check_arrays_match_samples()

    def require_unchanged(self) -> None:
        """Raise if the folder was retrained since this object opened it (its cached tables would be stale)."""
        try:
            current = self.paths.train_key.read_text().strip()
        except OSError:
            current = None
        if current != self.key:
            raise InfluenceLensError(
                f"{self.path} was retrained by another process after it was opened here.", "open the run again"
            )

    def _check_arrays_match_samples(self) -> None:
        counts = self.samples["split"].value_counts()
        expected: dict[str, tuple[int | None, ...]] = {
            f"{self.paths.predictions.name}:probs_{s}": (int(counts.get(s, 0)), self.n_classes) for s in SPLITS
        }
        expected |= {f"{self.paths.dynamics.name}:{k}": (None, int(counts.get("train", 0))) for k in ("loss", "margin")}
        shapes = _npz_shapes(self.paths.predictions) | _npz_shapes(self.paths.dynamics)
        for name, want in expected.items():
            have = shapes.get(name)
            matches = (
                have is not None
                and len(have) == len(want)
                and all(w in (None, h) for w, h in zip(want, have, strict=True))
            )
            if not matches:
                raise InfluenceLensError(
                    f"The rows of {self.paths.samples} no longer match the run's arrays ({name} has shape {have}, "
                    f"{self.paths.samples.name} implies {tuple('any' if w is None else w for w in want)}).",
                    f"restore {self.paths.samples.name} or {RETRAIN_FIX}",
                )

    # --- metadata --------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        cfg = _read_json(self.paths.config)
        missing = [k for k in CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise InfluenceLensError(f"{self.paths.config} lacks {', '.join(missing)}.", RETRAIN_FIX)
        return cfg

    @cached_property
    def metrics(self) -> dict:
        return _read_json(self.paths.metrics)

    @cached_property
    def history(self) -> list[dict]:
        return _read_json(self.paths.history)

    @cached_property
    def corruption(self) -> dict:
        return _read_json(self.paths.corruption)

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def samples(self) -> pd.DataFrame:
        """One row per sample: id, split, label, true_label, flipped, position (index within its split)."""
        path = self.paths.samples
        try:
            df = pd.read_csv(path, dtype={"id": str})
        except (OSError, ValueError, UnicodeDecodeError) as e:  # pandas' ParserError is a ValueError
            raise InfluenceLensError(f"Cannot read {path}: {e}", f"restore it or {RETRAIN_FIX}") from e
        problem = _samples_problem(df, self.n_classes)
        if problem:
            raise InfluenceLensError(f"{path} is malformed: {problem}.", f"restore it or {RETRAIN_FIX}")
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

    def influence_inputs(self) -> tuple[list[str], np.ndarray, list[str]]:
        """``(ids, labels, splits)`` of the train and test samples in file order: what an influence result
        depends on besides the checkpoints and settings (part of every influence cache key)."""
        samples = self.samples[self.samples["split"].isin(["train", "test"])]
        return samples["id"].tolist(), samples["label"].to_numpy(), samples["split"].tolist()

    def flipped(self) -> np.ndarray:
        """(n_train,) bool: which training labels were flipped by the corruption step."""
        return self.part("train")["flipped"].to_numpy(bool)

    @cached_property
    def dynamics(self) -> dict[str, np.ndarray]:
        """loss, margin: (n_epochs, n_train) float32."""
        with np.load(self.paths.dynamics) as f:
            return {k: f[k] for k in f.files}

    @cached_property
    def predictions(self) -> dict[str, np.ndarray]:
        """probs_train / probs_val / probs_test: (n, n_classes) float32."""
        with np.load(self.paths.predictions) as f:
            return {k: f[k] for k in f.files}

    # --- model -----------------------------------------------------------------------------------------
    def checkpoint_paths(self) -> list[Path]:
        """Intermediate checkpoints in epoch order, then ``final.pt``."""
        return [*self.paths.epoch_checkpoints(), self.paths.final_checkpoint]

    def load_model(self, checkpoint: str | Path | None = None) -> nn.Module:
        """ResNet18 with the run's weights (``final.pt`` unless given), on the CPU, in eval mode."""
        model, _ = build_resnet18(self.n_classes, pretrained=False)
        load_checkpoint(model, checkpoint or self.paths.final_checkpoint)
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
                "copy the data to the same path, or reopen the run where it was computed",
            ) from e

    @cached_property
    def _positions(self) -> np.ndarray:
        """(n_samples,) int64: where each row of ``samples.csv`` is in :attr:`dataset`."""
        found = pd.Index(list(self.dataset.ids)).get_indexer(self.samples["id"].astype(str))
        missing = self.samples["id"][found < 0]
        if len(missing):
            raise InfluenceLensError(
                f"{len(missing)} sample(s) of the run are no longer in the dataset, e.g. {missing.iloc[0]}.",
                "restore the files or retrain the run",
            )
        return found.astype(np.int64)

    def images(self, split: str) -> ImageView:
        """Display images of one split, in split order: a lazy ``(k, S, S, 3)`` uint8 view (index it)."""
        return ImageView(self.dataset.images, self._positions[(self.samples["split"] == split).to_numpy()])

    def tensors(self, split: str) -> tuple[ModelInputs, torch.Tensor]:
        """Normalised inputs of one split, read lazily (``x[rows] -> (k, 3, S, S)`` float32), and labels (k,)
        int64 (as trained on)."""
        positions = self._positions[(self.samples["split"] == split).to_numpy()]
        return ModelInputs(self.dataset.images, positions), torch.tensor(self.labels(split))


def _read_json(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError) as e:  # missing, unreadable, empty or malformed (JSONDecodeError is a ValueError)
        raise InfluenceLensError(f"Cannot read {path}: {e}.", f"restore it or {RETRAIN_FIX}") from e


def _samples_problem(df: pd.DataFrame, n_classes: int) -> str | None:
    """What is wrong with a ``samples.csv`` table, or None."""
    missing = [c for c in SAMPLE_COLUMNS if c not in df.columns]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    if not df["split"].isin(SPLITS).all():
        return f"split must be one of {', '.join(SPLITS)}"
    for column in ("label", "true_label"):
        values = pd.to_numeric(df[column], errors="coerce")
        if values.isna().any() or (values % 1 != 0).any() or not values.between(0, n_classes - 1).all():
            return f"{column} must be a class index from 0 to {n_classes - 1}"
    if df["id"].isna().any() or df["id"].duplicated().any():
        return "ids must be present and unique"
    return None


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``"<file name>:<array>"`` → shape for every array of an ``.npz`` file, read from the headers only."""
    try:
        with zipfile.ZipFile(path) as z:
            shapes = {}
            for member in z.namelist():
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    header = (
                        np.lib.format.read_array_header_1_0(f)
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0(f)
                    )
                shapes[f"{path.name}:{member.removesuffix('.npy')}"] = header[0]
            return shapes
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InfluenceLensError(f"Cannot read {path}: {e}.", f"restore it or {RETRAIN_FIX}") from e
