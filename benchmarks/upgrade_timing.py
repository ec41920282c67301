"""The explorer's whole-network upgrade on the CPU: its estimated seconds against the pipeline's measured ones.

    .venv/bin/python benchmarks/upgrade_timing.py RUN_DIR
    .venv/bin/python benchmarks/upgrade_timing.py --demo benchmarks/out/demo_run   # trains the app's demo first

Computes (``recompute=True``) what ``upgrade.ranking_upgrade`` would start in the background — the method of best
measured LDS on the whole network (``upgrade.best_whole_network_method``), final checkpoint, on the CPU — and
prints one JSON line: the run's size, ``estimated_s`` (``upgrade.estimated_cpu_seconds``), ``measured_s`` (the
pipeline's own ``timings_s.total``) and its stages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from influence_core import Run, train
from influence_core.influence import Method, Scope
from influence_core.pipeline import InfluenceSettings, compute_influence
from influence_core.upgrade import best_whole_network_method, estimated_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("run_dir", nargs="?", type=Path)
    where.add_argument("--demo", type=Path, metavar="DIR", help="train (or reuse) the app's demo run in DIR")
    args = parser.parse_args()
    if args.demo:
        sys.path.insert(0, str(ROOT / "pages"))
        from ui.runs import DEMO_CONFIG  # the app's own demo recipe

        run = train(DEMO_CONFIG, args.demo)
    else:
        run = Run(args.run_dir)
    best = best_whole_network_method()
    settings = InfluenceSettings(
        method=Method.named(best.method if best else "ekfac"), scope=Scope.ALL, checkpoints=False
    )
    result = compute_influence(run, settings, device="cpu", recompute=True)
    timings = result.meta["timings_s"]
    record = {
        "method": settings.method.name,
        "n_classes": run.n_classes,
        "n_train": len(run.labels("train")),
        "n_test": len(run.labels("test")),
        "image_size": run.config["image_size"],
        "estimated_s": round(estimated_cpu_seconds(run), 1),
        "measured_s": round(timings["total"], 1),
        "stages_s": {k: round(v, 2) for k, v in timings.items() if k != "total"},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
