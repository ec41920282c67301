"""Train a ResNet18 on a split dataset and write a self-contained, cached run directory.

Two recipes: ``train_layers="head"`` (backbone frozen in eval mode, only ``fc`` learns; the reference
notebook's) and ``"all"`` (the full network). Adam with cosine learning-rate decay, seeded shuffling, optional
horizontal flips. Training dynamics — each training sample's loss and margin — are recorded from every epoch's
training pass (as in area-under-the-margin), at no extra cost.

:func:`train` is the list of steps load → split → cache key → fit → evaluate → write; :func:`fit_model` is the
training loop alone (also used for leave-group-out retraining). The run directory is written under its lock and
swapped in only when complete (:mod:`influence_core.rundir`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn

from .corruption import flip_random, flip_top_influence
from .data import (
    DEFAULT_IMAGE_SIZE,
    ImageSet,
    ModelInputs,
    Split,
    check_image_size,
    check_split,
    load_dataset,
    memory_text,
    parse_spec,
    resolve_spec,
    split_dataset,
)
from .errors import InfluenceLensError
from .model import IMAGENET, build_resnet18
from .paths import TRAIN_KEY_FIELD, RunPaths
from .progress import Progress
from .run import Run
from .rundir import recover, run_lock, staged_run
from .storage import (
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    resolve_device,
    stable_hash,
)

log = logging.getLogger(__name__)


RECOMMENDED_EPOCHS = 15
"""The default number of epochs (library, CLI, app): the recipe of the README's tiny-imagenet numbers."""

AUGMENT_SHIFT_BY_KIND = {"tiny-imagenet": 0.25, "folder": 0.25, "demo": 0.0, "fashion-mnist": 0.0}
"""Default share of the image side by which training images are shifted at random, per dataset kind: photos gain
(more flips found on four tiny-imagenet pairs), centred items lose (the digits and Fashion-MNIST); measured in
``docs/decisions/augment-shift.md``."""

SETTINGS_ADDED_LATER: dict[str, object] = {"augment_shift": 0.0}
"""Settings added after runs were first cached, with the value that reproduces those runs: a ``config.json``
without one was trained with this value, and at this value a setting stays out of the cache key (older keys hold)."""


