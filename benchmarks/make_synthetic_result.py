"""A synthetic run with a full-size influence result, for checking that the app stays fast at scale.

    python benchmarks/make_synthetic_result.py --out runs/synthetic [--n-train 100000 --n-test 10000 --classes 200]

Writes an image folder (``OUT/images/<class>/<i>.png``, small random pictures tinted by class), a run directory
(``OUT/run``: samples, predictions, dynamics, metrics, an untrained ResNet18 checkpoint) and an influence entry for
the default settings whose matrix is low rank plus noise, written block by block through the same store as real
results (:mod:`influence_core.results`), summaries and histograms included. Nothing here is a measurement of
influence: it only has the sizes and the layout. Open it with ``streamlit run app.py`` and ``?run=OUT/run``.
At the defaults it takes about 4 GB of disk for the matrix and a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_core import results  # noqa: E402
from influence_core.model import build_resnet18  # noqa: E402
from influence_core.paths import InfluencePaths, RunPaths  # noqa: E402
from influence_core.pipeline import DEFAULT_SETTINGS, cache_key  # noqa: E402
from influence_core.run import Run  # noqa: E402
from influence_core.storage import (  # noqa: E402
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
)

IMAGE_SIZE = 16


def write_images(folder: Path, labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> list[str]:
    """One small PNG per sample under ``folder/c<label>/``; returns the ids (paths relative to ``folder``)."""
    tints = rng.integers(40, 216, size=(n_classes, 3))
    ids = []
    for i, label in enumerate(labels):
        rel = f"c{label:03d}/{i:06d}.png"
        path = folder / rel
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(-40, 40, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
            Image.fromarray(np.clip(tints[label] + noise, 0, 255).astype(np.uint8)).save(path)
        ids.append(rel)
    return ids


def write_run(
    run_dir: Path,
    dataset: Path,
    ids: list[str],
    labels: np.ndarray,
    n_train: int,
    n_classes: int,
    rng: np.random.Generator,
) -> Run:
    paths = RunPaths(run_dir)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    classes = [f"c{c:03d}" for c in range(n_classes)]
    split = np.where(np.arange(n) < n_train, "train", "test")
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n_train, n_train // 20, replace=False)] = True
    given = np.where(flipped, (labels + 1) % n_classes, labels)
    atomic_write_json(
        paths.config,
        {
            "dataset": f"folder:{dataset}",
            "classes": classes,
            "class_keys": classes,
            "image_size": IMAGE_SIZE,
            "split": "official",
            "downsample": 1.0,
            "seed": 0,
            "epochs": 1,
            "train_layers": "all",
            "weights": "scratch",
            "corrupt_fraction": 0.05,
            "corrupt_mode": "random",
            "synthetic": True,
        },
    )
    atomic_write_bytes(
        paths.samples,
        pd.DataFrame({"id": ids, "split": split, "label": given, "true_label": labels, "flipped": flipped})
        .to_csv(index=False)
        .encode(),
    )
    atomic_write_json(
        paths.corruption,
        {
            "mode": "random",
            "fraction": 0.05,
            "seed": 0,
            "flipped": {ids[i]: int(labels[i]) for i in np.flatnonzero(flipped)},
        },
    )
    atomic_write_json(paths.history, [{"epoch": 1, "train_loss": 1.0, "val_loss": None, "seconds": 1.0}])
    atomic_save_npz(
        paths.dynamics,
        loss=rng.random((1, n_train), np.float32),
        margin=rng.normal(size=(1, n_train)).astype(np.float32),
    )
    probs = rng.dirichlet(np.ones(n_classes), size=n).astype(np.float32)
    atomic_save_npz(
        paths.predictions,
        probs_train=probs[:n_train],
        probs_val=np.zeros((0, n_classes), np.float32),
        probs_test=probs[n_train:],
    )
    pred = probs[n_train:].argmax(1)
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (labels[n_train:], pred), 1)
    atomic_write_json(
        paths.metrics,
        {
            "f1_test": 0.0,
            "accuracy_test": float((pred == labels[n_train:]).mean()),
            "confusion_matrix": confusion.tolist(),
            "accuracy_train_given_labels": 0.0,
            "flips_memorised": 0.0,
            "epoch_seconds": 1.0,
            "device": "synthetic",
            "timings_s": {},
        },
    )
    model, _ = build_resnet18(n_classes, pretrained=False)
    atomic_torch_save(paths.final_checkpoint, model.state_dict())
    atomic_write_bytes(paths.train_key, b"synthetic")
    return Run(run_dir)


def write_result(run: Run, rank: int, rng: np.random.Generator) -> Path:
    """The default settings' influence entry: ``U V + noise`` written block by block with its summaries."""
    n_train, n_test = len(run.ids("train")), len(run.ids("test"))
    entry = InfluencePaths(RunPaths(run.path).influence / cache_key(run, DEFAULT_SETTINGS))
    entry.root.mkdir(parents=True, exist_ok=True)
    u = rng.normal(size=(n_test, rank)).astype(np.float32)
    test_labels = run.labels("test")
    builder = results.SummaryBuilder(n_test, n_train, run.n_classes)
    matrix = results.create_matrix(entry, n_test, n_train)
    for a, b in results.column_blocks(n_train):
        block = u @ rng.normal(size=(rank, b - a)).astype(np.float32)
        block += 0.1 * rng.standard_normal(size=block.shape, dtype=np.float32)
        matrix[:, a:b] = block
        builder.add(results.summarise_block(block, a, test_labels, run.n_classes, np.abs(block).mean(0)))
        print(f"block {a}:{b} written", flush=True)
    builder.write(entry)
    results.write_histograms(entry, run.labels("train"), run.n_classes)
    np.save(entry.checkpoint_self_influence, builder.self_influence[None])
    atomic_write_json(
        entry.meta,
        {
            "settings": DEFAULT_SETTINGS.__dict__,
            "checkpoints": ["final.pt"],
            "n_train": n_train,
            "n_test": n_test,
            "timings_s": {"total": 0.0},
            "created": time.time(),
            "device": "synthetic",
            "synthetic": True,
        },
    )
    return entry.root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n = args.n_train + args.n_test
    labels = np.arange(n) % args.classes
    t = time.perf_counter()
    ids = write_images(args.out / "images", labels, args.classes, rng)
    print(f"images: {time.perf_counter() - t:.0f} s", flush=True)
    run = write_run(args.out / "run", (args.out / "images").resolve(), ids, labels, args.n_train, args.classes, rng)
    t = time.perf_counter()
    entry = write_result(run, args.rank, rng)
    print(f"result: {time.perf_counter() - t:.0f} s -> {entry}")


if __name__ == "__main__":
    main()
