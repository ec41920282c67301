"""The review store: decisions, undo, progress, exports, reopening and concurrent reviewers."""

from __future__ import annotations

import io
import multiprocessing
import sqlite3
import threading

import pandas as pd
import pytest

from influence_core.errors import InfluenceLensError
from influence_core.review import ReviewStore


def test_latest_decision_wins_and_undo_keeps_history(tmp_path):
    store = ReviewStore(tmp_path)
    store.record("a", "keep", "ann")
    store.record("a", "mislabeled", "bob", corrected_label="7")
    store.record("b", "skip", "ann")
    current = store.current().set_index("sample_id")
    assert current.loc["a", "decision"] == "mislabeled" and current.loc["a", "corrected_label"] == "7"

    undone = store.undo("bob")
    assert undone.sample_id == "a" and undone.decision == "mislabeled"
    assert store.current().set_index("sample_id").loc["a", "decision"] == "keep"  # ann's decision is back
    assert store.undo("bob") is None  # bob has nothing left to undo
    assert store.undo("ann").sample_id == "b"  # ann's latest action
    history = store.history()
    assert len(history) == 3 and history["undone_at"].notna().sum() == 2


def test_progress_and_exports(tmp_path):
    store = ReviewStore(tmp_path)
    store.record("x", "mislabeled", "ann", corrected_label="cat")
    store.record("y", "keep", "ann")
    store.record("z", "skip", "ann")
    assert store.progress(["x", "y", "z", "w"]) == {"reviewed": 2, "skipped": 1, "mislabeled": 1, "total": 4}

    corrections = pd.read_csv(io.StringIO(store.corrections_csv({"x": "dog", "y": "cat"})))
    assert corrections.to_dict("records") == [{"id": "x", "given_label": "dog", "corrected_label": "cat"}]
    decisions = pd.read_csv(io.StringIO(store.decisions_csv()))
    assert list(decisions.columns) == ["id", "decision", "corrected_label", "reviewer", "created_at"]
    assert decisions["id"].tolist() == ["x", "y", "z"]


def test_decisions_survive_reopen_and_are_keyed_by_id(tmp_path):
    ReviewStore(tmp_path).record("digits:12", "mislabeled", "ann", corrected_label="3")
    reopened = ReviewStore(tmp_path)
    found = reopened.decisions_for(["digits:5", "digits:12"])  # any ranking order: lookup is by id
    assert list(found) == ["digits:12"] and found["digits:12"].corrected_label == "3"
    with sqlite3.connect(reopened.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("kwargs, match", [
    ({"decision": "keep", "reviewer": "  "}, "reviewer"),
    ({"decision": "maybe", "reviewer": "ann"}, "Unknown review decision"),
    ({"decision": "mislabeled", "reviewer": "ann"}, "correct label"),
])
def test_invalid_actions_are_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(InfluenceLensError, match=match):
        ReviewStore(tmp_path).record("a", **kwargs)
    assert ReviewStore(tmp_path).history().empty


def _review_many(run_dir: str, reviewer: str, n: int) -> None:
    store = ReviewStore(run_dir)
    for i in range(n):
        store.record(f"{reviewer}-{i}", "mislabeled" if i % 2 else "keep", reviewer,
                     corrected_label="1" if i % 2 else None)
        if i % 10 == 9:  # undo and redo: the undo must hit this reviewer's own latest action
            assert store.undo(reviewer).sample_id == f"{reviewer}-{i}"
            store.record(f"{reviewer}-{i}", "mislabeled", reviewer, corrected_label="1")


def test_two_reviewer_threads_lose_nothing(tmp_path):
    threads = [threading.Thread(target=_review_many, args=(str(tmp_path), name, 60)) for name in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = ReviewStore(tmp_path)
    assert len(store.current()) == 120
    assert len(store.history()) == 120 + 2 * 6


def test_two_reviewer_processes_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_review_many, args=(str(tmp_path), name, 40)) for name in ("ann", "bob")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    current = ReviewStore(tmp_path).current()
    assert len(current) == 80 and set(current["reviewer"]) == {"ann", "bob"}
