"""The peers' influence matrices on an LDS workload, every stage run to completion (no time cap), for ``lds.py score``.

    .venv/bin/python benchmarks/lds_peers.py benchmarks/out/lds/<workload> [--jobs kronfluence_ekfac_all,...]

Exports the workload's full-data run (final model, train/test split, flips) as a peer workload
(``<workload>/peer_workload``, see ``workload.py``), builds the peers' virtual environments if needed
(``peers.py``), runs each job's runner there without a time cap (``<workload>/peers/<job>/result.json``: stage
times, peak memory; a finished one is reused) and copies its ``influence.npy`` to ``<workload>/matrices/<job>.npy``, where
``lds.py score`` scores it like ours. Jobs with a matrix already there are skipped. Jobs: ``PEER_JOBS`` below
(pyDVL's ``cg`` and Kronfluence's whole-network EK-FAC take tens of minutes each on 2 CPU cores; pyDVL on the whole
network cannot finish: its CG needs hours per test point, see the README). Damping as in ``run.py``: the head jobs
get the λ our exact head resolves at its default damping on this run (``--head-regularization`` overrides it),
the whole-network jobs λ = 1e-3 (``--all-regularization``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
from workload import Settings, save_workload  # noqa: E402

from influence_core import Run  # noqa: E402
from influence_core.influence import InfluenceModel  # noqa: E402
from influence_core.storage import atomic_write_json  # noqa: E402

PEER_JOBS = {
    "kronfluence_ekfac_all": ("kronfluence", "ekfac", "all"),
    "kronfluence_identity_all": ("kronfluence", "identity", "all"),
    "kronfluence_ekfac_head": ("kronfluence", "ekfac", "head"),
    "kronfluence_identity_head": ("kronfluence", "identity", "head"),
    "pydvl_direct_head": ("pydvl", "direct", "head"),
    "pydvl_cg_head": ("pydvl", "cg", "head"),
    "trak_head": ("trak", "trak", "head"),
    "trak_all": ("trak", "trak", "all"),
}
"""Job name (as in ``benchmarks/run.py``) → (peer, method, scope)."""
UNCAPPED = 1e9
"""``--time-cap`` given to the runners: every stage runs to completion."""


def export_workload(root: Path) -> Path:
    """``root/peer_workload``: the full-data run of the LDS workload in the peers' format (written once)."""
    out = root / "peer_workload"
    if (out / "settings.json").is_file():
        return out
    run = Run(root / "run")
    (x, y), (xt, yt) = run.tensors("train"), run.tensors("test")
    tensors = {"x_train": x[:], "y_train": y, "x_test": xt[:], "y_test": yt}
    tensors["is_corrupted"] = torch.from_numpy(run.flipped().copy())
    settings = Settings(num_classes=run.n_classes, regularization=1e-3, time_cap_s=UNCAPPED, batch_size=64)
    return save_workload(out, run.load_model(), tensors, settings)


def head_lambda(root: Path) -> float:
    """The absolute λ that ``ours_direct_head`` resolves at the head's default damping on the workload's run."""
    run = Run(root / "run")
    x, y = run.tensors("train")
    im = InfluenceModel(run.load_model(), scope="head", device="cpu").fit(x[:], y)
    return float(next(iter(im.block_damping().values())))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload_dir", type=Path)
    p.add_argument("--jobs", default=",".join(PEER_JOBS), help="comma-separated job names (default: every job)")
    p.add_argument("--head-regularization", type=float, default=None, help="λ of the head jobs (default: ours)")
    p.add_argument("--all-regularization", type=float, default=1e-3, help="λ of the whole-network jobs")
    a = p.parse_args(argv)
    workload = export_workload(a.workload_dir)
    lambdas = {"all": a.all_regularization}
    matrices = a.workload_dir / "matrices"
    for job in filter(None, a.jobs.split(",")):
        if (matrices / f"{job}.npy").is_file():
            print(f"[lds-peers] {job}: cached", flush=True)
            continue
        peer, method, scope = PEER_JOBS[job]
        out = a.workload_dir / "peers" / job
        t = time.perf_counter()
        if not ((out / "result.json").is_file() and (out / "influence.npy").is_file()):  # else: reuse that run
            if scope == "head" and "head" not in lambdas:
                lambdas["head"] = a.head_regularization or head_lambda(a.workload_dir)
            args = ["--method", method, "--scope", scope, "--time-cap", str(UNCAPPED)]
            args += ["--regularization", str(lambdas[scope])]
            peers.run_peer(peer, workload, out, args)
        result = json.loads((out / "result.json").read_text())
        seconds = time.perf_counter() - t
        shutil.copyfile(out / "influence.npy", matrices / f"{job}.npy")
        matrix_s = (result.get("matrix") or {}).get("seconds_full")
        atomic_write_json(
            matrices / f"{job}.json",
            {
                "job": job,
                "matrix_seconds": matrix_s,
                "regularization": result.get("regularization"),
                "result": str(out.relative_to(a.workload_dir)),
            },
        )
        print(f"[lds-peers] {job}: {seconds:.0f} s in all, {matrix_s} s to the full matrix", flush=True)


if __name__ == "__main__":
    main()
