"""Linear datamodeling score (LDS, Park et al. 2023 "TRAK"): the field's yardstick for influence matrices.

    .venv/bin/python benchmarks/lds.py train [--models 50] [--worker 0/1] [workload options]
    .venv/bin/python benchmarks/lds.py score NAME=MATRIX.npy ... [workload options]

``train`` trains the full-data run (``run/``, the product's recipe through ``influence_core.train``) and then M
models, each on its own random half of the run's training set (subset ``m`` drawn by
``default_rng([SUBSET_SEED, m])``, model seed ``m``: initial weights, shuffling and flips), with the same recipe
and epochs, and records each model's logits on the test and training sets. Each model's outputs are written
atomically to ``models/model_<m>.npz`` as soon as it finishes, so the job is resumable and can be split over
processes (``--worker i/W`` trains the models with ``m % W == i``).

Measurement of model m on test point t: the margin of the true label, ``logit_y − logsumexp(logits of the other
classes)``, and the cross-entropy loss. Prediction of a method for subset S: ``Σ_{i∈S} I[t, i]`` (positive =
helpful, so a helpful subset predicts a higher margin and a lower loss). LDS of test point t: the Spearman
correlation, across the M models, between measured margin and predicted sum (for the loss: with minus the
loss); the score is its mean over test points, with the standard error of that mean.

Output directory ``benchmarks/out/lds/<workload key>/``::

    run/                 the full-data run (checkpoints, dynamics, ...), as written by influence_core.train
    workload.json        recipe (TrainConfig), subset fraction and seed, n_train, n_test
    models/model_<m>.npz subset (k,) int64 indices into the training set, seed, test_logits (n_test, K),
                         train_logits (n_train, K) float32, seconds
    measurements.npz     stacked: masks (M, n_train) bool, margins / losses (M, n_test) float64, seeds (M,)
    scores.json          LDS ± s.e. of every scored matrix (margin and loss)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from influence_core import Run, TrainConfig, train, training
from influence_core.evaluation import SUBSET_SEED, lds, magnitude, paired_difference, subset_indices, true_label_margin
from influence_core.measured import MEASURED_FILE, update_costs, write_measured
from influence_core.model import build_resnet18
from influence_core.paths import RunPaths
from influence_core.storage import atomic_save_npz, atomic_write_json, read_json, stable_hash

log = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- workload
def workload_config(args: argparse.Namespace) -> TrainConfig:
    """The product's recipe for the LDS workload (ResNet18 from scratch, Adam + cosine, flips and random shifts
    of ``--augment-shift``, see its help)."""
    return TrainConfig(
        dataset=args.dataset,
        classes=list(args.classes),
        image_size=args.image_size,
        epochs=args.epochs,
        augment_shift=args.augment_shift,
        train_layers="all",
        corrupt_fraction=args.corrupt_fraction,
        seed=args.seed,
        weights="scratch",
    )


def workload_dir(config: TrainConfig, fraction: float, out: Path) -> Path:
    """``out/<classes>-<size>px-flip<f>-<hash of recipe and subset fraction>``."""
    key = stable_hash("lds-v1", training.keyed_settings(config), fraction, SUBSET_SEED, length=10)
    return out / f"{'-'.join(config.classes)}-{config.image_size}px-flip{config.corrupt_fraction:g}-{key}"


def fit_model(model, config: TrainConfig, x_train, y_train, x_val, y_val) -> None:
    """The product's training loop, writing nothing (one wrapper, so that a change of its API is one line)."""
    training.fit_model(model, config, x_train, y_train, x_val, y_val)


@torch.no_grad()
def logits_of(model, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(n, K) float32 logits of ``model`` in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).float().numpy()


