"""Two app jobs at once against one after the other: why the app's job registry computes one job at a time.

    .venv/bin/python benchmarks/job_slots.py OUT_DIR [--epochs 2] [--dataset SPEC --classes A B]

Trains the product's recipe (default: goldfish vs lemon from the tiny-imagenet beside the checkout, 64 px) twice
with different seeds, as the app's background jobs do: first both at once in two threads of one process
(``JobRegistry()``, no limit), then queued (``JobRegistry(slots=1)``, as the app). Prints one JSON line: each
job's seconds and the wall time of both, per mode. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from influence_core import TrainConfig, train
from influence_core.jobs import JobRegistry


def both(out: Path, slots: int | None, recipe: TrainConfig) -> dict:
    """Two trainings of ``recipe`` (seeds 1 and 2) submitted together to a registry with ``slots``; their times."""
    registry = JobRegistry(slots=slots)
    t0 = time.perf_counter()
    jobs = []
    for seed in (1, 2):
        config = dataclasses.replace(recipe, seed=seed)
        run_dir = out / f"slots{slots}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        jobs.append(registry.submit(str(run_dir), lambda progress, c=config, d=run_dir: train(c, d, device="cpu"), ""))
    for job in jobs:
        job.wait()
        if job.error is not None:
            raise job.error
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "job_s": [round(job.finished - job.started, 1) for job in jobs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dataset", default="tiny-imagenet:../shared/data/tiny-imagenet-200")
    parser.add_argument("--classes", nargs="+", default=["goldfish", "lemon"])
    args = parser.parse_args()
    recipe = TrainConfig(dataset=args.dataset, classes=args.classes, epochs=args.epochs, n_checkpoints=0)
    result = {"at_once": both(args.out, None, recipe), "one_slot": both(args.out, 1, recipe)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
