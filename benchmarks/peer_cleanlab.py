"""Confident learning (cleanlab) on a workload's out-of-sample predicted probabilities.

Run inside ``benchmarks/.venvs/cleanlab``::

    python benchmarks/peer_cleanlab.py WORKLOAD_DIR OUT_DIR [--method self_confidence|normalized_margin|
                                       confidence_weighted_entropy]

Needs ``pred_probs`` (n, K) in the workload: class probabilities of each training point from a model that
did not see it (the orchestrator's 4-fold cross-validation with the product's training recipe; that
training time is the orchestrator's to report, this runner times only cleanlab). Writes
``label_quality.npy`` (n,) float32 (``get_label_quality_scores``, lower = more likely mislabeled),
``ranking.npy`` (n,) int64 (all training indices, most suspicious first, i.e. ascending quality) and
``issues.npy`` (f,) int64 (``find_label_issues``' flagged indices, ranked by the same score).
"""

from __future__ import annotations

import time
from importlib.metadata import version

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from workload import environment, load_workload, peak_memory, runner_parser, write_result


def main() -> None:
    args = runner_parser(
        __doc__.splitlines()[0],
        ("self_confidence", "normalized_margin", "confidence_weighted_entropy"),
        influence=False,
    ).parse_args()
    w = load_workload(args.workload_dir, "cpu")
    if w.pred_probs is None:
        raise SystemExit(f"{args.workload_dir}/data.pt has no pred_probs: cleanlab needs out-of-sample probabilities")
    labels, probs = w.y_train.numpy(), w.pred_probs.double().numpy()

    t0 = time.perf_counter()
    issues = find_label_issues(labels, probs, return_indices_ranked_by=args.method, n_jobs=1)
    issues_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    quality = get_label_quality_scores(labels, probs, method=args.method)
    quality_s = time.perf_counter() - t0
    ranking = np.argsort(quality, kind="stable")

    record = {
        "peer": "cleanlab",
        "version": version("cleanlab"),
        "method": args.method,
        "n_train": len(labels),
        "n_flagged": len(issues),
        "find_label_issues_s": round(issues_s, 4),
        "label_quality_s": round(quality_s, 4),
        **environment("cpu"),
        **peak_memory("cpu"),
    }
    if w.is_corrupted is not None:
        corrupted = w.is_corrupted.numpy()
        record["flagged_precision"] = round(float(corrupted[issues].mean()), 4) if len(issues) else None
        record["flagged_recall"] = round(float(corrupted[issues].sum() / max(corrupted.sum(), 1)), 4)
    write_result(
        args.out_dir,
        record,
        label_quality=quality.astype(np.float32),
        ranking=ranking.astype(np.int64),
        issues=np.asarray(issues, dtype=np.int64),
    )


if __name__ == "__main__":
    main()