@dataclass
class TrainConfig:
    """Everything that decides a trained model; equal configs on equal data hit the cache."""

    dataset: str = "demo"
    classes: list[str] | None = None
    image_size: int | None = None
    split: tuple[float, float, float] | str = (0.8, 0.1, 0.1)  # or "official" (see data.split_dataset)
    downsample: float = 1.0
    seed: int = 0
    epochs: int = RECOMMENDED_EPOCHS
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    train_layers: str = "all"
    augment_flip: bool = True
    augment_shift: float | None = None  # random shifts by up to this share of the side; None: AUGMENT_SHIFT_BY_KIND
    n_checkpoints: int = 4
    corrupt_fraction: float = 0.0
    corrupt_mode: str = "random"
    weights: str = "auto"
    on_bad_image: str = "skip"
    corrupt_scores: list[float] | None = field(default=None, repr=False)

    def shift_share(self) -> float:
        """``augment_shift``, or the default of the dataset's kind when it is None."""
        return AUGMENT_SHIFT_BY_KIND[parse_spec(self.dataset)[0]] if self.augment_shift is None else self.augment_shift

    @classmethod
    def from_run(cls, run: Run) -> TrainConfig:
        """The config that trained ``run`` (classes by their keys; corruption scores are not kept)."""
        cfg = SETTINGS_ADDED_LATER | run.config  # a config.json from before a setting existed
        fields = {f.name for f in dataclasses.fields(cls)} - {"corrupt_scores", "weights"}
        return cls(
            **{k: cfg[k] for k in fields if k in cfg}
            | {
                "classes": cfg["class_keys"],
                "split": cfg["split"] if isinstance(cfg["split"], str) else tuple(cfg["split"]),
                "weights": cfg.get("weights_requested", "auto" if cfg["weights"] == "pretrained" else "scratch"),
            }
        )

    def check(self) -> None:
        """Refuse settings that would fail late or train silently wrong, before any data is read."""
        if self.train_layers not in ("head", "all"):
            raise InfluenceLensError(
                f"train_layers must be 'head' or 'all', not {self.train_layers!r}.",
                "use head (frozen backbone) or all (full network)",
            )
        if self.epochs < 1:
            raise InfluenceLensError(f"epochs must be at least 1, not {self.epochs}.", "for example 10")
        if self.batch_size < 2:
            raise InfluenceLensError(
                f"batch_size must be at least 2 (BatchNorm needs two images), not {self.batch_size}.", "for example 64"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InfluenceLensError(f"The learning rate must be a positive number, not {self.lr}.", "for example 1e-3")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InfluenceLensError(
                f"weight_decay must be a number ≥ 0, not {self.weight_decay}.", "for example 1e-4, or 0 for none"
            )
        if self.augment_shift is not None and not 0 <= self.augment_shift < 0.5:
            raise InfluenceLensError(
                f"augment_shift is a share of the image side in [0, 0.5), not {self.augment_shift}.",
                "for example 0.25 (16 px at 64 px), or 0 for no shifts",
            )
        if self.lr_schedule not in ("cosine", "constant"):
            raise InfluenceLensError(
                f"lr_schedule must be 'cosine' or 'constant', not {self.lr_schedule!r}.", "use cosine or constant"
            )
        if self.n_checkpoints < 0:
            raise InfluenceLensError(
                f"The number of kept checkpoints must be ≥ 0, not {self.n_checkpoints}.",
                "for example 4, or 0 to keep only the final model",
            )
        if self.seed < 0:
            raise InfluenceLensError(f"The seed must be ≥ 0, not {self.seed}.", "for example 0")
        if self.classes is not None and len(self.classes) < 2:
            raise InfluenceLensError(
                f"A classifier needs at least two classes, not {list(self.classes)}.",
                "name two or more classes, or leave them out for all",
            )
        check_image_size(self.image_size)
        check_split(self.split if isinstance(self.split, str) else tuple(self.split), self.downsample)
        self._check_corruption()
        if self.weights not in ("auto", "scratch", IMAGENET) and not Path(self.weights).expanduser().is_file():
            raise InfluenceLensError(
                f"Pretrained weights file {self.weights} does not exist.",
                f"use auto, scratch, {IMAGENET} (download once) or the path of a ResNet18 state_dict (.pth)",
            )

    def _check_corruption(self) -> None:
        if not 0 <= self.corrupt_fraction < 1:
            raise InfluenceLensError(
                f"The share of flipped labels must be in [0, 1), not {self.corrupt_fraction}.",
                "for example 0.1 for 10 %, or 0 for none",
            )
        if self.corrupt_mode not in ("random", "top-influence"):
            raise InfluenceLensError(f"Unknown corruption mode {self.corrupt_mode!r}.", "use random or top-influence")
        if self.corrupt_mode == "top-influence" and self.corrupt_fraction > 0 and self.corrupt_scores is None:
            raise InfluenceLensError(
                "top-influence corruption needs influence scores of a clean run.",
                "train a clean run with the same data first and pass it with --scores-from",
            )
        if self.corrupt_scores is not None and not np.isfinite(np.asarray(self.corrupt_scores, float)).all():
            raise InfluenceLensError(
                "The clean run's influence scores are not all finite numbers.",
                "recompute its influence (influence-core influence --recompute)",
            )


PREDICT_BATCH = 256
"""Images per forward pass when predicting (no gradients)."""


@cache
def activation_floats(image_size: int) -> tuple[int, int]:
    """Floats a ResNet18 (10 classes) produces for one ``image_size`` px image: the sum over its layers (what a
    training step keeps for the backward pass) and the largest single layer (the peak of a forward pass without
    gradients). Counted on PyTorch's ``meta`` device, which allocates nothing."""
    from torchvision.models import resnet18

    with torch.device("meta"):
        model = resnet18(num_classes=10).eval()  # eval: BatchNorm takes a single image
    sizes: list[int] = []
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
    model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return sum(sizes), max(sizes)


def available_memory(device: torch.device) -> int:
    """Bytes free for a computation on ``device``: the GPU's free memory, or the machine's available memory
    (``MemAvailable`` of ``/proc/meminfo``: free plus reclaimable caches; else the free pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(config: TrainConfig, device: torch.device) -> None:
    """Refuse an image size whose training step cannot fit on ``device``, before any image is read: a step keeps
    every layer's output of its batch for the backward pass and needs as much again for their gradients
    (float32), a prediction pass holds the largest layer of :data:`PREDICT_BATCH` images twice (input and
    output). Both are lower bounds: PyTorch's workspace comes on top."""
    size = config.image_size or DEFAULT_IMAGE_SIZE[parse_spec(config.dataset)[0]]
    total, largest = activation_floats(size)
    need = max(2 * 4 * config.batch_size * total, 2 * 4 * PREDICT_BATCH * largest)
    have = available_memory(device)
    if need > have:
        where = "GPU" if device.type == "cuda" else "the machine's"
        raise InfluenceLensError(
            f"Training at {size} px in batches of {config.batch_size} needs at least {memory_text(need)} of "
            f"{where} memory; {memory_text(have)} are available.",
            "choose a smaller image size (the default is 64 px; 224 px is ImageNet's) or a smaller batch size",
        )


def checkpoint_epochs(epochs: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced epochs (1-based) at which intermediate checkpoints are kept; the last epoch is final.pt."""
    if n_checkpoints <= 0 or epochs <= 1:
        return []
    marks = np.unique(np.round(np.linspace(0, epochs, n_checkpoints + 1)[1:]).astype(int))
    return [int(e) for e in marks if 0 < e < epochs]


def train(
    config: TrainConfig,
    run_dir: str | Path,
    device: str = "auto",
    retrain: bool = False,
    progress: Progress | None = None,
    wait: bool = True,
) -> Run:
    """Train (or return the cached run) and write ``run_dir``; status lines go to this module's logger.

    Holds the run directory's lock while it checks the cache and writes (``wait=False``: fail at once if another
    process holds it); a previous run in ``run_dir`` is replaced only once the new one is complete. The dataset's
    folder is recorded as an absolute path; a run trained before that, with the same spec as typed here, is still
    a cache hit (and its ``config.json`` then gets the absolute path)."""
    config.check()
    check_memory(config, resolve_device(device))
    t0 = time.perf_counter()
    data = split_data(load_data(config), config)
    return train_on(
        data,
        run_dir,
        device=device,
        retrain=retrain,
        progress=progress,
        wait=wait,
        timings={"load_data": time.perf_counter() - t0},
        legacy_key=training_key(data, config.dataset),
    )


def train_on(
    data: TrainingData,
    run_dir: str | Path,
    *,
    device: str = "auto",
    retrain: bool = False,
    progress: Progress | None = None,
    wait: bool = True,
    timings: dict[str, float] | None = None,
    key: str | None = None,
    legacy_key: str | None = None,
    extra_config: dict | None = None,
) -> Run:
    """Train on ``data`` as it is (split and training labels given) and write ``run_dir``, or return the cached
    run. ``key``: the cache key (default :func:`training_key`); ``legacy_key``: the key the same training had
    before dataset paths were resolved (a hit on it records the resolved path); ``extra_config``: more fields for
    ``config.json`` (e.g. a child run's ``lineage``); ``timings``: seconds already spent, kept in ``metrics.json``."""
    dev = resolve_device(device)
    paths = RunPaths(Path(run_dir))
    key = key or training_key(data)
    timings = dict(timings or {})
    with run_lock(paths, wait=wait):
        recover(paths)
        if not retrain and holds_training(paths, key):
            log.info("cached: %s already holds this training (use --retrain to force)", run_dir)
            return Run(paths.root)
        if not retrain and legacy_key is not None and legacy_key != key and holds_training(paths, legacy_key):
            atomic_write_json(paths.config, read_json(paths.config) | {"dataset": data.config.dataset})
            log.info("cached: %s already holds this training (its dataset path is now absolute)", run_dir)
            return Run(paths.root)
        model, weights = _build_model(data)
        log.info(
            "weights: %s; device: %s",
            "ImageNet-pretrained (local file)"
            if weights == "pretrained"
            else "from scratch (no local pretrained weights found)",
            dev,
        )
        with staged_run(paths) as stage:
            x_train, x_val, x_test = (ModelInputs(data.dataset.images, part) for part in data.parts)
            y_train, y_val = torch.from_numpy(data.y_train).to(dev), torch.from_numpy(data.y_val).to(dev)
            t1 = time.perf_counter()
            history, dynamics = fit_model(
                model, data.config, x_train, y_train, x_val, y_val, run_paths=stage, progress=progress
            )
            timings["train"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            probs = {name: predict(model, x) for name, x in (("train", x_train), ("val", x_val), ("test", x_test))}
            metrics = evaluate(data, probs, history) | {"device": str(dev)}
            timings["evaluate"] = time.perf_counter() - t2
            write_run(
                stage, data, key, weights, history, dynamics, probs, metrics | {"timings_s": timings}, extra_config
            )
    log.info("test F1 %.3f, accuracy %.3f; run written to %s", metrics["f1_test"], metrics["accuracy_test"], run_dir)
    return Run(paths.root)


@dataclass
class TrainingData:
    """What a training sees: the dataset, its split and the training labels (maybe corrupted).

    ``config`` has its classes and image size resolved (so "goldfish" and "n01443537" train once);
    ``y_train``: (n_train,) int64 labels as trained on; ``flipped``: positions in the train split whose label was
    flipped (int64)."""

    config: TrainConfig
    dataset: ImageSet
    split: Split
    y_train: np.ndarray
    flipped: np.ndarray

    @property
    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions into ``dataset`` of the train, val and test samples."""
        return self.split.train, self.split.val, self.split.test

    @property
    def y_val(self) -> np.ndarray:
        return self.dataset.labels[self.split.val]

    @property
    def n_classes(self) -> int:
        return len(self.dataset.classes)


def load_data(config: TrainConfig) -> ImageSet:
    """Read the dataset the config names; unreadable images are skipped (and logged) or an error."""
    ds = load_dataset(config.dataset, config.classes, config.image_size, config.on_bad_image)
    for rel, reason in ds.skipped:
        log.warning("skipped unreadable image %s: %s", rel, reason)
    return ds


def split_data(ds: ImageSet, config: TrainConfig) -> TrainingData:
    """Seeded stratified split, resolved config, and the corrupted training labels."""
    split = split_dataset(ds.labels, config.split, config.seed, config.downsample, ds.classes, ids=ds.ids)
    resolved = dataclasses.replace(
        config,
        dataset=resolve_spec(config.dataset),
        classes=list(ds.class_keys),
        image_size=int(ds.images.shape[1]),
        augment_shift=config.shift_share(),
    )
    y_train, flipped = _corrupt(resolved, ds.labels[split.train], len(ds.classes))
    return TrainingData(resolved, ds, split, y_train, flipped)


def training_key(data: TrainingData, spec: str | None = None) -> str:
    """Hash of the dataset spec, data ids, labels, split, training labels and resolved settings: equal key = same
    training. ``spec`` replaces the resolved spec (the spec as typed gives the key of a run trained before specs
    were resolved)."""
    ds, split, config = data.dataset, data.split, data.config
    config = config if spec is None else dataclasses.replace(config, dataset=spec)
    return stable_hash(
        "train-v1",
        config.dataset,
        ds.ids,
        ds.labels,
        split.train,
        split.val,
        split.test,
        data.y_train,
        keyed_settings(config),
    )


def holds_training(paths: RunPaths, key: str) -> bool:
    """Whether ``paths`` holds the complete training ``key``: the key file, the key recorded in ``config.json``
    (written in the same training) and the final checkpoint must all be there."""
    try:
        stored = paths.train_key.read_text().strip()
        config = read_json(paths.config)
    except (OSError, ValueError):
        return False
    return (
        stored == key
        and isinstance(config, dict)
        and config.get(TRAIN_KEY_FIELD) == key
        and paths.final_checkpoint.is_file()
        and paths.samples.is_file()
    )


def _build_model(data: TrainingData) -> tuple[nn.Module, str]:
    """Seeded ResNet18 for the data's classes; weights "pretrained" or "scratch"."""
    config = data.config
    model, weights = _seeded_resnet18(
        config.seed,
        data.n_classes,
        None if config.weights == "auto" else (False if config.weights == "scratch" else config.weights),
    )
    if weights == "scratch" and config.train_layers == "head":
        log.warning("warning: training only the head on a randomly initialised backbone gives weak features")
    return model, weights


def _seeded_resnet18(seed: int, n_classes: int, pretrained: str | bool | None) -> tuple[nn.Module, str]:
    """:func:`build_resnet18` after seeding torch: the ``fc`` initialisation draws from the seed, so a run and its
    retrains start from the same weights."""
    torch.manual_seed(seed)
    return build_resnet18(n_classes, pretrained)


def evaluate(data: TrainingData, probs: dict[str, np.ndarray], history: list[dict]) -> dict:
    """Test F1 (macro), accuracy, confusion matrix and how many flipped labels were memorised, from the final
    model's class probabilities ``probs[split]`` (n, K)."""
    y_test = data.dataset.labels[data.split.test]
    pred_test = probs["test"].argmax(1)
    pred_train = probs["train"].argmax(1)
    flipped = data.flipped
    return {
        "f1_test": float(f1_score(y_test, pred_test, average="macro")),
        "accuracy_test": float((pred_test == y_test).mean()),
        "confusion_matrix": confusion_matrix(y_test, pred_test, labels=range(data.n_classes)).tolist(),
        "accuracy_train_given_labels": float((pred_train == data.y_train).mean()),
        "flips_memorised": float((pred_train[flipped] == data.y_train[flipped]).mean()) if len(flipped) else None,
        "epoch_seconds": float(np.mean([h["seconds"] for h in history])),
    }


def write_run(
    paths: RunPaths,
    data: TrainingData,
    key: str,
    weights: str,
    history: list[dict],
    dynamics: dict[str, np.ndarray],
    probs: dict[str, np.ndarray],
    metrics: dict,
    extra_config: dict | None = None,
) -> None:
    """Write every file of a finished training (checkpoints are already there); ``train_key`` last.
    ``extra_config``: more fields for ``config.json``."""
    ds, config = data.dataset, data.config
    atomic_write_json(
        paths.config,
        _config_dict(config)
        | {
            "classes": ds.classes,
            "class_keys": ds.class_keys,
            "image_size": int(ds.images.shape[1]),
            "weights": weights,
            "weights_requested": config.weights,
            "n_skipped_images": len(ds.skipped),
            TRAIN_KEY_FIELD: key,
        }
        | (extra_config or {}),
    )
    _write_samples(paths, data)
    y_train_true = ds.labels[data.split.train]
    atomic_write_json(
        paths.corruption,
        {
            "mode": config.corrupt_mode,
            "fraction": config.corrupt_fraction,
            "seed": config.seed,
            "flipped": {ds.ids[data.split.train[i]]: int(y_train_true[i]) for i in data.flipped},
        },
    )
    atomic_save_npz(paths.predictions, **{f"probs_{k}": v for k, v in probs.items()})
    atomic_save_npz(paths.dynamics, **dynamics)
    atomic_write_json(paths.history, history)
    atomic_write_json(paths.metrics, metrics)
    atomic_write_bytes(paths.train_key, key.encode())


def _corrupt(config: TrainConfig, y_true: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if config.corrupt_fraction <= 0:
        return y_true.copy(), np.zeros(0, dtype=np.int64)
    if config.corrupt_mode == "random":
        return flip_random(y_true, config.corrupt_fraction, n_classes, config.seed)
    return flip_top_influence(
        y_true, np.asarray(config.corrupt_scores), config.corrupt_fraction, n_classes, config.seed
    )


def keyed_settings(config: TrainConfig) -> dict:
    """The settings a cache key hashes: all of them, less those still at their value from before they existed
    (``SETTINGS_ADDED_LATER``)."""
    return {
        k: v
        for k, v in _config_dict(config).items()
        if not (k in SETTINGS_ADDED_LATER and v == SETTINGS_ADDED_LATER[k])
    }


def _config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["split"] = config.split if isinstance(config.split, str) else list(config.split)
    if d["corrupt_scores"] is not None:
        d["corrupt_scores"] = stable_hash(np.asarray(d["corrupt_scores"], dtype=np.float64))
    return d


def _write_samples(paths: RunPaths, data: TrainingData) -> None:
    ds, parts = data.dataset, []
    for name, idx in zip(("train", "val", "test"), data.parts, strict=True):
        given = data.y_train if name == "train" else ds.labels[idx]
        is_flipped = np.zeros(len(idx), dtype=bool)
        if name == "train":
            is_flipped[data.flipped] = True
        parts.append(
            pd.DataFrame(
                {
                    "id": [ds.ids[i] for i in idx],
                    "split": name,
                    "label": given,
                    "true_label": ds.labels[idx],
                    "flipped": is_flipped,
                }
            )
        )
    atomic_write_bytes(paths.samples, pd.concat(parts).to_csv(index=False).encode())


def fit_model(
    model: nn.Module,
    config: TrainConfig,
    x_train: torch.Tensor | ModelInputs,
    y_train: torch.Tensor,
    x_val: torch.Tensor | ModelInputs,
    y_val: torch.Tensor,
    *,
    run_paths: RunPaths | None = None,
    progress: Progress | None = None,
    exclude: np.ndarray | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Train ``model`` in place with ``config``'s recipe on the device of ``y_train``.

    ``x_*``: (n, 3, S, S) float32 inputs (tensors or lazy image sources, read batch by batch), ``y_*``: (n,) int64
    labels on the training device. ``run_paths``: where to
    write the kept checkpoints and ``final.pt`` (None: write nothing). ``exclude`` (n,) bool leaves those training
    points out of every batch while keeping the full set's shuffling and augmentation draws (leave-group-out
    retraining: the run minus them; an all-False mask is bit-identical to None).

    Returns the per-epoch history ``[{"epoch", "train_loss", "val_loss", "seconds"}]`` and the training dynamics
    ``{"loss", "margin"}``, each (epochs, n) float32 (0 for excluded points)."""
    dev = y_train.device
    model.to(dev)
    if config.train_layers == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    n = len(x_train)
    n_batches = int(np.ceil(n / config.batch_size))
    # cosine decay to zero over all steps settles the final model (constant Adam steps leave val loss jumpy)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * n_batches)
        if config.lr_schedule == "cosine"
        else None
    )
    gen = torch.Generator().manual_seed(config.seed)
    max_shift = round(config.shift_share() * x_train.shape[-1])  # pixels
    keep = set(checkpoint_epochs(config.epochs, config.n_checkpoints))
    losses = np.zeros((config.epochs, n), np.float32)
    margins = np.zeros((config.epochs, n), np.float32)
    history = []
    for epoch in range(config.epochs):
        t = time.perf_counter()
        model.train(config.train_layers == "all")
        perm = torch.randperm(n, generator=gen)
        batches = []
        for idx in np.array_split(perm.numpy(), n_batches):  # batches within one sample of each other's size
            flip = torch.rand(len(idx), generator=gen) < 0.5 if config.augment_flip else None
            shift = torch.randint(-max_shift, max_shift + 1, (len(idx), 2), generator=gen) if max_shift else None
            batches.append(_Batch(idx, flip, shift) if exclude is None else _Batch(idx, flip, shift).without(exclude))
        if model.training:  # BatchNorm in training mode cannot normalise a batch of one image
            batches = _merge_single_images(batches)
        for b, batch in enumerate(batches):
            idx, flip, shift = batch.idx, batch.flip, batch.shift
            if len(idx) == 0:  # the whole batch left out or merged: keep the learning-rate schedule aligned
                if schedule is not None:
                    with warnings.catch_warnings():  # before the first optimizer step PyTorch warns; intended here
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`", UserWarning)
                        schedule.step()
                continue
            x, y = x_train[idx].to(dev), y_train[torch.from_numpy(idx).to(dev)]
            if flip is not None:
                x = torch.where(flip.to(dev)[:, None, None, None], x.flip(3), x)
            if shift is not None:
                x = _translate(x, shift.to(dev))
            logits = model(x)
            loss_each = F.cross_entropy(logits, y, reduction="none")
            loss = loss_each.mean()
            if not torch.isfinite(loss):
                raise InfluenceLensError(
                    f"Training loss became {loss.item()} at epoch {epoch + 1}.",
                    "lower the learning rate (lr) or check the images for extreme values",
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            with torch.no_grad():
                losses[epoch, idx] = loss_each.detach().cpu().numpy()
                margins[epoch, idx] = _margin(logits.detach(), y).cpu().numpy()
            if progress:
                progress(f"epoch {epoch + 1}/{config.epochs}", b + 1, n_batches)
        model.eval()
        val_loss = float(F.cross_entropy(batched_logits(model, x_val), y_val)) if len(y_val) else None
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(losses[epoch].mean()),
                "val_loss": val_loss,
                "seconds": time.perf_counter() - t,
            }
        )
        if run_paths is not None and epoch + 1 in keep:
            atomic_torch_save(run_paths.epoch_checkpoint(epoch + 1), _cpu_state(model))
    if run_paths is not None:
        atomic_torch_save(run_paths.final_checkpoint, _cpu_state(model))
    return history, {"loss": losses, "margin": margins}


@dataclass
class _Batch:
    """One training batch: positions ``idx`` (b,) int64 and their augmentation draws, horizontal ``flip`` (b,)
    bool and ``shift`` (b, 2) int64 pixels (None when that augmentation is off)."""

    idx: np.ndarray
    flip: torch.Tensor | None
    shift: torch.Tensor | None

    def without(self, exclude: np.ndarray) -> _Batch:
        """The batch less the positions marked in ``exclude`` (n,) bool, each keeping its own draws."""
        kept = ~exclude[self.idx]
        keep_t = torch.from_numpy(kept)
        return _Batch(
            self.idx[kept],
            None if self.flip is None else self.flip[keep_t],
            None if self.shift is None else self.shift[keep_t],
        )

    def __add__(self, other: _Batch) -> _Batch:
        def cat(a, b):
            return None if a is None else torch.cat([a, b])

        return _Batch(np.concatenate([self.idx, other.idx]), cat(self.flip, other.flip), cat(self.shift, other.shift))


def _merge_single_images(batches: list[_Batch]) -> list[_Batch]:
    """``batches`` with every one-image batch moved into the previous non-empty batch (the first one's into the
    next), its place left empty, so that BatchNorm never sees a batch of one; unchanged when none has one image.
    A lone image of a whole epoch is dropped."""
    out = list(batches)
    for i, batch in enumerate(out):
        if len(batch.idx) != 1:
            continue
        after = [j for j in range(i + 1, len(out)) if len(out[j].idx)]
        before = [j for j in range(i) if len(out[j].idx)]
        out[i] = _Batch(
            batch.idx[:0],
            None if batch.flip is None else batch.flip[:0],
            None if batch.shift is None else batch.shift[:0],
        )
        if before:
            out[before[-1]] = out[before[-1]] + batch
        elif after:
            out[after[0]] = batch + out[after[0]]
    return out


def retrain_without(
    run: Run,
    exclude: np.ndarray,
    *,
    config: TrainConfig | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """The run's training again with the training points ``exclude`` (n_train,) bool left out of every batch:
    the same recipe, seed and initial weights, and the full set's shuffling and augmentation draws (leave-group-out
    retraining). ``config`` replaces the run's recipe (e.g. no checkpoints, fewer epochs). Writes nothing.

    Returns the model (eval mode, on the device) and its training dynamics ``{"loss", "margin"}`` (epochs,
    n_train) float32 (0 for the excluded points)."""
    config = config or TrainConfig.from_run(run)
    dev = resolve_device(device)
    was_pretrained = run.config["weights"] == "pretrained"
    model, weights = _seeded_resnet18(
        config.seed, run.n_classes, was_pretrained and (True if config.weights == "auto" else config.weights)
    )
    if weights != run.config["weights"]:
        raise InfluenceLensError(
            f"The run was trained from {run.config['weights']} weights, a retrain here would start from {weights}.",
            "put the ImageNet weights file in the torch hub cache",
        )
    x, y = run.tensors("train")
    x_val, y_val = run.tensors("val")
    _, dynamics = fit_model(
        model, config, x, y.to(dev), x_val, y_val.to(dev), progress=progress, exclude=np.asarray(exclude, bool)
    )
    return model.eval(), dynamics


def _translate(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(b, C, H, W) images moved by ``offsets`` (b, 2) int64 pixels (rows, columns), borders reflected: the
    random-crop augmentation without changing the image size."""
    b, _, h, w = x.shape
    pad = min(int(offsets.abs().max()), h - 1, w - 1)
    offsets = offsets.clamp(-pad, pad)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = pad + offsets[:, :1] + torch.arange(h, device=x.device)  # (b, H)
    cols = pad + offsets[:, 1:] + torch.arange(w, device=x.device)  # (b, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logit of the given label minus the largest other logit: (b,) — negative means misclassified."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return own - other


@torch.no_grad()
def batched_logits(model, x, batch_size: int = 256) -> torch.Tensor:
    """(n, K) logits on the model's device, in batches of ``x`` (a tensor or a lazy image source)."""
    device = next(model.parameters()).device
    parts = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros((0, model.fc.out_features), device=device)


def predict(model, x: torch.Tensor | ModelInputs) -> np.ndarray:
    """(n, K) float32 class probabilities."""
    return batched_logits(model, x).softmax(1).float().cpu().numpy()


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
