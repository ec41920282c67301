"""LDS of whole-network K-FAC (the product's defaults) at every kept checkpoint of an LDS workload's full-data run,
and of ensembles of them (the mean of the per-checkpoint matrices, each scaled to unit standard deviation).

    PYTHONPATH=. python benchmarks/lds_checkpoint_ensemble.py benchmarks/out/lds/<workload>

Matrices are cached in ``<workload>/checkpoint_matrices/``; prints one line per matrix or ensemble with its LDS
and its paired difference from the final model's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from lds import Measurements

from influence_core import Run
from influence_core.evaluation import lds, paired_difference
from influence_core.influence import InfluenceModel, Method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", type=Path)
    root = p.parse_args().workload
    run = Run(root / "run")
    cache = root / "checkpoint_matrices"
    cache.mkdir(exist_ok=True)
    (x, y), (xt, yt) = run.tensors("train"), run.tensors("test")
    matrices = {}
    for checkpoint in run.checkpoint_paths():  # kept checkpoints in training order, then the final model
        path = cache / f"{checkpoint.stem}.npy"
        if not path.exists():
            t = time.perf_counter()
            im = InfluenceModel(run.load_model(checkpoint), method=Method.named("kfac"), scope="all").fit(x[:], y)
            np.save(path, im.influences_from_factors(im.test_factors(xt[:], yt)))
            print(f"{checkpoint.stem}: computed in {time.perf_counter() - t:.1f} s", flush=True)
        matrices[checkpoint.stem] = np.load(path)
    measurements = Measurements.collect(root, run.labels("test"))

    def scored(name: str, matrix: np.ndarray, reference: list[float] | None) -> list[float]:
        r = lds(matrix, measurements.masks, measurements.margins[:, : len(matrix)])
        paired = paired_difference(r["per_test"], reference) if reference is not None else None
        vs = f"  paired vs final {paired['mean']:+.4f} ± {paired['se']:.4f}" if paired else ""
        print(f"{name}: LDS {r['lds']:.4f} ± {r['se']:.4f}{vs}")
        return r["per_test"]

    final = scored("final", matrices["final"], None)
    for name, matrix in matrices.items():
        if name != "final":
            scored(name, matrix, final)
    newest_first = ["final", *reversed([k for k in matrices if k != "final"])]
    for k in range(2, len(newest_first) + 1):
        names = newest_first[:k]
        ensemble = sum(matrices[n] / matrices[n].std() for n in names) / k
        scored(" + ".join(names), ensemble, final)


if __name__ == "__main__":
    main()
