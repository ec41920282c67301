"""benchmarks/gpu_full.py's CPU dry run: every step runs and reports what the GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from influence_core import results
from influence_core.data import DEFAULT_FASHION_MNIST
from influence_core.paths import InfluencePaths

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # runs a benchmark script in a subprocess


def test_gpu_full_dry_run_on_cpu(tmp_path):
    if not Path(DEFAULT_FASHION_MNIST).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {DEFAULT_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "out"
    env = os.environ | {"INFLUENCE_LENS_CACHE": str(tmp_path / "cache")}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_full.py"),
            *("--dataset", f"fashion-mnist:{DEFAULT_FASHION_MNIST}", "--device", "cpu"),
            *("--downsample", "0.005", "--whole-tests", "4", "--out", str(out)),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    report = json.loads((out / "gpu_full.json").read_text())
    assert report["device"] == "cpu" and report["method"] == "kfac"
    assert report["train"]["n_train"] == 300 and report["train"]["n_test"] == 50  # 0.5 % of 60,000 / 10,000
    assert 0 <= report["train"]["test_accuracy"] <= 1
    assert np.isfinite(report["amp"]["relative_error"]) and report["amp"]["relative_error"] > 0
    whole = report["whole"]
    assert whole["self_influence_finite"] and whole["matrix_s"] > 0 and whole["fit_s"] > 0
    assert whole["amp"] == (report["amp"]["relative_error"] <= 1e-2)
    matrix = results.open_matrix(InfluencePaths(out / "whole"))[:]
    assert matrix.shape == (4, 300) and np.isfinite(matrix).all() and (matrix != 0).all()  # every block written
