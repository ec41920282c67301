"""The second pass: retrain without the top suspects (leave-group-out, the run's own recipe) and score again."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from influence_core import Run
from influence_core.analysis import detection_metrics
from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence
from influence_core.report import run_report
from influence_core.second_pass import SECOND_PASS_SIGNAL, compute_second_pass, load_second_pass
from influence_core.training import retrain_without

pytestmark = pytest.mark.slow  # each test retrains a run without its suspects


@pytest.fixture(scope="module")
def own_demo(demo_run, tmp_path_factory) -> Run:
    """A copy of the demo run (the second pass writes into the run directory; other tests share the original)."""
    path = tmp_path_factory.mktemp("second") / "demo"
    shutil.copytree(demo_run.path, path, ignore=shutil.ignore_patterns("influence", "reviews.sqlite*"))
    return Run(path)


def test_retrain_with_nothing_left_out_is_the_run_itself(own_demo):
    """Same recipe, seed, initial weights, batches and augmentation draws: an empty mask gives the run's final
    weights bit for bit; a mask keeps those points out of every batch."""
    model, dynamics = retrain_without(own_demo, np.zeros(len(own_demo.labels("train")), bool), device="cpu")
    final = own_demo.load_model().state_dict()
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    np.testing.assert_array_equal(dynamics["loss"], own_demo.dynamics["loss"])


def test_second_pass_leaves_out_the_top_suspects_and_is_cached(own_demo, monkeypatch):
    second = compute_second_pass(own_demo, 0.1, device="cpu")
    mean_loss = own_demo.dynamics["loss"].mean(0)
    n = len(mean_loss)
    assert second.left_out.sum() == round(0.1 * n)
    assert mean_loss[second.left_out].min() >= mean_loss[~second.left_out].max()
    assert second.loss.shape == (n,) and np.isfinite(second.loss).all() and (second.loss >= 0).all()
    # out of sample, the left-out suspects look worse than the rest
    assert second.loss[second.left_out].mean() > second.loss[~second.left_out].mean()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached second pass was trained again")

    monkeypatch.setattr("influence_core.second_pass.retrain_without", no_training)
    again = compute_second_pass(Run(own_demo.path), 0.1)
    np.testing.assert_array_equal(again.loss, second.loss)
    assert load_second_pass(own_demo, 0.2) is None  # another share is another pass
    assert load_second_pass(own_demo).share == 0.1  # the report and the app take whichever share was computed


def test_second_pass_finds_the_flips_and_reports_them(own_demo):
    """On the demo's 10 % flipped digits, the retrained model finds flips at least as well as the first pass, and
    the report and the influence result's signals carry it (the default signal once computed)."""
    second = compute_second_pass(own_demo, 0.1, device="cpu")
    flipped = own_demo.flipped()
    first = detection_metrics(own_demo.dynamics["loss"].mean(0), flipped)["auroc"]
    assert detection_metrics(second.loss, flipped)["auroc"] >= first - 0.01
    report = run_report(own_demo)["second_pass"]
    assert report["n_left_out"] == second.left_out.sum()
    assert report["flips_left_out"] == (second.left_out & flipped).sum() > flipped.sum() / 2
    assert report["detection"]["auroc"] == detection_metrics(second.loss, flipped)["auroc"]
    result = compute_influence(own_demo, DEFAULT_SETTINGS, device="cpu")
    assert result.best_signal == SECOND_PASS_SIGNAL
    np.testing.assert_array_equal(result.signals[SECOND_PASS_SIGNAL], second.loss.astype(np.float64))
    own_demo.paths.second_pass.unlink()  # looked up on each call: gone, and the first pass is the default again
    assert SECOND_PASS_SIGNAL not in result.signals and result.best_signal == "mean_loss"


def test_a_retrained_run_does_not_use_an_old_second_pass(own_demo):
    compute_second_pass(own_demo, 0.1, device="cpu")
    own_demo.paths.train_key.write_text("another training")
    try:
        assert load_second_pass(Run(own_demo.path), 0.1) is None
    finally:
        own_demo.paths.train_key.write_text(own_demo.key)
