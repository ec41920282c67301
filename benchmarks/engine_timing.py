"""Time the engine's stages (fit, test factors, influence matrix, self-influence) on one device.

    python benchmarks/engine_timing.py [--run RUN_DIR | --synthetic 880 110] [--method ekfac] [--scope all]
                                       [--device auto|cpu|cuda] [--check 32] [--option rank=none ...]

``--synthetic N M`` uses an untrained ResNet18 (2 classes) on N training / M test random 64 px images, so the
timing needs no data (e.g. on a GPU machine); ``--run`` uses a trained run's final checkpoint and split.
``--check K`` also recomputes the first K × K corner of the matrix and K self-influences through per-sample
gradients + ``solve`` in parameter space and prints the relative difference (for methods scored in an
eigenbasis, K-FAC/EK-FAC, this checks that path on the device). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import torchvision

from influence_core import Run
from influence_core.influence import METHODS, Damping, InfluenceModel, Method, Scope, parse_scope
from influence_core.influence.engine import full_fp32
from influence_core.influence.ops import flatten, per_sample_grads
from influence_core.storage import resolve_device


def data(args) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if args.run:
        run = Run(args.run)
        (x, y), (xt, yt) = run.tensors("train"), run.tensors("test")
        return run.load_model(), x[:], y, xt[:], yt  # whole tensors: this run fits in memory
    n, m = args.synthetic
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    return (
        model,
        torch.randn(n, 3, 64, 64, generator=gen),
        torch.randint(0, 2, (n,), generator=gen),
        torch.randn(m, 3, 64, 64, generator=gen),
        torch.randint(0, 2, (m,), generator=gen),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--synthetic", type=int, nargs=2, default=(880, 110), metavar=("N_TRAIN", "N_TEST"))
    p.add_argument("--method", choices=list(METHODS), default="ekfac")
    p.add_argument("--scope", type=parse_scope, default=Scope.ALL, help="head | all | comma-separated module names")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--regularization", type=Damping.parse, default=None, help="e.g. 1e-3, top:1e-5 (default: the scope's)"
    )
    p.add_argument("--check", type=int, default=0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. rank=none")
    args = p.parse_args()
    device = resolve_device(args.device)
    model, x, y, xt, yt = data(args)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, round(time.perf_counter() - t, 3)

    im = InfluenceModel(
        model,
        method=Method.parse(args.method, args.option),
        scope=args.scope,
        device=device,
        damping=args.regularization,
    )
    _, fit_s = timed(lambda: im.fit(x, y))
    factors, factors_s = timed(lambda: im.test_factors(xt, yt))
    matrix, matrix_s = timed(lambda: im.influences_from_factors(factors))
    self_inf, self_s = timed(lambda: im.self_influence())
    record = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "method": args.method,
        "scope": str(args.scope),
        "n_train": len(x),
        "n_test": len(xt),
        "fit_s": fit_s,
        "test_factors_s": factors_s,
        "influences_s": matrix_s,
        "self_influence_s": self_s,
        "options": Method.parse(args.method, args.option).options(),
        "regularization": str(im.damping),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if device.type == "cuda":
        record["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if args.check:  # per-sample gradients + solve in parameter space, on the images themselves (not head scope)
        k = args.check
        with full_fp32():  # as the engine: no TF32 (on by default for cuDNN convolutions)
            grads = [
                per_sample_grads(im.block_model_, im.params_, a.to(device), b.to(device))
                for a, b in ((xt[:k], yt[:k]), (x[:k], y[:k]))
            ]
            solved = [flatten(im.inverse_.solve(g, im.damping)) for g in grads]
        ref = (solved[0] @ flatten(grads[1]).T).cpu().numpy()
        ref_self = (solved[1] * flatten(grads[1])).sum(1).cpu().numpy()
        record["check_rel_err_matrix"] = float(np.linalg.norm(matrix[:k, :k] - ref) / np.linalg.norm(ref))
        record["check_rel_err_self"] = float(np.linalg.norm(self_inf[:k] - ref_self) / np.linalg.norm(ref_self))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
