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
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from influence_core import Run, TrainConfig, train, training
from influence_core.model import build_resnet18
from influence_core.paths import RunPaths
from influence_core.storage import atomic_save_npz, atomic_write_json, read_json, stable_hash

log = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent
SUBSET_SEED = 20231
"""Base of every subset's random draw: subset m is ``default_rng([SUBSET_SEED, m]).choice(...)``."""


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


def subset_indices(model_index: int, n_train: int, fraction: float) -> np.ndarray:
    """(round(fraction · n_train),) sorted int64 indices of model ``model_index``'s training subset."""
    rng = np.random.default_rng([SUBSET_SEED, model_index])
    return np.sort(rng.choice(n_train, int(round(fraction * n_train)), replace=False)).astype(np.int64)


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


def true_label_margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) float64 ``logit_y − logsumexp(logits of the other classes)`` for logits (n, K), labels y (n,)."""
    logits = np.asarray(logits, np.float64)
    own = logits[np.arange(len(y)), y]
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    top = others.max(1)
    return own - (top + np.log(np.exp(others - top[:, None]).sum(1)))


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


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share their mean rank), float64."""
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def lds(influences: np.ndarray, masks: np.ndarray, measured: np.ndarray) -> dict:
    """Linear datamodeling score of an influence matrix.

    ``influences (n_test, n_train)``: positive = helpful (raises ``measured``); ``masks (M, n_train)`` bool: the
    training subset of each model; ``measured (M, n_test)``: each model's output on each test point, oriented so
    that helpful training data raises it (the margin, or minus the loss). Prediction for model m and test point
    t: ``Σ_{i∈S_m} I[t, i]``. Returns ``{"lds": mean over test points of the Spearman correlation across the
    M models, "se": its standard error, "per_test": (n_test,) correlations (NaN where either side is constant),
    "n_test": test points with a defined correlation, "n_models": M}``.
    """
    predicted = masks.astype(np.float64) @ np.asarray(influences, np.float64).T  # (M, n_test)
    rp, rm = _ranks(predicted), _ranks(np.asarray(measured, np.float64))
    rp -= rp.mean(0)
    rm -= rm.mean(0)
    denom = np.sqrt((rp * rp).sum(0) * (rm * rm).sum(0))
    per_test = np.divide((rp * rm).sum(0), denom, out=np.full(denom.shape, np.nan), where=denom > 0)
    valid = per_test[np.isfinite(per_test)]
    se = float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else float("nan")
    return {
        "lds": float(valid.mean()) if len(valid) else float("nan"),
        "se": se,
        "per_test": per_test,
        "n_test": int(len(valid)),
        "n_models": int(len(masks)),
    }


PAIRED_REFERENCE = "ours_kfac_all"
"""The job every other job's margin LDS is compared with test point by test point (the whole-network method of
best LDS at its defaults, which the app ranks with; ``ours_ekfac_all`` until 2026-11-30): the per-job standard
errors mostly come from the test points, which all jobs share."""


def paired_difference(per_test: np.ndarray, reference: np.ndarray) -> dict:
    """Mean over test points of ``per_test − reference`` (per-test-point LDS) and its standard error."""
    d = (per_test - reference)[np.isfinite(per_test - reference)]
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n_test": int(len(d))}


def score(measurements: Measurements, influences: np.ndarray) -> dict:
    """LDS of one matrix against the margin and against minus the loss (JSON-able, without per-test values);
    a matrix with fewer rows than test points covers the first ones."""
    out = {}
    rows = len(influences)  # a matrix over the first test points only is scored on those
    for target, measured in (("margin", measurements.margins), ("loss", -measurements.losses)):
        r = lds(influences, measurements.masks, measured[:, :rows])
        out[target] = {k: v for k, v in r.items() if k != "per_test"}
    return out


def magnitude(measurements: Measurements, influences: np.ndarray, full_losses: np.ndarray) -> dict:
    """How well the matrix's scale matches: for every model m and test point t, the measured loss change
    ``loss_m[t] − loss_full[t]`` against the predicted ``Σ_{i∉S_m} I[t, i] / n_train`` (removing the half left out).
    Least-squares slope through the origin (1 = calibrated) and Pearson r, pooled over (m, t)."""
    n_train = measurements.masks.shape[1]
    predicted = (~measurements.masks).astype(np.float64) @ np.asarray(influences, np.float64).T / n_train
    measured = (measurements.losses - full_losses[None, :])[:, : len(influences)]
    pred, meas = predicted.ravel(), measured.ravel()
    return {
        "slope": float(pred @ meas / (pred @ pred)) if pred.any() else None,
        "pearson": float(np.corrcoef(pred, meas)[0, 1]) if pred.std() > 0 else None,
    }


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
            "magnitude": magnitude(measurements, matrix, full_losses),
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


