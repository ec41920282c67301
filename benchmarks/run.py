"""End-to-end benchmark: train, time Influence Lens against peers, score mislabel detection and fidelity.

    .venv/bin/python benchmarks/run.py [--dataset tiny-imagenet:PATH] [--classes goldfish lemon]
        [--corrupt-fraction 0.1] [--train-layers all] [--epochs 15] [--image-size 64] [--downsample 1.0]
        [--regularization DAMPING] [--peer-regularization-all 1e-3]
        [--time-cap 60] [--cv-folds 4] [--cv-epochs N] [--peers pydvl,kronfluence,cleanlab]
        [--peer-fit-examples 64] [--retrain-test-images 3] [--retrain-group-size 20] [--out benchmarks/out/NAME]

Steps (every output under ``--out``):

1. ``run/``: train with the product's recipe (``influence_core.train``, cached by config and data).
2. ``jobs/ours_floor``: forward and forward+backward seconds over train+test — the floor.
3. ``jobs/ours_<method>_<scope>``: our methods, one process each (``ours.py``), same checkpoint, each at its
   scope's default damping (``--regularization`` sets one for all).
4. ``workload/`` + ``jobs/<peer>_<method>_<scope>``: the same checkpoint and tensors for the peers, each in its
   venv (``peers.ensure_venv``, built right after training, alongside the untimed cross-validation). The peers
   take one absolute λ: on the head, the λ our ``ours_direct_head`` resolved its damping to (so pyDVL's exact
   head computes the same matrix as ours); on the whole network ``--peer-regularization-all`` (one λ cannot
   match a damping relative to each layer's curvature). cleanlab gets ``--cv-folds`` out-of-fold probabilities
   (``cv/``, same recipe, ``--cv-epochs`` epochs).
5. Detection (AUROC, recall at 5/10/20 %) of every signal; fidelity of every matrix against our exact
   ``direct`` on the head scope.
6. ``retrain/``: the retraining check (``retrain_fidelity.py``): for ``--retrain-test-images`` test images,
   remove groups of ``--retrain-group-size`` points (most helpful / most harmful by ``ours_kfac_all``, random),
   retrain the whole network, compare measured and predicted test-loss changes for every job.
7. ``results.json`` and ``results.md``.

Every job but ``UNCAPPED`` gets ``--time-cap`` seconds per capped stage (longer stages are extrapolated, marked
``*``) and is killed after ``--job-timeout`` seconds in all (its partial result, if written, is kept; else "timeout").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import lds  # noqa: E402
import peers  # noqa: E402
import retrain_fidelity  # noqa: E402
from retrain_fidelity import table  # noqa: E402
from workload import Settings, save_workload  # noqa: E402

from influence_core import TrainConfig, train  # noqa: E402
from influence_core.analysis import detection_metrics  # noqa: E402
from influence_core.influence import Damping  # noqa: E402
from influence_core.model import build_resnet18  # noqa: E402
from influence_core.pipeline import InfluenceSettings, compute_influence  # noqa: E402
from influence_core.training import fit_model  # noqa: E402  (the exact training loop, reused for the CV folds)

OUR_JOBS = [
    ("direct", "head", []),
    ("cg", "head", []),
    ("arnoldi", "head", ["--option", "rank=100"]),
    ("ekfac", "head", []),
    ("kfac", "head", []),
    ("lissa", "head", ["--option", "depth=300"]),
    ("ekfac", "all", []),
    ("kfac", "all", []),
]
"""(method, scope, extra ours.py arguments). LiSSA at λ = 1e-3 needs ~10⁴ steps to converge (its rate is
λ / scale), so it runs a fixed depth like the literature's; Arnoldi keeps 100 of the head's 1026 directions."""
PEER_JOBS = {
    "pydvl": [
        ("cg", "head", []),
        ("direct", "head", []),
        ("direct", "all", []),
        ("cg", "all", ["--maxiter", "2", "--fit-examples", "FIT"]),
    ],
    "kronfluence": [
        ("ekfac", "head", []),
        ("identity", "head", []),
        ("ekfac", "all", ["--fit-examples", "FIT"]),
        ("identity", "all", []),
    ],
    "trak": [("trak", "head", []), ("trak", "all", [])],  # opt-in: --peers ...,trak (random projections, one model)
}
"""``FIT`` is replaced by ``--peer-fit-examples``. pyDVL's CG on the whole network runs 2 of its 100 iterations
per solve over that many training points (one iteration is a Hessian-vector product over the data: ~50 s for 131
images here) and scales the solve time up; Kronfluence's EK-FAC fits its factors on that many points."""


