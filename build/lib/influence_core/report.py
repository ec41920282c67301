"""The JSON summary of a run printed by ``influence-core report --json`` (keys only ever get added)."""

from __future__ import annotations

import json
import math
from typing import Any

from .analysis import SIGNALS, detection_metrics
from .pipeline import DEFAULT_SETTINGS, cached_results, load_influence
from .run import Run
from .second_pass import load_second_pass


def run_report(run: Run) -> dict:
    """classes, split sizes, test F1, confusion matrix, corruption, weights, timings_s; ``second_pass`` once
    computed (what it left out, its model's test accuracy and, with flips, its detection); with an influence
    entry cached: its settings and timings, and ``detection`` (signal → AUROC and recalls) when labels
    were flipped. The default settings' entry is preferred, else the newest one."""
    m, samples = run.metrics, run.samples
    flipped = run.flipped()
    report = {
        "run_dir": str(run.path),
        "dataset": run.config["dataset"],
        "classes": run.classes,
        "n_train": int((samples["split"] == "train").sum()),
        "n_val": int((samples["split"] == "val").sum()),
        "n_test": int((samples["split"] == "test").sum()),
        "f1_test": m["f1_test"],
        "accuracy_test": m["accuracy_test"],
        "confusion_matrix": m["confusion_matrix"],
        "n_corrupted": int(flipped.sum()),
        "flips_memorised": m.get("flips_memorised"),
        "weights": run.config["weights"],
        "train_layers": run.config["train_layers"],
        "epochs": run.config["epochs"],
        "epoch_seconds": m["epoch_seconds"],
        "device": m["device"],
        "timings_s": dict(m["timings_s"]),
    }
    if (second := load_second_pass(run)) is not None:
        report["second_pass"] = {
            "share": second.share,
            "n_left_out": int(second.left_out.sum()),
            "flips_left_out": int((second.left_out & flipped).sum()),
            "accuracy_test": second.accuracy_test,
            "seconds": second.seconds,
        }
        if flipped.any():
            report["second_pass"]["detection"] = detection_metrics(second.loss, flipped)
    result = load_influence(run, DEFAULT_SETTINGS) or next(iter(cached_results(run)), None)
    if result is None:
        return report
    report["influence"] = {"path": str(result.path), **result.meta["settings"], "best_signal": result.best_signal}
    report["timings_s"].update({f"influence_{k}": v for k, v in result.meta["timings_s"].items()})
    report["influence_vs_epoch"] = result.meta["timings_s"]["total"] / m["epoch_seconds"]
    if flipped.any():
        report["detection"] = {key: detection_metrics(score, flipped) for key, score in result.signals.items()}
        report["detection_best"] = max(report["detection"], key=lambda k: report["detection"][k]["auroc"])
        report["signal_labels"] = {k: SIGNALS[k].label for k in report["detection"]}
    return report


def to_json(report: dict) -> str:
    """``report`` as strict JSON: NaN and ±inf (an undefined AUROC, a broken timing) become ``null``."""
    return json.dumps(_finite_or_none(report), indent=2, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
