"""Every method of the engine on CUDA against the same computation on the CPU, on one trained run.

    python benchmarks/device_agreement.py --run RUN_DIR [--tests 32] [--train 512] [--out FILE.json]

For each method on the head and K-FAC / EK-FAC on the whole network (each at its scope's default damping and
default options, as the app uses them): fit on the first ``--train`` training points, score the first
``--tests`` test points against them and take their self-influence, once on the CPU and once on CUDA. Reports
per job the relative Frobenius difference of the matrices and of the self-influences (CUDA against CPU), the
Pearson r of the matrices, and the seconds on each device; for methods with a fitted state also
``scoring_*_rel_diff``: CUDA scoring with the curvature fitted on the CPU (loaded with ``load_state_dict``), which
leaves out the eigendecompositions (LAPACK and cuSOLVER may pick different eigenvectors where eigenvalues are
close, and a projected basis then keeps a slightly different subspace). Both devices compute in float32 (TF32 is
off in the engine), so the differences are rounding and the order of sums, amplified where the curvature is
ill-conditioned. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from influence_core import Run
from influence_core.influence import InfluenceModel, Method, Scope

JOBS = (
    ("direct", Scope.HEAD),
    ("cg", Scope.HEAD),
    ("arnoldi", Scope.HEAD),
    ("lissa", Scope.HEAD),
    ("kfac", Scope.HEAD),
    ("ekfac", Scope.HEAD),
    ("kfac", Scope.ALL),
    ("ekfac", Scope.ALL),
)
"""(method, scope) pairs compared; every method of :data:`influence_core.influence.METHODS` on the head, the
Kronecker methods on the whole network (the only ones that fit it)."""


def scores(run: Run, method: str, scope: Scope, device: str, n_test: int, n_train: int, state=None) -> dict:
    """Matrix ``(n_test, n_train)``, self-influence ``(n_train,)``, fitted ``state`` (``state_dict``, on the CPU)
    and seconds of one job on one device; with ``state`` given, that curvature is loaded instead of fitted."""
    (x, y), (xt, yt) = run.tensors("train"), run.tensors("test")
    x, y, xt, yt = x[:n_train], y[:n_train], xt[:n_test], yt[:n_test]
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    im = InfluenceModel(run.load_model(), method=Method.named(method), scope=scope, device=device)
    if state:
        im.load_state_dict(state)
    else:
        im.fit(x, y)
    matrix = im.influences(xt, yt, x, y)
    self_influence = im.self_influence(x, y)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {
        "matrix": matrix,
        "self": self_influence,
        "state": {k: v.cpu() for k, v in im.state_dict().items()},
        "seconds": seconds,
    }


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--tests", type=int, default=32)
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_agreement.py compares CUDA with the CPU: it needs a CUDA GPU")
    run = Run(args.run)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "jobs": {}}
    for method, scope in JOBS:
        cpu = scores(run, method, scope, "cpu", args.tests, args.train)
        gpu = scores(run, method, scope, "cuda", args.tests, args.train)
        row = {
            "matrix_rel_diff": relative(gpu["matrix"], cpu["matrix"]),
            "self_rel_diff": relative(gpu["self"], cpu["self"]),
            "matrix_pearson": float(np.corrcoef(gpu["matrix"].ravel(), cpu["matrix"].ravel())[0, 1]),
            "cpu_s": round(cpu["seconds"], 2),
            "cuda_s": round(gpu["seconds"], 2),
        }
        if cpu["state"]:
            loaded = scores(run, method, scope, "cuda", args.tests, args.train, state=cpu["state"])
            row["scoring_matrix_rel_diff"] = relative(loaded["matrix"], cpu["matrix"])
            row["scoring_self_rel_diff"] = relative(loaded["self"], cpu["self"])
        report["jobs"][f"{method}_{scope}"] = row
        print(f"{method}_{scope}", json.dumps(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
