"""``benchmarks/review_session.py`` end to end on a small digits run, and its tables on hand-made results."""

from __future__ import annotations

import argparse

import pytest
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


def session(classes: list[str], found: dict[str, float] | None) -> dict:
    return {"classes": classes, "round_two": found and {"flips_found": found, "child_second_pass_seconds": 90.0}}


def test_round_two_table_gives_each_pair_and_the_mean():
    """Guards the generated table: one column per pair with the signals measured, their mean, minutes."""
    sessions = [
        session(["a", "b"], {"x": 0.8, "y": 0.5}),
        session(["c", "d"], None),  # measured before the signals were added: left out
        session(["e", "f"], {"x": 0.9, "y": 0.7}),
    ]
    table = summarize.round_two_table(sessions)
    assert "| second round ranked by | a vs b | e vs f | mean |" in table
    assert "| x | 80% | 90% | 85% |" in table and "| y | 50% | 70% | 60% |" in table
    assert "| minutes of the child's second pass | 1.5 | 1.5 |  |" in table
    assert "c vs d" not in table
    assert summarize.round_two_table([session(["c", "d"], None)]).startswith("Not measured yet")
