"""The summaries of ``benchmarks/counterfactual.py`` on hand-made checks whose answer is known."""

from __future__ import annotations

import numpy as np
from benchmark_scripts import load

from influence_core.counterfactual import Check

bench = load("counterfactual")


def check(test: int, k: int, flipped: bool, before: float, after: float, predicted: float | None = None) -> Check:
    return Check(
        run_key="r",
        entry="e",
        method="direct, last layer",
        test=test,
        direction="helpful",
        k=k,
        k_reason="chosen",
        removed=list(range(k)),
        before_loss=0.5,
        before_margin=before,
        before_class=0,
        after_loss=0.5 + (before - after),
        after_margin=after,
        after_class=1 if flipped else 0,
        flipped=flipped,
        predicted_loss_change=predicted,
        predicted_margin=None,
        predicted_flip=None if predicted is None else predicted > 1,
        units_note=None,
        seconds=1.0,
    )


def test_summary_counts_flips_margin_drops_and_the_smallest_flipping_k():
    """Guards the benchmark's numbers: share flipped and mean margin drop per k, the smallest k flipping each image
    (None when none does), and the sign agreement of predicted and measured loss changes."""
    found = [
        check(0, 5, False, 2.0, 1.0, 0.4),
        check(0, 10, True, 2.0, -1.0, 2.0),
        check(1, 5, True, -1.0, 1.0, -0.2),  # a wrong prediction: its margin rose, so the prediction's fell by 2
        check(1, 10, True, -1.0, 2.0, 0.1),
        check(2, 5, False, 1.0, 1.0, 0.3),
        check(2, 10, False, 1.0, 0.5, 0.3),
    ]
    s = bench.summarise(found, [5, 10, 20])
    assert s["by_k"]["5"] == {"n": 3, "flipped": 1 / 3, "margin_drop": (1.0 + 2.0 + 0.0) / 3}
    assert s["by_k"]["10"]["flipped"] == 2 / 3 and "20" not in s["by_k"]
    assert s["smallest_flipping_k"] == {"0": 10, "1": 5, "2": None}
    signs = [np.sign(c.predicted_loss_change) == np.sign(c.loss_change) for c in found]
    assert s["loss_sign_right"] == np.mean(signs)


def test_test_images_are_half_wrong_predictions_when_there_are_enough():
    labels = np.array([0, 1] * 20)
    predicted = labels.copy()
    predicted[:6] = 1 - predicted[:6]  # six wrong predictions
    picked = bench.chosen_tests(labels, predicted, 10, seed=0)
    assert len(picked) == 10 == len(set(picked))
    assert (labels[picked] != predicted[picked]).sum() == 5
    assert (labels != predicted)[bench.chosen_tests(labels, predicted, 20, seed=0)].sum() == 6  # all of them


def test_markdown_gives_each_k_and_the_images_some_k_flips():
    """Guards the generated table: per k the share flipped with the margin drop, then how many images some k
    flipped and the smallest k of each."""
    found = [check(0, 5, False, 2.0, 1.0), check(0, 10, True, 2.0, -1.0), check(1, 5, False, 1.0, 1.0)]
    found.append(check(1, 10, False, 1.0, 0.5))
    report = {
        "workload": "w",
        "test_images": [0, 1],
        "right_predictions": 2,
        "ks": [5, 10],
        "methods": {"direct:head": bench.summarise(found, [5, 10])},
    }
    row = bench.markdown(report).splitlines()[-1]
    assert row == "| direct:head | 0% (+0.50) | 50% (+1.75) | 1 of 2 (10) |"
