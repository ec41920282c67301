"""Variants of the second pass (``influence_core.second_pass``) scored on runs with flipped labels.

    PYTHONPATH=. .venv/bin/python benchmarks/second_pass_variants.py RUN_DIR [RUN_DIR ...] [--shares 0.1 0.2]
        [--out FILE.json]

For each run and share, one leave-group-out retraining without the top ``share`` suspects by ``mean_loss``
(``training.retrain_without``, the product's second pass), then detection metrics (AUROC, recall at 10 / 20 %)
of these signals over every training label:

* ``mean_loss``: the first pass (the run's own mean training loss over epochs);
* ``final_loss``: the retrained model's cross-entropy on every training label (the product's second pass);
* ``mixed``: ``final_loss`` for the images left out (scored out of sample) and the retraining's mean loss over
  epochs for the others (which it trained on, so their final loss is memorised);
* ``mean_retrain_loss``: the retraining's mean loss over epochs for kept images, ``final_loss`` for the left-out
  ones ranked above every kept image (the suspects stay on top, re-ordered out of sample).

Writes ``--out`` (default ``benchmarks/out/second_pass_variants.json``) and prints a table with the mean over runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from influence_core import Run
from influence_core.analysis import detection_metrics
from influence_core.second_pass import label_losses, suspects
from influence_core.training import retrain_without

BENCH = Path(__file__).resolve().parent
METRICS = ("auroc", "recall_at_10pct", "recall_at_20pct")


def variants(run: Run, share: float) -> dict[str, np.ndarray]:
    """Every signal of one retraining without the top ``share`` by ``mean_loss`` (higher = more suspect)."""
    left_out = suspects(run, share)
    model, dynamics = retrain_without(run, left_out, device="cpu")
    final = label_losses(model, *run.tensors("train")).astype(np.float64)
    retrain_mean = dynamics["loss"].mean(0).astype(np.float64)
    return {
        "final_loss": final,
        "mixed": np.where(left_out, final, retrain_mean),
        "mean_retrain_loss": np.where(left_out, final + retrain_mean.max() + 1.0, retrain_mean),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--shares", nargs="+", type=float, default=[0.1, 0.2])
    p.add_argument("--out", type=Path, default=BENCH / "out" / "second_pass_variants.json")
    args = p.parse_args(argv)
    results: dict[str, dict[str, dict]] = {}
    for path in args.runs:
        run = Run(path)
        flipped = run.flipped()
        rows = {"mean_loss": detection_metrics(run.dynamics["loss"].mean(0).astype(np.float64), flipped)}
        for share in args.shares:
            for name, score in variants(run, share).items():
                rows[f"{name} (share {share:g})"] = detection_metrics(score, flipped)
        results[path.name] = rows
        print(f"{path.name}: " + "; ".join(f"{k} {v['auroc']:.3f}" for k, v in rows.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print("| signal | " + " | ".join(f"{name}" for name in results) + " | mean AUROC (top 10 / 20 %) |")
    print("| --- " * (len(results) + 2) + "|")
    for signal in next(iter(results.values())):
        cells = [results[name][signal] for name in results]
        mean = {m: np.mean([c[m] for c in cells]) for m in METRICS}
        print(
            f"| {signal} | "
            + " | ".join(f"{c['auroc']:.3f} ({c['recall_at_10pct']:.0%} / {c['recall_at_20pct']:.0%})" for c in cells)
            + f" | {mean['auroc']:.3f} ({mean['recall_at_10pct']:.0%} / {mean['recall_at_20pct']:.0%}) |"
        )


if __name__ == "__main__":
    main()
