"""Rankings, the flags that mark training images wherever they are listed, and honest descriptions of a list."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from influence_core.analysis import (
    describe_ranking,
    detection_curve,
    detection_metrics,
    rank_suspects,
    top_k,
    training_flags,
)
from influence_core.review import Action

IDS = ["a", "b", "c", "d", "e", "f"]
LABELS = ["cat", "cat", "dog", "dog", "cat", "dog"]
FLIPPED = np.array([False, True, False, False, True, False])
MEAN = np.array([0.5, 0.9, -0.2, 0.1, -0.7, 0.9])


def decision(sample_id: str, decision: str, corrected: str | None = None) -> Action:
    return Action(1, sample_id, decision, corrected, "ann", "2026-01-01")


def test_rank_suspects_orders_by_score_with_ties_by_position():
    scores = np.array([0.1, 3.0, 2.0, 3.0, -1.0])
    assert rank_suspects(scores).tolist() == [1, 3, 2, 0, 4]
    assert rank_suspects(scores, 2).tolist() == [1, 3]


def test_detection_metrics_and_curve_count_flips_among_the_top():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    flipped = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], bool)
    metrics = detection_metrics(scores, flipped)
    assert metrics["recall_at_10pct"] == pytest.approx(1 / 3)  # ceil(0.1 * 10) = 1 image inspected: one flip
    assert metrics["recall_at_20pct"] == pytest.approx(1 / 3)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(flipped, scores))
    curve = detection_curve(scores, flipped)
    assert curve["inspected"].tolist() == pytest.approx(np.arange(1, 11) / 10)
    assert curve["found"].tolist() == pytest.approx(np.array([1, 1, 2, 2, 2, 2, 2, 2, 2, 3]) / 3)
    thin = detection_curve(scores, flipped, points=4)  # 1, 4, 7 and 10 images inspected, exact at each
    assert thin["inspected"].tolist() == pytest.approx([0.1, 0.4, 0.7, 1.0])
    assert thin["found"].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])


def test_flags_mark_flipped_and_reviewed_images():
    flags = training_flags(
        IDS,
        LABELS,
        FLIPPED,
        {
            "b": decision("b", "mislabeled", "dog"),
            "c": decision("c", "keep"),
            "d": decision("d", "exclude"),  # the fourth decision has its mark (a KeyError without it)
            "zzz": decision("zzz", "skip"),
        },
    )
    assert flags["marks"].tolist() == [
        "",
        "flipped · marked mislabeled → dog",
        "label kept by review",
        "excluded from training by review",
        "flipped",
        "",
    ]
    assert flags["review"].tolist() == ["", "mislabeled", "keep", "exclude", "", ""]
    assert flags["corrected_label"].tolist() == ["", "dog", "", "", "", ""]


def test_top_k_ranks_within_the_candidates():
    helpful, harmful = top_k(MEAN, 3)
    assert helpful.tolist() == [1, 5, 0] and harmful.tolist() == [4, 2, 3]  # ties by position
    cats = np.array([label == "cat" for label in LABELS])
    assert top_k(MEAN, 8, cats)[0].tolist() == [1, 0, 4] and top_k(MEAN, 2, cats)[1].tolist() == [4, 0]


def ranked(values, flags, k, candidates=None, harmful=False):
    """The rows of ``flags`` a page lists for the ``k`` most helpful (or harmful) ``values``."""
    return flags.iloc[top_k(values, k, candidates)[int(harmful)]]


def test_a_list_with_flipped_images_is_never_described_as_clean_examples():
    """The demo's "Highest mean influence — the clearest examples" listed flipped images (issue 10 item 11)."""
    flags = training_flags(IDS, LABELS, FLIPPED, {"a": decision("a", "mislabeled", "dog")})
    note = describe_ranking(ranked(MEAN, flags, 4), run_has_flips=True)
    assert (note.n_listed, note.n_flipped, note.n_marked_mislabeled) == (4, 1, 1) and note.has_wrong_labels
    assert note.text == (
        "1 of the 4 images listed has a label flipped on purpose, and 1 is marked mislabeled by "
        "reviewers, so this is not a list of clean examples: an image can rank here because its "
        "label is wrong."
    )
    clean = describe_ranking(ranked(MEAN, flags, 1, (MEAN > 0) & (MEAN < 0.2)), run_has_flips=True)
    assert clean.n_listed == 1 and not clean.has_wrong_labels
    assert clean.text.startswith("0 of the 1 images listed have a label flipped on purpose and none")
    unknown = describe_ranking(ranked(MEAN, training_flags(IDS, LABELS, np.zeros(6, bool)), 2, harmful=True), False)
    assert unknown.text.startswith("This run flipped no labels on purpose") and not unknown.has_wrong_labels