def materialised(run: Run, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(k, 3, S, S)`` float32 and labels ``(k,)`` of one split of ``run``, decoded at once."""
    x, y = run.tensors(split)
    return x[:], y


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) float64 per-sample cross-entropy of logits (n, K) for labels y (n,)."""
    t = torch.as_tensor(np.asarray(logits, np.float64))
    return F.cross_entropy(t, torch.as_tensor(y), reduction="none").numpy()


def claim(path: Path) -> bool:
    """Atomically claim one model for this process (several workers share the list); a claim whose process
    is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            path.write_text(str(os.getpid()))
            return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def train_models(args: argparse.Namespace) -> Path:
    """Train the full-data run, then every subset model of this worker that is not on disk yet."""
    torch.set_num_threads(args.threads)
    config = workload_config(args)
    root = workload_dir(config, args.fraction, args.out)
    run_dir = root / "run"  # the workload folder is keyed by the recipe: a finished run in it is this recipe's
    run = Run(run_dir) if RunPaths(run_dir).train_key.is_file() else train(config, run_dir, device="cpu")
    (x_train, y_train), (x_val, y_val), (x_test, _) = (materialised(run, s) for s in ("train", "val", "test"))
    atomic_write_json(
        root / "workload.json",
        {
            "recipe": dataclasses.asdict(config),
            "fraction": args.fraction,
            "subset_seed": SUBSET_SEED,
            "n_train": len(y_train),
            "n_test": len(x_test),
            "run_train_key": RunPaths(run.path).train_key.read_text(),
        },
    )
    worker, n_workers = (int(v) for v in args.worker.split("/"))
    order = range(worker, args.models, n_workers)
    for m in reversed(order) if args.reverse else order:
        target = root / "models" / f"model_{m:03d}.npz"
        if target.is_file() or not claim(root / "models" / f".claim_{m:03d}"):
            continue
        subset = subset_indices(m, len(y_train), args.fraction)
        model_config = dataclasses.replace(config, seed=m, n_checkpoints=0)
        t0 = time.perf_counter()
        torch.manual_seed(m)  # as influence_core.training.train: seed, then build
        model, _ = build_resnet18(run.n_classes, False)
        fit_model(model, model_config, x_train[subset], y_train[subset], x_val, y_val)
        atomic_save_npz(
            target,
            subset=subset,
            seed=np.int64(m),
            test_logits=logits_of(model, x_test),
            train_logits=logits_of(model, x_train),
            seconds=np.float64(time.perf_counter() - t0),
        )
        log.info("model %d: %.0f s", m, time.perf_counter() - t0)
    return root


# ----------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass(frozen=True)
class Measurements:
    """The subset models' outputs: ``masks (M, n_train)`` bool (which training points model m saw), ``margins``
    and ``losses`` ``(M, n_test)`` float64 (true-label margin and cross-entropy on each test point), ``seeds (M,)``."""

    masks: np.ndarray
    margins: np.ndarray
    losses: np.ndarray
    seeds: np.ndarray

    @classmethod
    def collect(cls, root: Path, y_test: np.ndarray) -> Measurements:
        """Stack every ``models/model_<m>.npz`` under ``root`` (in model order) and cache the stack."""
        files = sorted((root / "models").glob("model_*.npz"))
        n_train = read_json(root / "workload.json")["n_train"]
        masks, margins, losses, seeds = [], [], [], []
        for f in files:
            with np.load(f) as z:
                mask = np.zeros(n_train, bool)
                mask[z["subset"]] = True
                masks.append(mask)
                margins.append(true_label_margin(z["test_logits"], y_test))
                losses.append(cross_entropy(z["test_logits"], y_test))
                seeds.append(int(z["seed"]))
        out = cls(np.array(masks), np.array(margins), np.array(losses), np.array(seeds))
        atomic_save_npz(root / "measurements.npz", **dataclasses.asdict(out))
        return out


PAIRED_REFERENCE = "ours_kfac_all"
"""The job every other job's margin LDS is compared with test point by test point (the whole-network method of
best LDS at its defaults, which the app ranks with): the per-job standard
errors mostly come from the test points, which all jobs share."""


def score(measurements: Measurements, influences: np.ndarray) -> dict:
    """LDS of one matrix against the margin and against minus the loss (JSON-able, without per-test values);
    a matrix with fewer rows than test points covers the first ones."""
    out = {}
    rows = len(influences)  # a matrix over the first test points only is scored on those
    for target, measured in (("margin", measurements.margins), ("loss", -measurements.losses)):
        r = lds(influences, measurements.masks, measured[:, :rows])
        out[target] = {k: v for k, v in r.items() if k != "per_test"}
    return out


def score_all(root: Path, reference_job: str = PAIRED_REFERENCE) -> dict:
    """LDS (margin and loss) and magnitude of every matrix in ``root/matrices``; written to ``scores.json``."""
    run = Run(root / "run")
    y_test = run.labels("test")
    measurements = Measurements.collect(root, y_test)
    full_losses = cross_entropy(np.log(np.clip(run.predictions["probs_test"], 1e-30, None)), y_test)
    scores, per_test = {}, {}
    for path in sorted((root / "matrices").glob("*.npy")):
        matrix = np.load(path)
        t = time.perf_counter()
        scores[path.stem] = score(measurements, matrix) | {
            "magnitude": magnitude(measurements.masks, measurements.losses, matrix, full_losses),
            "scoring_seconds": round(time.perf_counter() - t, 3),
        }
        per_test[path.stem] = lds(matrix, measurements.masks, measurements.margins[:, : len(matrix)])["per_test"]
    reference = per_test.get(reference_job)
    for job, values in per_test.items():
        if reference is not None and len(values) == len(reference) and job != reference_job:
            scores[job]["paired_vs_reference"] = paired_difference(values, reference)
    result = {
        "n_models": int(len(measurements.masks)),
        "paired_reference": reference_job,
        "seeds": measurements.seeds.tolist(),
        "scores": scores,
        "workload": read_json(root / "workload.json")["recipe"],
    }
    atomic_write_json(root / "scores.json", result)
    return result


def markdown(result: dict) -> str:
    """One table row per matrix, best margin LDS first."""
    rows = sorted(result["scores"].items(), key=lambda kv: -np.nan_to_num(kv[1]["margin"]["lds"], nan=-9))
    lines = [
        f"| job | LDS (margin) ± s.e. | paired vs {result.get('paired_reference', PAIRED_REFERENCE)} | "
        "LDS (loss) ± s.e. | slope measured/predicted Δloss | Pearson |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for job, s in rows:
        mag, paired = s["magnitude"], s.get("paired_vs_reference")
        lines.append(
            f"| {job} | {s['margin']['lds']:.3f} ± {s['margin']['se']:.3f} | "
            f"{'–' if paired is None else format(paired['mean'], '+.4f') + ' ± ' + format(paired['se'], '.4f')} | "
            f"{s['loss']['lds']:.3f} ± {s['loss']['se']:.3f} | "
            f"{'–' if mag['slope'] is None else format(mag['slope'], '.3g')} | "
            f"{'–' if mag['pearson'] is None else format(mag['pearson'], '.2f')} |"
        )
    return f"M = {result['n_models']} models\n\n" + "\n".join(lines) + "\n"


def git_commit() -> str:
    """The checkout's short commit, recorded in the measurements file."""
    import subprocess

    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()


