"""Scale measurements on Fashion-MNIST's official split: train time per epoch, head influence single-process and
on a 2-worker LocalCluster, each with its peak memory, the matrix's size on disk and the forward+backward floor.

    python benchmarks/scale.py [--downsample 1.0] [--image-size 28] [--workers 2] [--out benchmarks/out/scale]

Each step runs as its own ``influence-core`` process under ``/usr/bin/time`` (peak RSS: the largest process of
the step's tree, so for the LocalCluster the client or one worker, whichever is larger). Writes
``OUT/scale.json``. With ``--downsample`` below 1 the numbers are for that fraction of each part; train time and
matrix time are linear in the number of training images (and the matrix also in test images), so the full-size
figures are extrapolated from them and marked as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_core.paths import RunPaths  # noqa: E402
from influence_core.pipeline import DEFAULT_SETTINGS, cache_key, load_influence  # noqa: E402
from influence_core.run import Run  # noqa: E402

FULL_TRAIN, FULL_TEST = 60_000, 10_000


def timed_step(args: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of ``influence-core ARGS`` in a fresh process."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "influence_core.cli", *args]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": int(done.stderr.strip().splitlines()[-1]) / 1024}


def floor_seconds(run: Run, batch_size: int = 64) -> float:
    """One forward+backward pass (eval mode) over the run's train + test images, read lazily in batches."""
    model = run.load_model()
    t = time.perf_counter()
    for split in ("train", "test"):
        x, y = run.tensors(split)
        for a in range(0, len(x), batch_size):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[a : a + batch_size]), y[a : a + batch_size]).backward()
    return time.perf_counter() - t


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist:")
    p.add_argument("--downsample", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "scale")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    report: dict = {
        "dataset": args.dataset,
        "downsample": args.downsample,
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
    }
    report["train"] = timed_step(
        [
            "train",
            "--dataset",
            args.dataset,
            "--split",
            "official",
            "--downsample",
            str(args.downsample),
            "--image-size",
            str(args.image_size),
            "--epochs",
            "1",
            "--checkpoints",
            "0",
            "--run-dir",
            str(run_dir),
        ]
    )
    run = Run(run_dir)
    n_train, n_test = len(run.ids("train")), len(run.ids("test"))
    report |= {"n_train": n_train, "n_test": n_test, "epoch_seconds": run.history[0]["seconds"]}
    report["floor_forward_backward_s"] = floor_seconds(run)
    entry = RunPaths(run_dir).influence_entry(cache_key(run, DEFAULT_SETTINGS))
    report["influence"] = timed_step(["influence", "--run-dir", str(run_dir), "--recompute"])
    single = load_influence(run, DEFAULT_SETTINGS)
    report["influence"] |= {"timings_s": single.meta["timings_s"], "disk_bytes": disk_bytes(entry.root)}
    kept = [single.row(t) for t in range(0, n_test, max(1, n_test // 20))]
    report["influence_workers"] = timed_step(
        ["influence", "--run-dir", str(run_dir), "--recompute", "--workers", str(args.workers)]
    )
    spread = load_influence(run, DEFAULT_SETTINGS)
    report["influence_workers"]["timings_s"] = spread.meta["timings_s"]
    again = [spread.row(t) for t in range(0, n_test, max(1, n_test // 20))]
    scale = max(float(np.abs(np.stack(kept)).max()), 1e-30)
    report["workers_vs_single_max_rel_diff"] = float(np.abs(np.stack(again) - np.stack(kept)).max() / scale)
    for step in ("influence", "influence_workers"):
        report[step]["x_floor"] = report[step]["seconds"] / report["floor_forward_backward_s"]
    if args.downsample < 1:
        grow_train, grow_both = FULL_TRAIN / n_train, FULL_TRAIN * FULL_TEST / (n_train * n_test)
        report["extrapolated_full"] = {
            "epoch_seconds": report["epoch_seconds"] * grow_train,
            "matrix_seconds": report["influence"]["timings_s"]["test_x_train_matrix_and_self_influence"] * grow_both,
            "matrix_disk_bytes": 4 * FULL_TRAIN * FULL_TEST,
        }
    (args.out / "scale.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
