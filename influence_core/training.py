"""Train a ResNet18 on a split dataset and write a self-contained, cached run directory.

Two recipes: ``train_layers="head"`` (backbone frozen in eval mode, only ``fc`` learns; the reference
notebook's) and ``"all"`` (the full network). Adam with cosine learning-rate decay, seeded shuffling, optional horizontal flips.
Training dynamics — each training sample's loss and margin — are recorded from every epoch's training
pass (as in area-under-the-margin), at no extra cost.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score

from .progress import Progress
from .corruption import flip_random, flip_top_influence
from .data import ModelInputs, load_dataset, split_dataset
from .errors import InfluenceLensError
from .model import build_resnet18
from .run import Run
from .storage import atomic_save_npz, atomic_torch_save, atomic_write_bytes, atomic_write_json, resolve_device, stable_hash


@dataclass
class TrainConfig:
    """Everything that decides a trained model; equal configs on equal data hit the cache."""

    dataset: str = "demo"
    classes: list[str] | None = None
    image_size: int | None = None
    split: tuple[float, float, float] | str = (0.8, 0.1, 0.1)  # or "official" (see data.split_dataset)
    downsample: float = 1.0
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    train_layers: str = "all"
    augment_flip: bool = True
    n_checkpoints: int = 4
    corrupt_fraction: float = 0.0
    corrupt_mode: str = "random"
    weights: str = "auto"
    on_bad_image: str = "skip"
    corrupt_scores: list[float] | None = field(default=None, repr=False)

    @classmethod
    def from_run(cls, run: Run) -> "TrainConfig":
        """The config that trained ``run`` (classes by their keys; corruption scores are not kept)."""
        cfg = run.config
        fields = {f.name for f in dataclasses.fields(cls)} - {"corrupt_scores", "weights"}
        return cls(**{k: cfg[k] for k in fields if k in cfg} | {
            "classes": cfg["class_keys"], "split": cfg["split"] if isinstance(cfg["split"], str) else tuple(cfg["split"]),
            "weights": cfg.get("weights_requested", "auto" if cfg["weights"] == "pretrained" else "scratch")})

    def check(self) -> None:
        if self.train_layers not in ("head", "all"):
            raise InfluenceLensError(f"train_layers must be 'head' or 'all', not {self.train_layers!r}.")
        if self.epochs < 1 or self.batch_size < 2:
            raise InfluenceLensError("epochs must be ≥ 1 and batch_size ≥ 2.")
        if self.lr_schedule not in ("cosine", "constant"):
            raise InfluenceLensError(f"lr_schedule must be 'cosine' or 'constant', not {self.lr_schedule!r}.")
        if self.corrupt_mode not in ("random", "top-influence"):
            raise InfluenceLensError(f"Unknown corruption mode {self.corrupt_mode!r}.", "use random or top-influence")
        if self.corrupt_mode == "top-influence" and self.corrupt_fraction > 0 and self.corrupt_scores is None:
            raise InfluenceLensError("top-influence corruption needs influence scores of a clean run.",
                                     "compute influences on the clean run first and pass its mean test influence")


def checkpoint_epochs(epochs: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced epochs (1-based) at which intermediate checkpoints are kept; the last epoch is final.pt."""
    if n_checkpoints <= 0 or epochs <= 1:
        return []
    marks = np.unique(np.round(np.linspace(0, epochs, n_checkpoints + 1)[1:]).astype(int))
    return [int(e) for e in marks if 0 < e < epochs]


