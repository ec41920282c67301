"""A full-size dataset on one GPU: train, head influence for every test × train pair, whole-network influence.

    python benchmarks/gpu_full.py --dataset tiny-imagenet:../shared/data/tiny-imagenet-200 [--epochs 1]
    python benchmarks/gpu_full.py --dataset fashion-mnist:/usr/share/datasets/fashion-mnist --whole-tests 1000

Defaults to all of tiny-imagenet (100,000 train / 10,000 val images, 200 classes, 64 px; ``--split official``);
any dataset spec of ``influence_core.data`` works (Fashion-MNIST's official split is 60,000 / 10,000). Steps, each
timed with its peak GPU memory, written to ``OUT/gpu_full.json`` as they finish:

1. ``train``: ResNet18 from scratch on the official split, ``--epochs`` epochs (image cache built first).
2. ``head``: the default influence (direct, head scope) for the whole test × train matrix through the pipeline
   (zarr store, summaries, histograms).
3. ``amp``: whole-network scores (``--method``, default the product's whole-network method K-FAC) of 32 test
   points on the first 4,096 training points in float32 and under ``torch.autocast(bfloat16)``; their relative
   difference decides whether step 4 uses AMP (``--amp-tolerance``, default 1e-2: influence amplifies small
   errors, so it is measured here, not assumed).
4. ``whole``: whole-network influence of ``--whole-tests`` test points × every training point, in groups of test
   points whose float32 factors fit the GPU, written into a zarr matrix, and the self-influence of every
   training point.

Measured results (H200) are in the README, "Large data".
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
from influence_core.influence import InfluenceModel, Method  # noqa: E402
from influence_core.paths import InfluencePaths  # noqa: E402
from influence_core.pipeline import InfluenceSettings, compute_influence  # noqa: E402
from influence_core.training import TrainConfig, train  # noqa: E402

GROUP_BYTES = 40 * 2**30  # float32 test factors held on the GPU at once


def stage(report: dict, out: Path, name: str, step):
    """Run ``step()``, record its seconds and peak GPU memory (on CUDA) under ``report[name]``, save the report."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    value = step()
    report[name] = {"seconds": time.perf_counter() - t}
    if cuda:
        report[name]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (out / "gpu_full.json").write_text(json.dumps(report, indent=2))
    print(name, json.dumps(report[name]), flush=True)
    return value


def amp_error(run, method: str, device: str, tests: int = 32) -> float:
    """Relative difference of whole-network scores under bf16 autocast against float32 (first block)."""
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    b = min(results.COLUMN_BLOCK, len(y_train))
    im = InfluenceModel(run.load_model(), method=Method.named(method), scope="all", device=device)
    im.fit(x_train[:b], y_train[:b])
    factors = im.test_factors(x_test[:tests], y_test[:tests])
    exact = im.influences_from_factors(factors, x_train[:b], y_train[:b])
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = im.influences_from_factors(factors, x_train[:b], y_train[:b])
    return float(np.abs(mixed - exact).max() / np.abs(exact).max())


def whole_network(run, method: str, device: str, n_tests: int, out: Path, amp: bool) -> dict:
    """Whole-network influences of the first ``n_tests`` test points on every training point, and every training
    point's self-influence."""
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    im = InfluenceModel(run.load_model(), method=Method.named(method), scope="all", device=device)
    t = time.perf_counter()
    im.fit(x_train, y_train)
    fit_s = time.perf_counter() - t
    group = max(1, GROUP_BYTES // (4 * sum(p.numel() for p in im.params_.values())))
    paths = InfluencePaths(out / "whole")
    paths.root.mkdir(parents=True, exist_ok=True)
    matrix = results.create_matrix(paths, n_tests, len(y_train))
    t = time.perf_counter()
    for g in range(0, n_tests, group):
        rows = slice(g, min(g + group, n_tests))
        factors = im.test_factors(x_test[rows], y_test[rows])
        for a, b in results.column_blocks(len(y_train)):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                matrix[rows, a:b] = im.influences_from_factors(factors, x_train[a:b], y_train[a:b])
        print(f"whole network: test points {rows.start}-{rows.stop} done", flush=True)
    matrix_s = time.perf_counter() - t
    t = time.perf_counter()
    self_influence = np.concatenate(
        [im.self_influence(x_train[a:b], y_train[a:b]) for a, b in results.column_blocks(len(y_train))]
    )
    return {
        "fit_s": fit_s,
        "matrix_s": matrix_s,
        "self_influence_s": time.perf_counter() - t,
        "self_influence_finite": bool(np.isfinite(self_influence).all()),
        "tests_per_group": group,
        "amp": amp,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tiny-imagenet:" + str(ROOT.parent / "shared" / "data" / "tiny-imagenet-200"))
    p.add_argument("--split", default="official")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--method", default="kfac", help="whole-network method (default: the product's, K-FAC)")
    p.add_argument("--whole-tests", type=int, default=1000)
    p.add_argument("--amp-tolerance", type=float, default=1e-2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_full")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run on a small --downsample")
    p.add_argument("--downsample", type=float, default=1.0, help="keep this fraction of each class (dry runs)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_full.py needs a CUDA GPU (or --device cpu for a dry run)")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "method": args.method,
        "whole_tests": args.whole_tests,
    }
    config = TrainConfig(
        dataset=args.dataset,
        split=args.split,
        downsample=args.downsample,
        epochs=args.epochs,
        n_checkpoints=0,
        batch_size=256,
    )
    run = stage(report, args.out, "train", lambda: train(config, args.out / "run", device=args.device))
    report["train"]["epoch_seconds"] = [h["seconds"] for h in run.history]
    report["train"]["n_train"], report["train"]["n_test"] = len(run.labels("train")), len(run.labels("test"))
    report["train"]["test_accuracy"] = float((run.predictions["probs_test"].argmax(1) == run.labels("test")).mean())
    stage(report, args.out, "head", lambda: compute_influence(run, InfluenceSettings(checkpoints=False), args.device))
    error = stage(report, args.out, "amp", lambda: amp_error(run, args.method, args.device))
    report["amp"]["relative_error"] = error
    detail = stage(
        report,
        args.out,
        "whole",
        lambda: whole_network(run, args.method, args.device, args.whole_tests, args.out, error <= args.amp_tolerance),
    )
    report["whole"] |= detail
    (args.out / "gpu_full.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
