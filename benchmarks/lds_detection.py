"""Mislabel detection from trajectory signals vs the current best (``mean_loss``), on runs with flipped labels.

    PYTHONPATH=. .venv/bin/python benchmarks/lds_detection.py RUN_DIR [RUN_DIR ...] [--scopes all,head]
        [--out benchmarks/out/lds/detection/results.json]

Per run, per-segment self-influence of TracInCP (``all`` and ``head``) and SOURCE (``head``) over the kept
checkpoints is computed once and cached in ``RUN_DIR/trajectory_signals.npz`` (``<method>_<scope>``:
(n_segments, n_train) float32); the signals (higher = more suspicious) and their AUROC / recall at 5, 10, 20 % are
printed as a table and written as JSON. Combinations use ranks, so that no signal's scale dominates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from lds import materialised
from scipy.stats import rankdata
from trajectory import TrajectoryInfluence, run_segments

from influence_core import Run
from influence_core.analysis import cross_entropy, detection_metrics
from influence_core.storage import atomic_save_npz, atomic_write_json

log = logging.getLogger(__name__)

TRAJECTORY_SIGNALS = (("tracin", "all"), ("tracin", "head"), ("source", "head"))


def segment_self_influences(run: Run, methods=TRAJECTORY_SIGNALS) -> dict[str, np.ndarray]:
    """``<method>_<scope>`` → (n_segments, n_train) per-segment self-influence, cached beside the run."""
    cache = run.path / "trajectory_signals.npz"
    have = dict(np.load(cache)) if cache.is_file() else {}
    segments = run_segments(run)
    x, y = materialised(run, "train")
    for method, scope in methods:
        key = f"{method}_{scope}"
        if key in have:
            continue
        ti = TrajectoryInfluence(
            [run.load_model(s.checkpoint) for s in segments], [s.lr_sum for s in segments], method, scope, device="cpu"
        )
        have[key] = ti.fit(x, y).segment_self_influence(x, y)
        atomic_save_npz(cache, **have)
        log.info("%s: %s done", run.path, key)
    return have


NEIGHBOURS = 10
"""``k`` of the feature-neighbour signals."""


def checkpoint_features(run: Run) -> np.ndarray:
    """(n_segments, n_train, d) float32: the inputs of the final nn.Linear for every training image at every kept
    checkpoint (eval mode), cached beside the run."""
    cache = run.path / "checkpoint_features.npy"
    if cache.is_file():
        return np.load(cache)
    x, _ = materialised(run, "train")
    out = []
    for segment in run_segments(run):
        model = run.load_model(segment.checkpoint)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, inputs, _out, seen=seen: seen.append(inputs[0].detach()))
        with torch.no_grad():
            for a in range(0, len(x), 128):
                model(x[a : a + 128])
        handle.remove()
        out.append(torch.cat(seen).numpy())
    features = np.stack(out).astype(np.float32)
    np.save(cache, features)
    return features


def neighbour_disagreement(features: np.ndarray, labels: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(n,) fraction of each row's ``k`` nearest other rows (cosine) whose label differs from its own."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = f @ f.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
    return (labels[nearest] != labels[:, None]).mean(1)


def rank01(s: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1]: higher = more suspicious."""
    return rankdata(s) / len(s)


def signals(run: Run, per_segment: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Signal name → (n_train,) score, higher = more suspicious."""
    loss = run.dynamics["loss"].astype(np.float64)
    out = {"mean_loss": loss.mean(0), "mean_margin": -run.dynamics["margin"].mean(0).astype(np.float64)}
    labels = run.labels("train")
    out["final_loss"] = cross_entropy(run.predictions["probs_train"], labels).astype(np.float64)
    out["rank_mean(mean_loss, final_loss)"] = (rank01(out["mean_loss"]) + rank01(out["final_loss"])) / 2
    for key, seg in per_segment.items():
        out[f"{key}_self"] = seg.sum(0).astype(np.float64)
        out[f"{key}_self_first_segment"] = seg[0].astype(np.float64)
    for key in per_segment:
        out[f"rank_mean(mean_loss, {key}_self)"] = (rank01(out["mean_loss"]) + rank01(out[f"{key}_self"])) / 2
    n_epochs = len(loss)
    for e in (n_epochs // 4, n_epochs // 2):
        out[f"mean_loss_first_{e}_epochs"] = loss[:e].mean(0)
    features = checkpoint_features(run)
    for k, f in enumerate(features):
        out[f"neighbours_checkpoint_{k + 1}"] = neighbour_disagreement(f, labels)
    out["neighbours_mean"] = np.mean([out[f"neighbours_checkpoint_{k + 1}"] for k in range(len(features))], axis=0)
    for name in ("neighbours_mean", f"neighbours_checkpoint_{len(features)}"):
        out[f"rank_mean(mean_loss, {name})"] = (rank01(out["mean_loss"]) + rank01(out[name])) / 2
    return out


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="[lds-detection %(asctime)s] %(message)s", stream=sys.stdout)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument(
        "--methods",
        default=",".join(f"{m}_{s}" for m, s in TRAJECTORY_SIGNALS),
        help="comma-separated <method>_<scope> trajectory signals to compute",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/lds/detection/results.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    chosen = [tuple(k.split("_", 1)) for k in a.methods.split(",") if k]
    results = json.loads(a.out.read_text()) if a.out.is_file() else {}
    for run_dir in a.run_dirs:
        run = Run(run_dir)
        flipped = run.flipped()
        scores = signals(run, segment_self_influences(run, chosen))
        table = {name: detection_metrics(s, flipped) for name, s in scores.items()}
        results[str(run_dir)] = {
            "classes": run.classes,
            "image_size": run.config["image_size"],
            "flips_memorised": run.metrics.get("flips_memorised"),
            "signals": table,
        }
        print(f"\n{run_dir} ({' vs '.join(run.classes)}, {run.config['image_size']} px)")
        for name, m in sorted(table.items(), key=lambda kv: -kv[1]["auroc"]):
            print(
                f"| {name} | {m['auroc']:.3f} | {m['recall_at_5pct']:.2f} | {m['recall_at_10pct']:.2f} | "
                f"{m['recall_at_20pct']:.2f} |"
            )
    atomic_write_json(a.out, results)


if __name__ == "__main__":
    main()
