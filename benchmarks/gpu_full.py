"""All of tiny-imagenet on one GPU: train, head influence 10,000 × 100,000, whole-network EK-FAC influence.

    python benchmarks/gpu_full.py --data ../shared/data/tiny-imagenet-200 [--epochs 1] [--whole-tests 1000]

UNMEASURED: written without a GPU; the expected times below come from CPU measurements and the H200 engine
timings in the README. Steps, each timed with its peak GPU memory, written to ``OUT/gpu_full.json`` as they finish:

1. ``train``: ResNet18 from scratch on the official split (100,000 train / 10,000 val images, 200 classes, 64 px),
   ``--epochs`` epochs. Expected ~10 s/epoch on an H200 (CPU: 5.5 s per epoch of 880 images on 2 idle cores,
   i.e. ~625 s per 100,000; a GPU is ~60–100× faster on ResNet18 at 64 px).
2. ``head``: the default influence (direct, head scope) for the whole 10,000 × 100,000 matrix through the
   pipeline (zarr store, summaries, histograms: 4 GB on disk). Expected < 1 min (two backbone passes over 110,000
   images; the matrix product is 2e14 flop).
3. ``amp``: whole-network EK-FAC scores of 32 test points on the first 4,096 training points in float32 and under
   ``torch.autocast(bfloat16)``; their relative difference decides whether step 4 uses AMP (``--amp-tolerance``,
   default 1e-2: influence amplifies small errors, so it is measured here, not assumed).
4. ``whole``: whole-network EK-FAC for ``--whole-tests`` test points × 100,000, in groups of test points whose
   float32 factors fit the GPU (45 MB each), written into a zarr matrix. Expected ~1.5 min per 1,000 test points
   (per-sample eigenbasis gradients of 100,000 images, 0.65 ms each per group on the H200 measurement, plus
   2.2e15 flop of products), so ~15–20 min for all 10,000: pass ``--whole-tests 10000`` only on a longer loan.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_core import results  # noqa: E402
from influence_core.influence import EKFAC, InfluenceModel  # noqa: E402
from influence_core.paths import InfluencePaths  # noqa: E402
from influence_core.pipeline import InfluenceSettings, compute_influence  # noqa: E402
from influence_core.training import TrainConfig, train  # noqa: E402

GROUP_BYTES = 40 * 2**30  # float32 test factors held on the GPU at once


def stage(report: dict, out: Path, name: str, step):
    """Run ``step()``, record its seconds and peak GPU memory under ``report[name]``, save the report."""
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    value = step()
    report[name] = {"seconds": time.perf_counter() - t, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
    (out / "gpu_full.json").write_text(json.dumps(report, indent=2))
    print(name, json.dumps(report[name]), flush=True)
    return value


def amp_error(run, tests: int = 32) -> float:
    """Relative difference of whole-network EK-FAC scores under bf16 autocast against float32 (first block)."""
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    b = min(results.COLUMN_BLOCK, len(y_train))
    im = InfluenceModel(run.load_model(), method=EKFAC(), scope="all", device="cuda").fit(x_train[:b], y_train[:b])
    factors = im.test_factors(x_test[:tests], y_test[:tests])
    exact = im.influences_from_factors(factors, x_train[:b], y_train[:b])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = im.influences_from_factors(factors, x_train[:b], y_train[:b])
    return float(np.abs(mixed - exact).max() / np.abs(exact).max())


def whole_network(run, n_tests: int, out: Path, amp: bool) -> dict:
    """Whole-network EK-FAC influences of the first ``n_tests`` test points on every training point."""
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    im = InfluenceModel(run.load_model(), method=EKFAC(), scope="all", device="cuda")
    t = time.perf_counter()
    im.fit(x_train, y_train)
    fit_s = time.perf_counter() - t
    group = max(1, GROUP_BYTES // (4 * sum(p.numel() for p in im.params_.values())))
    paths = InfluencePaths(out / "whole")
    paths.root.mkdir(parents=True, exist_ok=True)
    matrix = results.create_matrix(paths, n_tests, len(y_train))
    for g in range(0, n_tests, group):
        rows = slice(g, min(g + group, n_tests))
        factors = im.test_factors(x_test[rows], y_test[rows])
        for a, b in results.column_blocks(len(y_train)):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                matrix[rows, a:b] = im.influences_from_factors(factors, x_train[a:b], y_train[a:b])
        print(f"whole network: test points {rows.start}-{rows.stop} done", flush=True)
    return {"fit_s": fit_s, "tests_per_group": group, "amp": amp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tiny-imagenet-200")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--whole-tests", type=int, default=1000)
    p.add_argument("--amp-tolerance", type=float, default=1e-2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_full")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_full.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(), "epochs": args.epochs, "whole_tests": args.whole_tests}
    config = TrainConfig(
        dataset=f"tiny-imagenet:{args.data}",
        split="official",
        image_size=64,
        epochs=args.epochs,
        n_checkpoints=0,
        batch_size=256,
    )
    run = stage(report, args.out, "train", lambda: train(config, args.out / "run", device="cuda"))
    report["train"]["epoch_seconds"] = [h["seconds"] for h in run.history]
    stage(report, args.out, "head", lambda: compute_influence(run, InfluenceSettings(checkpoints=False), "cuda"))
    error = stage(report, args.out, "amp", lambda: amp_error(run))
    report["amp"]["relative_error"] = error
    detail = stage(
        report, args.out, "whole", lambda: whole_network(run, args.whole_tests, args.out, error <= args.amp_tolerance)
    )
    report["whole"] |= detail
    (args.out / "gpu_full.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