def our_job_name(method: str, scope: str, extra: list[str]) -> str:
    """``ours_<method>_<scope>``, plus ``_<key><value>`` for each ``--option`` that departs from the method's
    defaults (``ours_arnoldi_head_rank100``), as ``lds_methods.py`` names the same jobs: measured.json's cost of
    ``ours_arnoldi_head`` must be that of the default settings."""
    options = [v.replace("=", "") for k, v in zip(extra, extra[1:], strict=False) if k == "--option"]
    return "_".join([f"ours_{method}_{scope}", *options])


UNCAPPED = {"ours_ekfac_all", "ours_kfac_all"}
"""Jobs run without the time cap: the retraining check needs the whole-network matrices (their times are then
fully measured, never extrapolated)."""
REFERENCE = "ours_direct_head"
"""Exact solve the other matrices are compared with."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset",
        default=f"tiny-imagenet:{BENCH.parent.parent / 'shared' / 'data' / 'tiny-imagenet-200'}",
        help="dataset spec (default: the tiny-imagenet copy in ../shared next to the repository)",
    )
    p.add_argument("--classes", nargs="+", default=["goldfish", "lemon"])
    p.add_argument("--corrupt-fraction", type=float, default=0.1)
    p.add_argument("--train-layers", choices=("all", "head"), default="all")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--downsample", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--regularization",
        type=Damping.parse,
        default=None,
        help="damping of our jobs, e.g. 1e-3 or top:1e-5 (default: each scope's default); peers: see --peer-*",
    )
    p.add_argument(
        "--peer-regularization-all",
        type=float,
        default=1e-3,
        help="absolute λ of the peers' whole-network jobs (their head jobs take the λ ours_direct_head resolved)",
    )
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per capped stage of each job")
    p.add_argument("--job-timeout", type=float, default=None, help="seconds per job; default 4 × cap + 360")
    p.add_argument("--cv-folds", type=int, default=4)
    p.add_argument("--cv-epochs", type=int, default=None, help="epochs of each CV model; default --epochs")
    p.add_argument("--peers", default="pydvl,kronfluence,cleanlab", help="comma-separated; empty for none")
    p.add_argument(
        "--peer-fit-examples",
        type=int,
        default=64,
        help="peers on scope all (pyDVL CG, Kronfluence EK-FAC) fit on this many training points; "
        "their times are extrapolated to all",
    )
    p.add_argument("--retrain-test-images", type=int, default=3, help="retraining check; 0 to skip it")
    p.add_argument("--retrain-group-size", type=int, default=20)
    p.add_argument("--skip", default="", help="comma-separated job names to skip, e.g. ours_lissa_head_depth300")
    p.add_argument(
        "--lds-scores",
        type=Path,
        default=None,
        help="scores.json of `lds.py score` (linear datamodeling score per job) to include in the report",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out" / "default")
    args = p.parse_args(argv)
    args.job_timeout = args.job_timeout or 4 * args.time_cap + 360
    args.cv_epochs = args.cv_epochs or args.epochs
    return args


# ----------------------------------------------------------------------------------------------- jobs
def run_job(name: str, cmd: list[str] | None, out_dir: Path, timeout: float, runner=None) -> dict:
    """Run one job (a command, or ``runner()``) unless its result exists; return its result.json (or status)."""
    result = out_dir / "result.json"
    if result.is_file():
        log(f"{name}: cached")
        return json.loads(result.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"{name}: running (timeout {timeout:.0f} s)")
    t0 = time.perf_counter()
    status = "ok"
    try:
        if runner:
            runner()
        else:
            with open(out_dir / "log.txt", "w") as f:
                subprocess.run(cmd, check=True, timeout=timeout, stdout=f, stderr=subprocess.STDOUT, cwd=BENCH.parent)
    except subprocess.TimeoutExpired:
        status = f"killed at job timeout {timeout:.0f} s"
    except subprocess.CalledProcessError as e:
        status = f"failed (exit {e.returncode}, see {out_dir / 'log.txt'})"
    wall = time.perf_counter() - t0
    log(f"{name}: {status} in {wall:.0f} s")
    record = json.loads(result.read_text()) if result.is_file() else {}
    record.update(job_status=status, job_wall_s=round(wall, 1))
    result.write_text(json.dumps(record, indent=2))
    return record


def out_of_fold_probs(
    run, config: TrainConfig, folds: int, epochs: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """(n_train, K) class probabilities, each from a model trained (same recipe, ``epochs``) without its fold, and
    without the images of the (n_train,) bool ``exclude`` if given (every fold is still scored in full)."""
    x, y = run.tensors("train")
    x = x[:]  # whole tensor: this workload fits in memory
    probs = np.zeros((len(y), run.n_classes), np.float32)
    fold_of = np.random.default_rng(config.seed).permutation(len(y)) % folds
    cfg = dataclasses.replace(config, epochs=epochs, n_checkpoints=0)
    kept = torch.ones(len(y), dtype=torch.bool) if exclude is None else torch.from_numpy(~exclude)
    for k in range(folds):
        held = torch.from_numpy(fold_of == k)
        torch.manual_seed(config.seed + k + 1)
        model, _ = build_resnet18(run.n_classes, pretrained=run.config["weights"] == "pretrained")
        fit_model(model, cfg, x[~held & kept], y[~held & kept], x[held], y[held])
        model.eval()
        with torch.no_grad():
            probs[held.numpy()] = torch.cat([model(xb).softmax(1) for xb in x[held].split(64)]).numpy()
        log(f"cv fold {k + 1}/{folds} done")
    return probs


def head_lambda(jobs: dict[str, dict]) -> float:
    """The absolute λ ``ours_direct_head`` resolved its damping to: the peers' head λ."""
    resolved = (jobs.get("ours_direct_head") or {}).get("block_regularization")
    if not resolved or len(resolved) != 1:
        raise SystemExit(
            "run.py: the peers' head λ is the one ours_direct_head resolves; that job has no result with one "
            "(do not --skip it; delete its jobs folder if it predates block_regularization)."
        )
    return float(next(iter(resolved.values())))


