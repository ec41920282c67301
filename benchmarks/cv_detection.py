"""Out-of-sample loss from k-fold cross-validation as a mislabel signal, alone and combined, on runs with flips.

    PYTHONPATH=. .venv/bin/python benchmarks/cv_detection.py RUN_DIR [RUN_DIR ...] [--folds 4] [--epochs 15] [--clean] [--kfac]

For each run, ``--folds`` models of the run's own recipe (``run.py``'s ``out_of_fold_probs``: ``--epochs`` each,
no checkpoints) give every training image a probability from a model that never trained on it (cached as
``RUN_DIR/cv_probs_<folds>x<epochs>.npy``); then detection metrics (AUROC, recall at 10 / 20 %) of ``mean_loss``,
the out-of-fold loss ``oof_loss``, the second pass when the run has one, and the rank means of ``oof_loss`` with
each. ``--clean`` adds the cross-fitted second pass: ``--folds`` more models, model k trained without fold k and
without the run's top 10 % suspects by ``mean_loss`` (the second pass's left-out set), so that every image, suspect
or not, is scored by a model that saw neither it nor the suspects (cached as ``cv_probs_clean_<folds>x<epochs>.npy``).
``--kfac`` adds the self-influence of whole-network K-FAC at the final model (the explorer's method, at its
defaults, through the pipeline and its cache). Prints a table with the mean over runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from run import out_of_fold_probs
from scipy.stats import rankdata

from influence_core import Run
from influence_core.analysis import cross_entropy, detection_metrics
from influence_core.influence import KFAC, Scope
from influence_core.pipeline import InfluenceSettings, compute_influence, load_influence
from influence_core.second_pass import DEFAULT_SHARE, load_second_pass, suspects
from influence_core.training import TrainConfig

METRICS = ("auroc", "recall_at_10pct", "recall_at_20pct")


def signals(run: Run, folds: int, epochs: int, clean: bool = False, kfac: bool = False) -> dict[str, np.ndarray]:
    """Every signal of one run (higher = more suspect), computing its out-of-fold probabilities if missing."""
    cache = run.path / f"cv_probs_{folds}x{epochs}.npy"
    if not cache.is_file():
        np.save(cache, out_of_fold_probs(run, TrainConfig.from_run(run), folds, epochs))
    y = run.labels("train")
    out = {"mean_loss": run.dynamics["loss"].mean(0).astype(np.float64)}
    second = load_second_pass(run)
    if second is not None:
        out["second_pass"] = second.loss.astype(np.float64)
    add_with_rank_means(out, "oof_loss", cross_entropy(np.load(cache), y).astype(np.float64))
    if kfac:  # the explorer's whole-network method, as the app computes it (cached in the run's influence cache)
        settings = InfluenceSettings(method=KFAC(), scope=Scope.ALL, checkpoints=False)
        result = load_influence(run, settings) or compute_influence(run, settings)
        add_with_rank_means(out, "whole-network K-FAC self-influence", result.self_influence.astype(np.float64))
    if clean:  # cross-fitted second pass: every fold scored by a model trained without it and the suspects
        cache = run.path / f"cv_probs_clean_{folds}x{epochs}.npy"
        if not cache.is_file():
            left_out = suspects(run, DEFAULT_SHARE)
            np.save(cache, out_of_fold_probs(run, TrainConfig.from_run(run), folds, epochs, exclude=left_out))
        add_with_rank_means(out, "cross-fitted second pass", cross_entropy(np.load(cache), y).astype(np.float64))
    return out


def add_with_rank_means(out: dict[str, np.ndarray], name: str, values: np.ndarray) -> None:
    """``out[name] = values``, plus its rank mean with ``mean_loss`` and ``second_pass`` where ``out`` has them."""
    for other in ("mean_loss", "second_pass"):
        if other in out:
            out[f"rank mean of {other} and {name}"] = rankdata(out[other]) + rankdata(values)
    out[name] = values


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--kfac", action="store_true", help="also whole-network K-FAC self-influence (the app's default)")
    p.add_argument(
        "--clean", action="store_true", help="also the cross-fitted second pass (folds trained without the suspects)"
    )
    args = p.parse_args(argv)
    rows: dict[str, list[dict]] = {}
    for path in args.runs:
        run = Run(path)
        for name, values in signals(run, args.folds, args.epochs, args.clean, args.kfac).items():
            metrics = detection_metrics(values, run.flipped())
            rows.setdefault(name, []).append(metrics)
            print(f"{path.name}: {name}: " + " / ".join(f"{metrics[m]:.3f}" for m in METRICS), flush=True)
    print("\nmean over runs (AUROC / recall at 10 % / 20 %):")
    for name, found in rows.items():
        if len(found) == len(args.runs):
            print(f"  {name}: " + " / ".join(f"{np.mean([r[m] for r in found]):.3f}" for m in METRICS))


if __name__ == "__main__":
    main()
