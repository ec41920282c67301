"""A synthetic finished run, written by hand: many classes or many images without training anything.

The images are tiny coloured squares in an image folder (``folder:`` dataset, one sub-folder per class), the
model files are placeholders (the pages under test never load the model) and the influence entry is random
with structure: same-label training points help, flipped ones hurt, a few outliers stretch the range.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from influence_core.paths import RunPaths
from influence_core.pipeline import DEFAULT_SETTINGS, cache_key
from influence_core.results import SummaryBuilder, column_blocks, create_matrix, summarise_block, write_histograms
from influence_core.run import Run


def make_synthetic_run(
    run_dir: Path,
    data_dir: Path,
    n_classes: int,
    n_train: int,
    n_test: int,
    image_size: int = 8,
    flip_fraction: float = 0.1,
    helpful_flips: float = 0.0,
    seed: int = 0,
) -> Run:
    """Write ``data_dir`` (image folder) and ``run_dir`` (run directory with a default influence entry).

    Flipped training images hurt every test image, except a ``helpful_flips`` share of them, which help (as
    some flipped digits do in the demo) — then a "most helpful" list can hold flipped images.
    """
    rng = np.random.default_rng(seed)
    classes = [f"class-{c:03d}" for c in range(n_classes)]
    n_val = max(n_classes, n_test // 10)
    split = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    true = np.concatenate([np.arange(n_train) % n_classes, np.arange(n_val) % n_classes, np.arange(n_test) % n_classes])
    ids = _write_images(data_dir, classes, true, image_size, rng)

    train = split == "train"
    flipped = np.zeros(len(split), bool)
    flipped[rng.choice(np.flatnonzero(train), int(flip_fraction * n_train), replace=False)] = True
    label = np.where(flipped, (true + rng.integers(1, n_classes, len(true))) % n_classes, true)

    paths = RunPaths(run_dir)
    paths.checkpoints.mkdir(parents=True)
    pd.DataFrame({"id": ids, "split": split, "label": label, "true_label": true, "flipped": flipped}).to_csv(
        paths.samples, index=False
    )
    _write_json(
        paths.config,
        {
            "dataset": f"folder:{data_dir}",
            "classes": classes,
            "class_keys": classes,
            "image_size": image_size,
            "split": [0.8, 0.1, 0.1],
            "downsample": 1.0,
            "seed": seed,
            "epochs": 2,
            "batch_size": 64,
            "lr": 1e-3,
            "lr_schedule": "cosine",
            "weight_decay": 1e-4,
            "train_layers": "head",
            "augment_flip": True,
            "n_checkpoints": 1,
            "corrupt_fraction": flip_fraction,
            "corrupt_mode": "random",
            "weights": "scratch",
            "weights_requested": "scratch",
            "on_bad_image": "skip",
            "corrupt_scores": None,
            "n_skipped_images": 0,
        },
    )
    _write_json(
        paths.corruption,
        {
            "mode": "random",
            "fraction": flip_fraction,
            "seed": seed,
            "flipped": {ids[i]: int(true[i]) for i in np.flatnonzero(flipped)},
        },
    )
    _write_json(
        paths.history, [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "seconds": 1.0} for e in (1, 2)]
    )
    probs = {s: _probabilities(true[split == s], n_classes, rng) for s in ("train", "val", "test")}
    np.savez(paths.predictions, **{f"probs_{s}": p for s, p in probs.items()})
    np.savez(
        paths.dynamics,
        loss=rng.random((2, n_train), dtype=np.float32) + flipped[train],
        margin=rng.standard_normal((2, n_train), dtype=np.float32) - flipped[train],
    )
    pred_test, true_test = probs["test"].argmax(1), true[split == "test"]
    confusion = np.zeros((n_classes, n_classes), int)
    np.add.at(confusion, (true_test, pred_test), 1)
    _write_json(
        paths.metrics,
        {
            "f1_test": float((pred_test == true_test).mean()),
            "accuracy_test": float((pred_test == true_test).mean()),
            "confusion_matrix": confusion.tolist(),
            "epoch_seconds": 1.0,
            "timings_s": {},
        },
    )
    torch.save({}, paths.final_checkpoint)  # a whole file, but no model: the pages under test never load it
    paths.train_key.write_text("synthetic")

    run = Run(paths.root)
    entry = paths.influence_entry(cache_key(run, DEFAULT_SETTINGS))
    entry.root.mkdir(parents=True)
    same = label[train][None, :] == true_test[:, None]
    flip_effect = np.where(rng.random(n_train) < helpful_flips, 3.0, -3.0) * flipped[train]
    self_influence = rng.random(n_train, dtype=np.float32) + flipped[train]
    matrix, summaries = create_matrix(entry, n_test, n_train), SummaryBuilder(n_test, n_train, n_classes)
    for start, stop in column_blocks(n_train):  # structured noise: same label helps, flipped labels hurt
        block = (
            rng.standard_normal((n_test, stop - start), dtype=np.float32)
            + 2 * same[:, start:stop]
            + flip_effect[start:stop]
        ).astype(np.float32)
        if start == 0:
            block[:, :3] *= 200  # a few training points with huge influence: outliers for the charts' x-range
        matrix[:, start:stop] = block
        summaries.add(summarise_block(block, start, true_test, n_classes, self_influence[start:stop]))
    summaries.write(entry)
    write_histograms(entry, label[train], n_classes)
    np.save(entry.checkpoint_self_influence, rng.random((1, n_train), dtype=np.float32))
    torch.save({}, entry.curvature)
    _write_json(
        entry.meta, {"settings": {}, "n_train": n_train, "n_test": n_test, "timings_s": {"total": 1.0}, "created": 0}
    )
    return run


def _write_images(folder: Path, classes: list[str], labels: np.ndarray, size: int, rng) -> list[str]:
    """One PNG per sample (a flat colour with noise) under ``folder/<class>/``; returns the ids (relative paths)."""
    ids = []
    for c in classes:
        (folder / c).mkdir(parents=True)
    for i, c in enumerate(labels):
        pixels = np.clip(rng.normal((37 * c) % 256, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        rel = f"{classes[c]}/{i:06d}.png"
        Image.fromarray(pixels).save(folder / rel)
        ids.append(rel)
    return ids


def _probabilities(labels: np.ndarray, n_classes: int, rng) -> np.ndarray:
    """(n, n_classes) float32 softmax outputs, right about 70 % of the time."""
    logits = rng.standard_normal((len(labels), n_classes)).astype(np.float32)
    logits[np.arange(len(labels)), labels] += 2.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))