# ------------------------------------------------------------------------------------------- analysis
def fidelity(results: dict[str, dict], jobs_dir: Path) -> dict[str, dict]:
    """Relative Frobenius error and Pearson r of every matrix (and self-influence) vs the reference."""
    ref_dir = jobs_dir / REFERENCE
    if not (ref_dir / "influence.npy").is_file():
        return {}
    ref, ref_self = np.load(ref_dir / "influence.npy"), np.load(ref_dir / "self_influence.npy")
    out = {}
    for name in results:
        path = jobs_dir / name / "influence.npy"
        if name == REFERENCE or not path.is_file():
            continue
        m = np.load(path).astype(np.float64)
        r = ref[: m.shape[0], : m.shape[1]].astype(np.float64)
        row = {
            "block": list(m.shape),
            "rel_frobenius": float(np.linalg.norm(m - r) / np.linalg.norm(r)),
            "pearson": float(np.corrcoef(m.ravel(), r.ravel())[0, 1]),
        }
        self_path = jobs_dir / name / "self_influence.npy"
        if self_path.is_file():
            s = np.load(self_path)
            row["self_pearson"] = float(np.corrcoef(s, ref_self[: len(s)])[0, 1])
        out[name] = row
    return out


def detection(
    signals: dict[str, np.ndarray], results: dict[str, dict], jobs_dir: Path, flipped: np.ndarray
) -> dict[str, dict]:
    """Detection metrics of the pipeline's signals, every complete self-influence and cleanlab's ranking."""
    scores = {f"pipeline: {k}": v for k, v in signals.items()}
    for name in results:
        path = jobs_dir / name / "self_influence.npy"
        if path.is_file() and len(np.load(path)) == len(flipped):
            scores[f"self-influence: {name}"] = np.load(path)
        path = jobs_dir / name / "label_quality.npy"
        if path.is_file():
            scores[f"cleanlab: {results[name]['method']} (−label quality)"] = -np.load(path)
    return {k: detection_metrics(np.asarray(v, np.float64), flipped) for k, v in scores.items()}


