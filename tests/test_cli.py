"""The CLI contract: train → influence → report --json, and clear errors instead of tracebacks."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "influence_core.cli"]


def run_cli(*args, check=True):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def test_train_influence_report_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--dataset", "demo", "--classes", "1", "7", "--run-dir", str(run_dir), "--epochs", "2",
              "--corrupt-fraction", "0.1", "--image-size", "16", "--downsample", "0.5"]
    first = run_cli("train", *common)
    assert "from scratch" in first.stderr and "epoch 2/2" in first.stderr  # weights source and progress bars
    again = run_cli("train", *common)
    assert "cached" in again.stderr
    run_cli("influence", "--run-dir", str(run_dir))
    report = json.loads(run_cli("report", "--run-dir", str(run_dir), "--json").stdout)
    for key in ("classes", "n_train", "n_val", "n_test", "f1_test", "confusion_matrix", "n_corrupted", "weights",
                "timings_s", "detection"):
        assert key in report, key
    assert report["classes"] == ["1", "7"] and report["weights"] == "scratch"
    assert report["n_corrupted"] == round(0.1 * report["n_train"])
    assert {"train", "influence_total"} <= set(report["timings_s"])
    best = report["detection"][report["influence"]["best_signal"]]
    assert set(best) == {"auroc", "recall_at_5pct", "recall_at_10pct", "recall_at_20pct"}


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "tiny-imagenet:/no/such/folder", "--run-dir", "x"], "does not exist"),
    (["train", "--dataset", "demo", "--classes", "eleven", "--run-dir", "x"], "Unknown class"),
    (["report", "--run-dir", "/no/such/run"], "not a finished run directory"),
    (["train", "--dataset", "demo", "--device", "tpu", "--run-dir", "x"], "Unknown device"),
])
def test_bad_input_gives_one_clear_message(tmp_path, args, message):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr and "Fix:" in proc.stderr
