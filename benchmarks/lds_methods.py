"""Influence matrices of every method of ours on the LDS workload's full-data run, for ``lds.py score``.

    PYTHONPATH=. .venv/bin/python benchmarks/lds_methods.py WORKLOAD_DIR [--jobs a,b,...] [--threads 1]

Each job writes ``WORKLOAD_DIR/matrices/<job>.npy`` ((n_test, n_train) float32, positive = helpful) and
``<job>.json`` (seconds, settings) atomically, and is skipped when its matrix exists (resumable). Jobs: every
influence-function method on the head (exact curvature; ``direct`` with a damping scan), EK-FAC/K-FAC on the whole
network with a damping scan, full rank, a fit-size scan (``ours_ekfac_all_fit<k>``), a rank scan
(``ours_ekfac_all_rank<k>``), fit size and rank together (``ours_kfac_all_fit512_rank1024``) and a scan of fitted positions (``ours_kfac_all_pos<k>``), each at its scope's default
damping unless its name says otherwise (``_top1e-06``, ``_lambda0.1``, ``_rel0.1``), and the trajectory methods of
``trajectory.py`` (TracInCP and SOURCE on the whole network and the head; ``grad_dot_all`` =
TracInCP on the final checkpoint alone, a plain gradient dot product).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lds import materialised
from trajectory import TrajectoryInfluence, run_segments

from influence_core import Run
from influence_core.errors import InfluenceLensError
from influence_core.influence import Damping, Scope, default_damping
from influence_core.storage import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

LAMBDAS_HEAD = (
    default_damping(Scope.HEAD),
    *(Damping.relative_to_top(v) for v in (1e-4, 1e-2)),
    *(Damping.absolute(v) for v in (1e-3, 1e-2, 1e-1)),
)
"""Damping scanned for the exact head (``ours_direct_head``): relative to the head's largest eigenvalue around the
default, and absolute (one fit, one solve per value)."""
LAMBDAS_ALL = (
    default_damping(Scope.ALL),
    *(Damping.relative_to_top(v) for v in (1e-6, 3e-6, 3e-5, 1e-4, 1e-3)),
    *(Damping.absolute(v) for v in (1e-3, 1e-1)),
    Damping.relative(0.1),
)
"""Damping scanned for EK-FAC and K-FAC on the whole network: relative to each layer's largest eigenvalue (the
default's kind), absolute, and relative to each layer's mean eigenvalue (Kronfluence's heuristic); one fit, one
test-factor solve per value."""
ALL_OPTIONS = {"dtype": "float32"}
"""Whole-network K-FAC/EK-FAC factors in float32 (what the engine's ``dtype="auto"`` picks for blocks above 1M
parameters, fixed here for every block)."""
FULL_RANK_OPTIONS = {**ALL_OPTIONS, "rank": None, "fit_examples": None, "fit_positions": None}
"""Every eigenvector of every factor kept, fitted on every position of every training example (the full
estimator; the default projects factors larger than 512 to their 512 leading ones and fits on 32 positions of 256
examples)."""
FIT_EXAMPLES_SCAN = (128, 256, 512, None)
"""``fit_examples`` scanned for whole-network EK-FAC and K-FAC at the default rank (``ours_ekfac_all_fit<k>``,
``…_fitall``, ``ours_kfac_all_fit<k>``)."""
RANK_SCAN = (128, 256, None)
"""``rank`` scanned for whole-network EK-FAC and K-FAC at the default fit and damping (``ours_kfac_all_rank<k>``,
``…_rankfull``: every eigenvector kept):
every Kronecker factor of more than ``rank`` dimensions is projected to its ``rank`` leading eigenvectors (the
default, 512, projects the inputs of every 3×3 conv and of fc on a ResNet18; 256 also layer4's output gradients,
128 also layer3's and the inputs of conv1 and layer4's downsampling)."""
FIT_AND_RANK_SCAN = ((512, 768), (512, 1024), (512, None), (None, 1024), (None, None))
"""``(fit_examples, rank)`` pairs scanned together for whole-network K-FAC (``ours_kfac_all_fit512_rank1024``,
``…_fitall_rankfull``; 32 positions): more eigenvectors pay only when the factors are fitted on more examples."""
FIT_POSITIONS_SCAN = (16, 64, None)
"""``fit_positions`` scanned for whole-network K-FAC at the default fit and damping (``ours_kfac_all_pos<k>``,
``…_posall``: every position; the default is 32): positions per example over which each layer's input covariance
is averaged (ResNet18 at 64 px has 1,024 in the stem, 256 in layer1, 64 in layer2)."""
HEAD_JOBS = {"direct": {}, "cg": {}, "ekfac": {}, "kfac": {}, "arnoldi": {}, "lissa": {}}
"""Method → options of the head jobs ``ours_<method>_head``: every method at the product's defaults (what the app
runs and shows this LDS next to)."""
HEAD_VARIANTS = {
    "ours_arnoldi_head_rank100": ("arnoldi", {"rank": 100}),
    "ours_lissa_head_depth300": ("lissa", {"depth": 300}),
}
"""The head jobs as ``benchmarks/run.py`` times them: Arnoldi keeping 100 of the head's directions (default 20),
LiSSA 300 steps (default up to 1,000)."""


def engine_matrices(run: Run, method: str, scope: str, lambdas: tuple[Damping, ...], options: dict) -> dict:
    """``{damping: (n_test, n_train) matrix}`` from one fit of the influence engine at the final checkpoint."""
    from influence_core.influence import InfluenceModel, Method

    (x_train, y_train), (x_test, y_test) = materialised(run, "train"), materialised(run, "test")
    im = InfluenceModel(
        run.load_model(), scope=scope, method=Method.named(method, **options), damping=lambdas[0], device="cpu"
    )
    im.fit(x_train, y_train)
    out = {}
    for lam in lambdas:
        im.set_damping(lam)
        try:
            out[lam] = im.influences_from_factors(im.test_factors(x_test, y_test), x_train, y_train)
        except InfluenceLensError as e:  # e.g. a relative λ below float32 resolution on some layer: skip that λ
            log.warning("%s %s at λ = %s refused: %s", method, scope, lam, e.problem)
    return out


def trajectory_matrix(
    run: Run, method: str, scope: str, last_only: bool = False, n_test: int | None = None
) -> np.ndarray:
    """TracInCP / SOURCE over the run's kept checkpoints (or the final one alone), for the first ``n_test``
    test points (all if None): on the whole network every pair costs a parameter-sized dot product."""
    segments = run_segments(run)[-1:] if last_only else run_segments(run)
    x_train, y_train = materialised(run, "train")
    x_test, y_test = (t[:n_test] for t in materialised(run, "test"))
    ti = TrajectoryInfluence(
        [run.load_model(s.checkpoint) for s in segments],
        [s.lr_sum for s in segments],
        method,
        scope,
        device="cpu",
        # test points per pass over the training set: each holds a parameter-sized vector per checkpoint (44 MB);
        # SOURCE at 64 ran out of 24 GB (its curvature products add transient copies)
        test_chunk=64 if method == "tracin" else 32,
    )
    return ti.fit(x_train, y_train).influences(x_test, y_test, x_train, y_train)


def jobs(run: Run) -> dict:
    """Job name → callable returning ``{job name: matrix}`` (one fit may give several λ)."""
    out = {
        f"ours_{m}_head": (
            lambda m=m, o=o: {
                _lambda_job(f"ours_{m}_head", lam): matrix
                for lam, matrix in engine_matrices(
                    run, m, "head", LAMBDAS_HEAD if m == "direct" else (default_damping(Scope.HEAD),), o
                ).items()
            }
        )
        for m, o in HEAD_JOBS.items()
    }
    for job, (m, o) in HEAD_VARIANTS.items():
        out[job] = lambda job=job, m=m, o=o: {
            job: engine_matrices(run, m, "head", (default_damping(Scope.HEAD),), o)[default_damping(Scope.HEAD)]
        }
    for method in ("ekfac", "kfac"):  # the default (projected to rank 512) and full-rank factors
        for job, options in ((f"ours_{method}_all", ALL_OPTIONS), (f"ours_{method}_all_full", FULL_RANK_OPTIONS)):
            lambdas = LAMBDAS_ALL if job in ("ours_ekfac_all", "ours_kfac_all") else (default_damping(Scope.ALL),)
            out[job] = lambda method=method, job=job, options=options, lambdas=lambdas: {
                _lambda_job(job, lam): m for lam, m in engine_matrices(run, method, "all", lambdas, options).items()
            }
    for method in ("ekfac", "kfac"):
        for k in FIT_EXAMPLES_SCAN:
            job = f"ours_{method}_all_fit{k or 'all'}"
            out[job] = lambda job=job, method=method, k=k: {
                job: engine_matrices(
                    run, method, "all", (default_damping(Scope.ALL),), {**ALL_OPTIONS, "fit_examples": k}
                )[default_damping(Scope.ALL)]
            }
        for k in RANK_SCAN:
            job = f"ours_{method}_all_rank{k or 'full'}"
            out[job] = lambda job=job, method=method, k=k: {
                job: engine_matrices(run, method, "all", (default_damping(Scope.ALL),), {**ALL_OPTIONS, "rank": k})[
                    default_damping(Scope.ALL)
                ]
            }
    for k, r in FIT_AND_RANK_SCAN:
        job = f"ours_kfac_all_fit{k or 'all'}_rank{r or 'full'}"
        out[job] = lambda job=job, k=k, r=r: {
            job: engine_matrices(
                run, "kfac", "all", (default_damping(Scope.ALL),), {**ALL_OPTIONS, "fit_examples": k, "rank": r}
            )[default_damping(Scope.ALL)]
        }
    for k in FIT_POSITIONS_SCAN:
        job = f"ours_kfac_all_pos{k or 'all'}"
        out[job] = lambda job=job, k=k: {
            job: engine_matrices(
                run, "kfac", "all", (default_damping(Scope.ALL),), {**ALL_OPTIONS, "fit_positions": k}
            )[default_damping(Scope.ALL)]
        }
    out["tracin_all"] = lambda: {"tracin_all": trajectory_matrix(run, "tracin", "all")}
    out["tracin_all_first22"] = lambda: {"tracin_all_first22": trajectory_matrix(run, "tracin", "all", n_test=22)}
    out["source_all_first22"] = lambda: {"source_all_first22": trajectory_matrix(run, "source", "all", n_test=22)}
    out["tracin_head"] = lambda: {"tracin_head": trajectory_matrix(run, "tracin", "head")}
    out["source_head"] = lambda: {"source_head": trajectory_matrix(run, "source", "head")}
    out["grad_dot_all"] = lambda: {"grad_dot_all": trajectory_matrix(run, "tracin", "all", last_only=True)}
    out["source_all"] = lambda: {"source_all": trajectory_matrix(run, "source", "all")}
    return out


def _lambda_job(job: str, damping: Damping) -> str:
    """``job`` at its scope's default damping, else ``<job>_lambda0.01`` (absolute), ``<job>_top1e-05`` (relative
    to the largest eigenvalue) or ``<job>_rel0.1`` (to the mean eigenvalue)."""
    if damping == default_damping(Scope.HEAD if job.endswith("_head") else Scope.ALL):
        return job
    return f"{job}_{ {'': 'lambda', 'top': 'top', 'mean': 'rel'}[damping.relative_to] }{damping.value:g}"


def save_matrix(directory: Path, name: str, matrix: np.ndarray, record: dict) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(matrix, np.float32))
    atomic_write_bytes(directory / f"{name}.npy", buf.getvalue())
    atomic_write_json(directory / f"{name}.json", record)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="[lds-methods %(asctime)s] %(message)s", stream=sys.stdout)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload_dir", type=Path)
    p.add_argument("--jobs", default="", help="comma-separated job names (default: every job)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Run(a.workload_dir / "run")
    table = jobs(run)
    chosen = [j for j in a.jobs.split(",") if j] or list(table)
    out_dir = a.workload_dir / "matrices"
    for job in chosen:
        if (out_dir / f"{job}.npy").is_file():
            log.info("%s: cached", job)
            continue
        t = time.perf_counter()
        results = table[job]()
        seconds = time.perf_counter() - t
        for name, matrix in results.items():
            save_matrix(
                out_dir,
                name,
                matrix,
                {
                    "job": job,
                    "seconds_whole_job": round(seconds, 1),
                    "threads": a.threads,
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2),
                },
            )
        log.info("%s: %.0f s", job, seconds)


if __name__ == "__main__":
    main()