# ------------------------------------------------------------------------------------------- markdown
def seconds(rec: dict | None, floor_s: float) -> tuple[str, str]:
    """('12.3*', '45×') for a pipeline record; ``*`` = extrapolated."""
    if not rec:
        return "–", "–"
    if rec.get("status") == "infeasible":
        return "infeasible", "–"
    star = "*" if rec["extrapolated"] else ""
    return f"{rec['seconds_full']:.1f}{star}", f"{rec['seconds_full'] / floor_s:.1f}{star}"


def markdown(report: dict) -> str:
    floor = report["floor"]
    floor_s = floor["forward_backward_s"]
    timing_rows = []
    for name, r in report["jobs"].items():
        if name.startswith("cleanlab"):
            continue
        matrix = r.get("matrix") or {}
        m, mx = seconds(matrix, floor_s)
        s, sx = seconds(r.get("self_influence"), floor_s)
        options = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
        status = matrix.get("reason") or "; ".join(filter(None, [r.get("job_status", "ok"), r.get("note")]))
        timing_rows.append(
            [
                f"{name} ({options})" if options else name,
                r.get("version", "–"),
                m,
                mx,
                s,
                sx,
                matrix.get("setup_s", "–"),
                r.get("peak_rss_mib", "–"),
                status,
            ]
        )
    det_rows = [
        [
            k,
            f"{v['auroc']:.3f}",
            f"{v['recall_at_5pct']:.2f}",
            f"{v['recall_at_10pct']:.2f}",
            f"{v['recall_at_20pct']:.2f}",
        ]
        for k, v in sorted(report["detection"].items(), key=lambda kv: -kv[1]["auroc"])
    ]
    fid_rows = [
        [
            k,
            "×".join(map(str, v["block"])),
            f"{v['rel_frobenius']:.3g}",
            f"{v['pearson']:.4f}",
            f"{v['self_pearson']:.4f}" if "self_pearson" in v else "–",
        ]
        for k, v in report["fidelity"].items()
    ]
    run = report["run"]
    return (
        "\n\n".join(
            [
                f"# Benchmark results — {report['name']}",
                f"Date {report['date']}; machine: {report['machine']}; device cpu, torch threads {report['torch_threads']}; "
                f"wall time {report['wall_s'] / 60:.1f} min.",
                "Command:\n\n    " + report["command"],
                f"Run: {run['n_train']} train / {run['n_test']} test images, {run['n_flipped']} flipped labels, "
                f"test accuracy {run['accuracy_test']:.3f}, flips memorised {run['flips_memorised']:.2f}, "
                f"damping: ours {report['regularization']}, peers λ = {report['peer_regularization']['head']:.3g} on the "
                f"head (ours_direct_head's, resolved) and {report['peer_regularization']['all']:g} on the whole "
                f"network; time cap {report['time_cap_s']:g} s per stage, "
                f"job timeout {report['job_timeout_s']:g} s.",
                f"## Floor\n\nOne pass over the {floor['n_images']} train+test images (eval mode, batch 64): forward "
                f"{floor['forward_s']:.2f} s, forward+backward {floor_s:.2f} s (the unit of the × columns), "
                f"peak RSS {floor['peak_rss_mib']} MiB.",
                "## Time to the full test × train matrix and to self-influence\n\n"
                "Seconds include the fit (uncapped). `*` = a stage hit the time cap and its time is linearly "
                "extrapolated from the measured part. × = multiple of the forward+backward floor. "
                "RSS = peak resident memory (VmHWM) of the job's own process, data included (MiB). "
                "`killed` = the job did not finish its uncapped fit (or first capped step) before the job timeout.\n\n"
                + table(
                    ["job", "version", "matrix s", "matrix ×", "self s", "self ×", "fit s", "peak RSS MiB", "status"],
                    timing_rows,
                ),
                "## Mislabel detection\n\n`pipeline:` = signals of `compute_influence` (direct, head, with "
                "checkpoints); `self-influence:` = each complete job's self-influence; cleanlab on "
                f"{report['cv_folds']}-fold out-of-sample probabilities ({report['cv_epochs']} epochs per fold model).\n\n"
                + table(["signal", "AUROC", "recall@5%", "recall@10%", "recall@20%"], det_rows),
                f"## Fidelity vs exact `{REFERENCE}`\n\nOn the block each job computed (test × train); scope-`all` "
                "rows compare a different quantity (whole-network influence) and are shown for reference only.\n\n"
                + table(["job", "block", "rel. Frobenius error", "Pearson r (matrix)", "Pearson r (self)"], fid_rows),
                retrain_fidelity.markdown(report["retraining"])
                if report.get("retraining")
                else "Retraining check skipped (`--retrain-test-images 0`).",
                "## Linear datamodeling score (`lds.py`)\n\n" + lds.markdown(report["lds"])
                if report.get("lds")
                else "LDS not included (`--lds-scores`).",
            ]
        )
        + "\n"
    )


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")  # the library's status lines
    logging.getLogger("influence_core").setLevel(logging.INFO)
    t_start = time.perf_counter()
    out = args.out.resolve()
    jobs_dir = out / "jobs"
    config = TrainConfig(
        dataset=args.dataset,
        classes=args.classes,
        image_size=args.image_size,
        downsample=args.downsample,
        seed=args.seed,
        epochs=args.epochs,
        train_layers=args.train_layers,
        corrupt_fraction=args.corrupt_fraction,
    )
    log("training (cached if unchanged)")
    run = train(config, out / "run", device="cpu")
    flipped = run.flipped()

    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    cv_file = out / "cv" / f"pred_probs_{args.cv_folds}x{args.cv_epochs}.npy"
    # the peers' venvs are built (pip: mostly unpacking wheels) while the untimed cross-validation trains;
    # nothing that is timed runs before both are done
    with ThreadPoolExecutor(max_workers=1) as pool:
        venvs = pool.submit(lambda: {peer: peers.ensure_venv(peer) for peer in wanted})
        if "cleanlab" in wanted and not cv_file.is_file():
            log(f"cross-validation: {args.cv_folds} folds × {args.cv_epochs} epochs")
            cv_file.parent.mkdir(parents=True, exist_ok=True)
            np.save(cv_file, out_of_fold_probs(run, config, args.cv_folds, args.cv_epochs))
        pythons = venvs.result()

    log("pipeline result (direct, head, with checkpoints)")
    result = compute_influence(run, InfluenceSettings(damping=args.regularization), device="cpu")

    ours = [sys.executable, str(BENCH / "ours.py"), str(run.path)]
    common = ["--regularization", str(args.regularization)] if args.regularization else []
    jobs: dict[str, dict] = {}
    skip = set(filter(None, args.skip.split(",")))
    jobs["ours_floor"] = run_job(
        "ours_floor",
        [*ours, str(jobs_dir / "ours_floor"), "--method", "floor"],
        jobs_dir / "ours_floor",
        args.job_timeout,
    )
    for method, scope, extra in OUR_JOBS:
        name = our_job_name(method, scope, extra)
        if name not in skip:
            cap = ["--time-cap", str(1e9 if name in UNCAPPED else args.time_cap)]
            jobs[name] = run_job(
                name,
                [*ours, str(jobs_dir / name), "--method", method, "--scope", scope, *common, *cap, *extra],
                jobs_dir / name,
                args.job_timeout,
            )

    peer_lambda = {"head": head_lambda(jobs), "all": args.peer_regularization_all}
    if wanted:
        x_train, y_train = run.tensors("train")
        x_test, y_test = run.tensors("test")
        x_train, x_test = x_train[:], x_test[:]  # whole tensors: this workload fits in memory
        tensors = {
            "x_train": x_train,
            "y_train": y_train,
            "x_test": x_test,
            "y_test": y_test,
            "is_corrupted": torch.from_numpy(flipped.copy()),
        }
        if "cleanlab" in wanted:
            tensors["pred_probs"] = torch.from_numpy(np.load(cv_file))
        save_workload(
            out / "workload",
            run.load_model(),
            tensors,
            Settings(
                num_classes=run.n_classes,
                regularization=peer_lambda["head"],
                time_cap_s=args.time_cap,
                batch_size=64,
                extra={"run": str(run.path), "cv_folds": args.cv_folds, "cv_epochs": args.cv_epochs},
            ),
        )
        for peer in wanted:
            for method, scope, more in PEER_JOBS.get(peer, [(None, None, [])]):
                name = f"{peer}_{method}_{scope}" if method else peer
                if name in skip:
                    continue
                more = [str(args.peer_fit_examples) if a == "FIT" else a for a in more]
                extra = (
                    ["--method", method, "--scope", scope, "--time-cap", str(args.time_cap)]
                    + ["--regularization", str(peer_lambda[scope]), *more]
                    if method
                    else []
                )
                cmd = [
                    str(pythons[peer]),
                    str(peers.RUNNERS[peer]),
                    str(out / "workload"),
                    str(jobs_dir / name),
                    *extra,
                ]
                jobs[name] = run_job(name, cmd, jobs_dir / name, args.job_timeout)

    retraining = None
    if args.retrain_test_images > 0:
        log(f"retraining check: {args.retrain_test_images} test images × 3 groups of {args.retrain_group_size}")
        retraining = retrain_fidelity.retrain_fidelity(
            run,
            jobs_dir,
            out,
            n_test_images=args.retrain_test_images,
            group_size=args.retrain_group_size,
            seed=args.seed,
            log=log,
        )

    cpu_info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpu_info.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    report = {
        "name": out.name,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(
            shlex.quote(a) for a in [os.path.relpath(sys.executable), "benchmarks/run.py", *(argv or sys.argv[1:])]
        ),
        "regularization": str(args.regularization or "the scope's default"),
        "peer_regularization": peer_lambda,
        "time_cap_s": args.time_cap,
        "job_timeout_s": args.job_timeout,
        "cv_folds": args.cv_folds,
        "cv_epochs": args.cv_epochs,
        "run": {
            "n_train": len(flipped),
            "n_test": len(run.labels("test")),
            "n_flipped": int(flipped.sum()),
            **{k: run.metrics[k] for k in ("accuracy_test", "flips_memorised")},
        },
        "pipeline_timings_s": result.meta["timings_s"],
        "floor": jobs.pop("ours_floor"),
        "jobs": jobs,
        "detection": detection(result.signals, jobs, jobs_dir, flipped),
        "fidelity": fidelity(jobs, jobs_dir),
        "retraining": retraining,
        "lds": json.loads(args.lds_scores.read_text()) if args.lds_scores else None,
    }
    report["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "results.md").write_text(markdown(report))
    log(f"wrote {out / 'results.md'}")
    print(markdown(report))


if __name__ == "__main__":
    main()