def job_method_scope(job: str) -> tuple[str, str] | None:
    """``ours_ekfac_all`` → (ekfac, all), ``tracin_all`` → (tracin, all); None for damping-scan, full-rank,
    fit-size, rank, depth, fitted-position and test-subset
    variants and for the peers' jobs (the app shows the LDS of the product's own methods
    at their defaults)."""
    if any(
        tag in job for tag in ("_lambda", "_rel", "_top", "_full", "_fit", "_first", "_rank", "_pos", "_depth")
    ) or job.startswith(("kronfluence_", "pydvl_")):
        return None
    parts = job.removeprefix("ours_").rsplit("_", 1)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def write_measured(result: dict, path: Path, bench_results: Path | None = None, matrices: Path | None = None) -> dict:
    """``benchmarks/measured.json`` (format in ``influence_core/measured.py``) from the LDS scores, with the
    cost (× floor) of ``benchmarks/run.py``'s results.json if given, and for every head job the relative error
    of its matrix against ``ours_direct_head`` (the exact head at the same damping) in ``matrices`` if given."""
    import subprocess

    report = json.loads(bench_results.read_text()) if bench_results and bench_results.is_file() else None
    exact = matrices / "ours_direct_head.npy" if matrices else None
    exact_head = np.load(exact).astype(np.float64) if exact and exact.is_file() else None
    recipe = result["workload"]
    before = json.loads(path.read_text()) if path.is_file() else {}
    previous = before.get("methods", {})
    methods = {}
    for job, s in result["scores"].items():
        key = job_method_scope(job)
        if key is None:
            continue
        entry = {
            "job": job,
            "lds": round(s["margin"]["lds"], 4),
            "lds_se": round(s["margin"]["se"], 4),
            "slope": s["magnitude"]["slope"],
            "pearson": s["magnitude"].get("pearson"),
            # the measured accuracy text, and cost and fidelity from an earlier benchmark run, stay unless remeasured
            "cost_x_floor": previous.get("/".join(key), {}).get("cost_x_floor"),
            "fidelity": previous.get("/".join(key), {}).get("fidelity"),
            "note": previous.get("/".join(key), {}).get("note"),
        }
        full = result["scores"].get(f"{job}_full")
        if full is not None:
            entry["full_lds"] = round(full["margin"]["lds"], 4)
        if report:
            entry["cost_x_floor"] = job_cost(report, job, default=entry["cost_x_floor"])
        if exact_head is not None and key[1] == "head" and job != "ours_direct_head" and job.startswith("ours_"):
            m = np.load(matrices / f"{job}.npy").astype(np.float64)
            error = np.linalg.norm(m - exact_head) / np.linalg.norm(exact_head)
            entry["fidelity"] = f"rel. err {error:.2g} vs exact direct (head, same damping)"
        methods["/".join(key)] = entry
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()
    data = {
        "workload": f"{' vs '.join(recipe['classes'])}, {recipe['image_size']} px, ResNet18 from scratch, "
        f"{recipe['epochs']} epochs, {recipe['corrupt_fraction']:.0%} flipped labels, "
        + (f"random shifts up to {recipe['augment_shift']:.0%}" if recipe.get("augment_shift") else "no random shifts"),
        "n_models": result["n_models"],
        "commit": commit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": {**{k: v for k, v in previous.items() if k not in methods}, **methods},
        **({"costs_from": costs_source(report)} if report else {k: v for k, v in before.items() if k == "costs_from"}),
        "scope_notes": before.get("scope_notes", {}),
    }
    atomic_write_json(path, data)
    return data


def job_cost(report: dict, job: str, default: float | None = None) -> float | None:
    """Seconds to ``job``'s full matrix (fit included) over the floor of ``run.py``'s ``report``; ``default`` when
    that run did not time it."""
    matrix = (report.get("jobs", {}).get(job) or {}).get("matrix") or {}
    if "seconds_full" not in matrix:
        return default
    return round(matrix["seconds_full"] / report["floor"]["forward_backward_s"], 2)


def costs_source(report: dict) -> str:
    """Where measured.json's costs come from: the ``run.py`` run's date and floor."""
    return (
        f"benchmarks/run.py of {report['date']}, forward+backward floor {report['floor']['forward_backward_s']:.2f} s"
    )


def update_costs(path: Path, bench_results: Path) -> dict:
    """Replace every method's ``cost_x_floor`` in ``path`` (measured.json) by ``run.py``'s ``bench_results``
    where that run has the method's job; the LDS and notes stay."""
    report = json.loads(bench_results.read_text())
    data = json.loads(path.read_text())
    for entry in data["methods"].values():
        entry["cost_x_floor"] = job_cost(report, entry["job"], default=entry["cost_x_floor"])
    data["costs_from"] = costs_source(report)
    atomic_write_json(path, data)
    return data


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
        "default for tiny-imagenet; 0: the recipe of the LDS numbers of 2026-11-29, before it became the default)",
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
    c.add_argument("--measured", type=Path, default=BENCH / "measured.json")
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
            write_measured(result, a.measured, a.bench_results, root / "matrices")


if __name__ == "__main__":
    main()