def train(config: TrainConfig, run_dir: str | Path, device: str = "auto", retrain: bool = False,
          progress: Progress | None = None, log=print) -> Run:
    """Train (or return the cached run) and write ``run_dir``. ``log`` receives one-line status messages."""
    config.check()
    run_dir = Path(run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = load_dataset(config.dataset, config.classes, config.image_size, config.on_bad_image)
    for rel, reason in ds.skipped:
        log(f"skipped unreadable image {rel}: {reason}")
    split = split_dataset(ds.labels, config.split, config.seed, config.downsample, ds.classes, ids=ds.ids)
    timings["load_data"] = time.perf_counter() - t0

    # the key sees resolved values, so "goldfish" and "n01443537" (or a default size) train once
    config = dataclasses.replace(config, classes=list(ds.class_keys), image_size=int(ds.images.shape[1]))
    y_train_true = ds.labels[split.train]
    y_train, flipped = _corrupt(config, y_train_true, len(ds.classes))
    key = stable_hash("train-v1", ds.spec, ds.ids, ds.labels, split.train, split.val, split.test, y_train,
                      _config_dict(config))
    key_file = run_dir / "train_key"
    if not retrain and key_file.is_file() and key_file.read_text().strip() == key:
        log(f"cached: {run_dir} already holds this training (use --retrain to force)")
        return Run(run_dir)

    dev = resolve_device(device)
    torch.manual_seed(config.seed)
    model, weights = build_resnet18(len(ds.classes), None if config.weights == "auto" else
                                    (False if config.weights == "scratch" else config.weights))
    log(f"weights: {'ImageNet-pretrained (local file)' if weights == 'pretrained' else 'from scratch (no local pretrained weights found)'}; device: {dev}")
    if weights == "scratch" and config.train_layers == "head":
        log("warning: training only the head on a randomly initialised backbone gives weak features")

    _reset_run_dir(run_dir)
    cfg = _config_dict(config) | {"classes": ds.classes, "class_keys": ds.class_keys,
                                  "image_size": int(ds.images.shape[1]), "weights": weights,
                                  "weights_requested": config.weights,
                                  "n_skipped_images": len(ds.skipped)}
    atomic_write_json(run_dir / "config.json", cfg)
    _write_samples(run_dir, ds.ids, ds.labels, split, y_train, flipped)
    atomic_write_json(run_dir / "corruption.json", {
        "mode": config.corrupt_mode, "fraction": config.corrupt_fraction, "seed": config.seed,
        "flipped": {ds.ids[split.train[i]]: int(y_train_true[i]) for i in flipped}})

    x_train, x_val, x_test = (ModelInputs(ds.images, s) for s in (split.train, split.val, split.test))
    t1 = time.perf_counter()
    history, dynamics = _fit(model, config, x_train, torch.from_numpy(y_train).to(dev), x_val,
                             torch.from_numpy(ds.labels[split.val]).to(dev), run_dir, progress, dev)
    timings["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    model.eval()
    probs = {name: _predict(model, x) for name, x in (("train", x_train), ("val", x_val), ("test", x_test))}
    atomic_save_npz(run_dir / "predictions.npz", **{f"probs_{k}": v for k, v in probs.items()})
    atomic_save_npz(run_dir / "dynamics.npz", **dynamics)
    atomic_write_json(run_dir / "history.json", history)
    y_test = ds.labels[split.test]
    pred_test = probs["test"].argmax(1)
    timings["evaluate"] = time.perf_counter() - t2
    metrics = {
        "f1_test": float(f1_score(y_test, pred_test, average="macro")),
        "accuracy_test": float((pred_test == y_test).mean()),
        "confusion_matrix": confusion_matrix(y_test, pred_test, labels=range(len(ds.classes))).tolist(),
        "accuracy_train_given_labels": float((probs["train"].argmax(1) == y_train).mean()),
        "flips_memorised": float((probs["train"].argmax(1)[flipped] == y_train[flipped]).mean()) if len(flipped) else None,
        "epoch_seconds": float(np.mean([h["seconds"] for h in history])),
        "device": str(dev),
        "timings_s": timings,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_bytes(key_file, key.encode())
    log(f"test F1 {metrics['f1_test']:.3f}, accuracy {metrics['accuracy_test']:.3f}; run written to {run_dir}")
    return Run(run_dir)


def _corrupt(config: TrainConfig, y_true: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if config.corrupt_fraction <= 0:
        return y_true.copy(), np.zeros(0, dtype=np.int64)
    if config.corrupt_mode == "random":
        return flip_random(y_true, config.corrupt_fraction, n_classes, config.seed)
    return flip_top_influence(y_true, np.asarray(config.corrupt_scores), config.corrupt_fraction, n_classes,
                              config.seed)


def _config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["split"] = config.split if isinstance(config.split, str) else list(config.split)
    if d["corrupt_scores"] is not None:
        d["corrupt_scores"] = stable_hash(np.asarray(d["corrupt_scores"], dtype=np.float64))
    return d


def _reset_run_dir(run_dir: Path) -> None:
    """Remove a previous training's outputs (never the review store) before writing a new one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_key").unlink(missing_ok=True)
    for stale in ("checkpoints", "influence"):
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    (run_dir / "checkpoints").mkdir()


def _write_samples(run_dir, ids, labels, split, y_train, flipped) -> None:
    parts = []
    for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
        given = y_train if name == "train" else labels[idx]
        is_flipped = np.zeros(len(idx), dtype=bool)
        if name == "train":
            is_flipped[flipped] = True
        parts.append(pd.DataFrame({"id": [ids[i] for i in idx], "split": name, "label": given,
                                   "true_label": labels[idx], "flipped": is_flipped}))
    atomic_write_bytes(run_dir / "samples.csv", pd.concat(parts).to_csv(index=False).encode())


def _fit(model, config, x_train, y_train, x_val, y_val, run_dir, progress, dev, exclude=None):
    """Train ``model`` in place; ``exclude (n,) bool`` leaves those training points out of every batch while
    keeping the full set's shuffling and augmentation draws (leave-group-out retraining: the run minus them)."""
    model.to(dev)
    if config.train_layers == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    n = len(x_train)
    n_batches = int(np.ceil(n / config.batch_size))
    # cosine decay to zero over all steps settles the final model (constant Adam steps leave val loss jumpy)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * n_batches)
                if config.lr_schedule == "cosine" else None)
    gen = torch.Generator().manual_seed(config.seed)
    keep = set(checkpoint_epochs(config.epochs, config.n_checkpoints))
    losses = np.zeros((config.epochs, n), np.float32)
    margins = np.zeros((config.epochs, n), np.float32)
    history = []
    for epoch in range(config.epochs):
        t = time.perf_counter()
        model.train(config.train_layers == "all")
        perm = torch.randperm(n, generator=gen)
        # array_split keeps batches within one sample of each other: no size-1 batch for BatchNorm
        for b, idx in enumerate(np.array_split(perm.numpy(), n_batches)):
            flip = torch.rand(len(idx), generator=gen) < 0.5 if config.augment_flip else None
            if exclude is not None:
                kept = ~exclude[idx]
                idx, flip = idx[kept], (None if flip is None else flip[torch.from_numpy(kept)])
                if len(idx) == 0:  # the whole batch left out: keep the learning-rate schedule aligned
                    if schedule is not None:
                        schedule.step()
                    continue
            x, y = x_train[idx].to(dev), y_train[torch.from_numpy(idx).to(dev)]
            if flip is not None:
                x = torch.where(flip.to(dev)[:, None, None, None], x.flip(3), x)
            logits = model(x)
            loss_each = F.cross_entropy(logits, y, reduction="none")
            loss = loss_each.mean()
            if not torch.isfinite(loss):
                raise InfluenceLensError(f"Training loss became {loss.item()} at epoch {epoch + 1}.",
                                         "lower the learning rate (lr) or check the images for extreme values")
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
        val_loss = float(F.cross_entropy(_logits(model, x_val), y_val)) if len(y_val) else None
        history.append({"epoch": epoch + 1, "train_loss": float(losses[epoch].mean()), "val_loss": val_loss,
                        "seconds": time.perf_counter() - t})
        if epoch + 1 in keep:
            atomic_torch_save(run_dir / "checkpoints" / f"epoch_{epoch + 1}.pt", _cpu_state(model))
    atomic_torch_save(run_dir / "checkpoints" / "final.pt", _cpu_state(model))
    return history, {"loss": losses, "margin": margins}


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logit of the given label minus the largest other logit: (b,) — negative means misclassified."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return own - other


@torch.no_grad()
def _logits(model, x, batch_size: int = 256) -> torch.Tensor:
    """(n, K) logits on the model's device, in batches of ``x`` (a tensor or a lazy image source)."""
    device = next(model.parameters()).device
    parts = [model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros((0, model.fc.out_features), device=device)


def _predict(model, x: torch.Tensor) -> np.ndarray:
    """(n, K) float32 class probabilities."""
    return _logits(model, x).softmax(1).float().cpu().numpy()


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