# ----------------------------------------------------------------------------------------------- CLI
def add_workload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="tiny-imagenet:../shared/data/tiny-imagenet-200",
        help="dataset spec, relative to the checkout (default: tiny-imagenet beside it)",
    )
    p.add_argument("--classes", nargs="+", default=["goldfish", "lemon"])
    p.add_argument("--corrupt-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--augment-shift",
        type=float,
        default=0.25,
        help="random shifts of the training images, as in `influence-core train` (default 0.25: the product's "
        "default for tiny-imagenet; 0: the flips-only recipe of the earlier LDS builds, benchmarks/LDS_HISTORY.md)",
    )
    p.add_argument("--fraction", type=float, default=0.5, help="size of each subset, as a fraction of n_train")
    p.add_argument("--out", type=Path, default=BENCH / "out" / "lds")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="[lds %(asctime)s] %(message)s", stream=sys.stdout)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the full-data run and the subset models (resumable)")
    add_workload_options(t)
    t.add_argument("--models", type=int, default=50)
    t.add_argument("--worker", default="0/1", help="i/W: train the models m with m %% W == i")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument(
        "--reverse",
        action="store_true",
        help="train this worker's models last to first (a second process meets the first in the middle)",
    )
    sc = sub.add_parser("score", help="score every matrix in <workload>/matrices (seconds)")
    add_workload_options(sc)
    sc.add_argument("--measured", type=Path, default=None, help="also write this measured.json for the app")
    sc.add_argument("--bench-results", type=Path, default=None, help="benchmarks/run.py results.json (costs)")
    sc.add_argument(
        "--reference",
        default=PAIRED_REFERENCE,
        help=f"job the paired differences are taken against ({PAIRED_REFERENCE})",
    )
    c = sub.add_parser("costs", help="only replace measured.json's costs by a benchmarks/run.py results.json")
    c.add_argument("--measured", type=Path, default=MEASURED_FILE)
    c.add_argument("--bench-results", type=Path, required=True)
    a = p.parse_args(argv)
    if a.command == "train":
        train_models(a)
    elif a.command == "costs":
        data = update_costs(a.measured, a.bench_results)
        print("\n".join(f"{k}: {v['cost_x_floor']}× the floor" for k, v in sorted(data["methods"].items())))
    else:
        root = workload_dir(workload_config(a), a.fraction, a.out)
        result = score_all(root, a.reference)
        print(markdown(result))
        if a.measured:
            write_measured(result, a.measured, a.bench_results, root / "matrices", commit=git_commit())


if __name__ == "__main__":
    main()
