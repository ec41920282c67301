"""The run directory: everything about one trained model, readable without re-running anything.

Its files are described in :mod:`influence_core.paths`. Opening a :class:`Run` checks that they are there and
agree (``config.json`` readable with fields of the right types, ``samples.csv`` readable, the checkpoints whole
zip files, one ``samples.csv`` row per column of the dynamics and per row of the predictions); reading the
dynamics or predictions checks that they are finite. Anything else is an :class:`InfluenceLensError` with a fix.
A run whose dataset moved is pointed at its new place with :func:`repoint` (``influence-core repoint``).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import MIN_IMAGE_SIZE, ImageSet, ImageView, ModelInputs, load_dataset, resolve_spec
from .errors import InfluenceLensError
from .model import build_resnet18, load_checkpoint
from .paths import RunPaths
from .rundir import run_lock, try_recover
from .storage import atomic_write_json, read_json, read_npy_header

SPLITS = ("train", "val", "test")
SAMPLE_COLUMNS = ("id", "split", "label", "true_label", "flipped")
RETRAIN_FIX = "train the run again with --retrain (its review store is kept)"
REPOINT_FIX = "point the run at the data's new place: influence-core repoint --run-dir RUN --dataset SPEC"


def _names(v: Any) -> bool:
    return isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) for n in v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CONFIG_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "dataset": ("a dataset spec (text)", lambda v: isinstance(v, str) and bool(v)),
    "classes": ("a list of two or more class names", _names),
    "class_keys": ("a list of two or more class keys", _names),
    "image_size": (f"a whole number of pixels ≥ {MIN_IMAGE_SIZE}", lambda v: _integer(v) and v >= MIN_IMAGE_SIZE),
    "weights": ("'pretrained' or 'scratch'", lambda v: v in ("pretrained", "scratch")),
    "train_layers": ("'head' or 'all'", lambda v: v in ("head", "all")),
    "epochs": ("a whole number ≥ 1", lambda v: _integer(v) and v >= 1),
}
"""The fields every ``config.json`` holds: name → (what it must be, check)."""
OPTIONAL_CONFIG_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "batch_size": ("a whole number ≥ 2", lambda v: _integer(v) and v >= 2),
    "seed": ("a whole number ≥ 0", lambda v: _integer(v) and v >= 0),
    "n_checkpoints": ("a whole number ≥ 0", lambda v: _integer(v) and v >= 0),
    "lr": ("a positive number", lambda v: _number(v) and v > 0),
    "weight_decay": ("a number ≥ 0", lambda v: _number(v) and v >= 0),
    "downsample": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "corrupt_fraction": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "augment_shift": ("a number in [0, 0.5)", lambda v: _number(v) and 0 <= v < 0.5),
    "augment_flip": ("true or false", lambda v: isinstance(v, bool)),
    "split": (
        "three fractions or 'official'",
        lambda v: v == "official" or (isinstance(v, list) and len(v) == 3 and all(_number(f) for f in v)),
    ),
    "lr_schedule": ("'cosine' or 'constant'", lambda v: v in ("cosine", "constant")),
    "corrupt_mode": ("'random' or 'top-influence'", lambda v: v in ("random", "top-influence")),
}
"""Fields of ``config.json`` that later steps (the second pass's retraining) read, checked when present."""


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
        for checkpoint in self.checkpoint_paths():
            _check_zip(checkpoint, "checkpoint")
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
        missing = [k for k in CONFIG_FIELDS if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise InfluenceLensError(f"{self.paths.config} lacks {', '.join(missing)}.", RETRAIN_FIX)
        fields = CONFIG_FIELDS | {k: v for k, v in OPTIONAL_CONFIG_FIELDS.items() if k in cfg}
        wrong = [f"{k} must be {what}, not {cfg[k]!r}" for k, (what, ok) in fields.items() if not ok(cfg[k])]
        if not wrong and len(cfg["class_keys"]) != len(cfg["classes"]):
            wrong.append(f"classes and class_keys must be as long ({len(cfg['classes'])} and {len(cfg['class_keys'])})")
        if wrong:
            raise InfluenceLensError(
                f"{self.paths.config} is malformed: {'; '.join(wrong)}.", f"restore it or {RETRAIN_FIX}"
            )
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
        """loss, margin: (n_epochs, n_train) float32, all finite (a training stops at a non-finite loss)."""
        return _finite_arrays(self.paths.dynamics)

    @cached_property
    def predictions(self) -> dict[str, np.ndarray]:
        """probs_train / probs_val / probs_test: (n, n_classes) float32, all finite."""
        return _finite_arrays(self.paths.predictions)

    # --- model -----------------------------------------------------------------------------------------
    def checkpoint_paths(self) -> list[Path]:
        """Intermediate checkpoints in epoch order, then ``final.pt``."""
        return [*self.paths.epoch_checkpoints(), self.paths.final_checkpoint]

    def load_model(self, checkpoint: str | Path | None = None) -> nn.Module:
        """ResNet18 with the run's weights (``final.pt`` unless given), on the CPU, in eval mode."""
        model, _ = build_resnet18(self.n_classes, pretrained=False)
        path = checkpoint or self.paths.final_checkpoint
        try:
            load_checkpoint(model, path)
        except InfluenceLensError as e:
            raise InfluenceLensError(f"The run's checkpoint is damaged: {e.problem}", RETRAIN_FIX) from e
        return model.eval()

    # --- data ------------------------------------------------------------------------------------------
    @cached_property
    def dataset(self) -> ImageSet:
        """The run's dataset as read now (images memory-mapped from the image cache when it was built)."""
        cfg = self.config
        try:
            return load_dataset(cfg["dataset"], cfg["class_keys"], cfg["image_size"], on_bad_image="skip")
        except InfluenceLensError as e:
            raise DatasetMovedError(
                self.path,
                f"The run's dataset {cfg['dataset']!r} cannot be opened here: {e.problem}",
                f"put the data back at that place, or {REPOINT_FIX}",
            ) from e

    @cached_property
    def _positions(self) -> np.ndarray:
        """(n_samples,) int64: where each row of ``samples.csv`` is in :attr:`dataset`."""
        found = pd.Index(list(self.dataset.ids)).get_indexer(self.samples["id"].astype(str))
        missing = self.samples["id"][found < 0]
        if len(missing):
            raise DatasetMovedError(
                self.path,
                f"{len(missing)} sample(s) of the run are no longer in the dataset, e.g. {missing.iloc[0]}.",
                f"restore the files, {REPOINT_FIX}, or {RETRAIN_FIX}",
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


class DatasetMovedError(InfluenceLensError):
    """The run's dataset is not where ``config.json`` says (or lacks samples): fixed by :func:`repoint`."""

    def __init__(self, run_path: Path, problem: str, fix: str):
        super().__init__(problem, fix)
        self.run_path = run_path


def repoint(path: str | Path, spec: str) -> Run:
    """Point the run at ``path`` at its dataset's new place ``spec`` (e.g. ``tiny-imagenet:/data/tin``): the new
    place must hold every sample id of ``samples.csv`` with the same true label; ``config.json`` then names the
    resolved spec (written atomically, under the run's lock). Returns the run opened again."""
    run = Run(path)
    cfg = run.config
    new_spec = resolve_spec(spec)
    kind, old_kind = new_spec.partition(":")[0], cfg["dataset"].partition(":")[0].strip().lower()
    if kind != old_kind:
        raise InfluenceLensError(
            f"The run was trained on a {old_kind} dataset, not {kind}.", f"give a {old_kind}:PATH spec"
        )
    dataset = load_dataset(new_spec, cfg["class_keys"], cfg["image_size"], on_bad_image="skip")
    found = pd.Index(list(dataset.ids)).get_indexer(run.samples["id"].astype(str))
    if (found < 0).any():
        missing = run.samples["id"][found < 0]
        raise InfluenceLensError(
            f"{new_spec} lacks {len(missing)} of the run's {len(found)} images, e.g. {missing.iloc[0]}.",
            "give the folder that holds the run's data (the same files, moved)",
        )
    differ = dataset.labels[found] != run.samples["true_label"].to_numpy()
    if differ.any():
        raise InfluenceLensError(
            f"{int(differ.sum())} of the run's images lie in another class folder at {new_spec}, e.g. "
            f"{run.samples['id'].iloc[int(np.argmax(differ))]}.",
            "give the folder that holds the run's data (the same files, moved)",
        )
    with run_lock(run.paths):
        run.require_unchanged()
        atomic_write_json(run.paths.config, _read_json(run.paths.config) | {"dataset": new_spec})
    return Run(path)


def _check_zip(path: Path, what: str) -> None:
    """Refuse a truncated or overwritten zip file (a checkpoint): reads only its central directory, at the end."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (OSError, zipfile.BadZipFile) as e:
        raise InfluenceLensError(f"The run's {what} {path} is damaged: {e}.", RETRAIN_FIX) from e


def _finite_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file of the run, refused when unreadable or when one holds NaN or ±inf."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InfluenceLensError(f"Cannot read {path}: {e}.", f"restore it or {RETRAIN_FIX}") from e
    for name, values in arrays.items():
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise InfluenceLensError(
                f"{path} is damaged: {name} holds {bad} values that are not finite numbers (NaN or infinite).",
                f"restore it or {RETRAIN_FIX}",
            )
    return arrays


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
                    shapes[f"{path.name}:{member.removesuffix('.npy')}"] = read_npy_header(f)[0]
            return shapes
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InfluenceLensError(f"Cannot read {path}: {e}.", f"restore it or {RETRAIN_FIX}") from e
