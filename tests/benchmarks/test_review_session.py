"""``benchmarks/review_session.py`` end to end on a small digits run, and its tables on hand-made results."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from benchmark_scripts import load

review_session, summarize = load("review_session"), load("summarize")


@pytest.mark.slow
def test_session_rounds_agree_with_the_runs_they_made(tmp_path):
    """Guards the simulated session's bookkeeping: round one is the same for both flows, every flip the oracle found
    leaves the next child's training set, and the round-two signal the iterative flow uses reproduces its second
    round."""
    args = argparse.Namespace(
        dataset="demo",
        classes=None,
        epochs=2,
        image_size=16,
        downsample=0.3,
        rounds=2,
        round_share=0.05,
        no_true_labels=True,
    )
    result = review_session.session(args, tmp_path / "demo")
    static, iterative = result["static"]["rounds"], result["iterative"]["rounds"]
    assert [r["reviewed"] for r in iterative] == [r["reviewed"] for r in static[:2]]
    assert iterative[0]["flips_found"] == static[0]["flips_found"]
    assert all(a["flips_found"] <= b["flips_found"] for a, b in zip(static, static[1:], strict=False))
    for r in iterative:
        assert r["flips_left_in_training"] == round(result["n_flipped"] * (1 - r["flips_found"]))
    round_two = result["round_two"]["flips_found"]
    assert round_two["the child's mean training loss (the iterative flow)"] == iterative[1]["flips_found"]
    assert round_two["the parent's second pass (the static flow)"] == static[1]["flips_found"]
    assert result["round_two"]["child_second_pass_seconds"] > 0
    assert result["round_two"]["cross_validation_seconds"] > 0
    assert 0 <= round_two["the child's 2-fold cross-validated loss (two half-size trainings a round)"] <= 1


def test_cross_validated_loss_scores_each_image_by_the_model_trained_without_it(monkeypatch):
    """Guards the folds: each image is scored once, by the training that left out its fold, and each fold holds
    half of every class."""
    labels = np.array([0] * 6 + [1] * 4)

    class FakeRun:
        def labels(self, split):
            return labels

        def tensors(self, split):
            return torch.arange(len(labels)), torch.as_tensor(labels)

    trainings = []
    monkeypatch.setattr(review_session, "retrain_without", lambda run, left_out: (left_out.copy(), None))
    monkeypatch.setattr(
        review_session,
        "label_losses",
        lambda left_out, x, y: trainings.append(left_out) or np.where(left_out[x.numpy()], len(trainings), -1.0),
    )
    loss = review_session.cross_validated_loss(FakeRun(), folds=2)
    assert len(trainings) == 2 and not (trainings[0] & trainings[1]).any() and (trainings[0] | trainings[1]).all()
    assert set(loss) == {1.0, 2.0}  # every image by the model that left it out, none by the other
    for fold in trainings:
        assert fold[labels == 0].sum() == 3 and fold[labels == 1].sum() == 2


def session(classes: list[str], found: dict[str, float] | None, cross_validation_seconds: float | None = None) -> dict:
    measured = {"flips_found": found, "child_second_pass_seconds": 90.0}
    if cross_validation_seconds is not None:
        measured["cross_validation_seconds"] = cross_validation_seconds
    return {"classes": classes, "round_two": found and measured}


def test_round_two_table_gives_each_pair_and_the_mean():
    """Guards the generated table: one column per pair with the signals measured, their mean, minutes."""
    sessions = [
        session(["a", "b"], {"x": 0.8, "y": 0.5}),
        session(["c", "d"], None),  # measured before the signals were added: left out
        session(["e", "f"], {"x": 0.9, "y": 0.7}, cross_validation_seconds=120.0),
    ]
    table = summarize.round_two_table(sessions)
    assert "| second round ranked by | a vs b | e vs f | mean |" in table
    assert "| x | 80% | 90% | 85% |" in table and "| y | 50% | 70% | 60% |" in table
    assert "| minutes of the child's second pass | 1.5 | 1.5 |  |" in table
    assert "| minutes of the cross-validation | – | 2.0 |  |" in table  # measured on one pair only
    assert "cross-validation" not in summarize.round_two_table(sessions[:1])
    assert "c vs d" not in table
    assert summarize.round_two_table([session(["c", "d"], None)]).startswith("Not measured yet")
