"""The Mislabel review page with ``AppTest`` on a fresh copy of the demo run (no one else's decisions): the
keyboard focus after a decision, Exclude, two reviewers on one image, plain-text names, the focus buttons."""

from __future__ import annotations

import uuid

import pytest
from streamlit.testing.v1 import AppTest
from test_app_pages import APP, copy_run

from influence_core.analysis import rank_suspects
from influence_core.review import ReviewStore
from influence_core.run import Run


@pytest.fixture
def fresh(demo_run, runs_root, monkeypatch):
    """``(run, open_review)``: a copy of the demo run with its influences and no review store, and a function
    opening its review page as ``reviewer``."""
    from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence

    compute_influence(demo_run, DEFAULT_SETTINGS)
    run = Run(copy_run(demo_run.path, runs_root / f"review-{uuid.uuid4().hex[:8]}"))
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))

    def open_review(reviewer: str = "ann") -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.query_params.update({"run": run.path.name, "reviewer": reviewer})
        at.run()
        at.switch_page("pages/review_queue.py").run()
        assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
        return at

    return run, open_review


def first_page(run: Run) -> list[int]:
    from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence

    result = compute_influence(run, DEFAULT_SETTINGS)
    return [int(p) for p in rank_suspects(result.signals[result.best_signal], 10)]


def focused_rank(at: AppTest) -> int:
    """The rank (1-based) of the suspect drawn with the focus mark ▶."""
    (text,) = [m.value for m in at.markdown if m.value.startswith("▶ ")]
    return int(text.split("**#")[1].split("**")[0])


def press(at: AppTest, decision: str, pos: int, ids) -> AppTest:
    return at.button(key=f"{decision}-{ids[pos]}").click().run()


def test_after_a_decision_the_focus_moves_on_and_the_next_key_lands_there(fresh):
    """Issue 29: `k n m n s` stored keep on #1, mislabeled on #3, then skip on #3 again (the focus went back to #2
    after each decision). The buttons the keys press are those of the focused suspect: pressed here by key."""
    run, open_review = fresh
    ids, shown = run.ids("train"), first_page(run)
    at = open_review()
    assert focused_rank(at) == 1
    for step, want in (("keep", 2), ("next", 3), ("mislabeled", 4), ("next", 5), ("skip", 6)):
        if step == "next":
            next(b for b in at.button if b.label == "Next image ▶").click().run()
        else:
            press(at, step, shown[focused_rank(at) - 1], ids)
        assert focused_rank(at) == want, step
    found = ReviewStore.for_run(run).decisions_for(ids[p] for p in shown)
    assert {shown.index(next(p for p in shown if ids[p] == s)) + 1: a.decision for s, a in found.items()} == {
        1: "keep",
        3: "mislabeled",
        5: "skip",
    }
    next(b for b in at.button if b.label == "◀ Previous image").click().run()
    assert focused_rank(at) == 5
    nav = [b for b in at.button if b.label in ("◀ Previous image", "Next image ▶")]
    assert all("the queue page stays" in b.help for b in nav)  # issue 29 item 3: they move the focus, not the page


def test_exclude_needs_no_label_counts_as_reviewed_and_is_exported(fresh):
    run, open_review = fresh
    ids, shown = run.ids("train"), first_page(run)
    at = open_review()
    press(at, "exclude", shown[0], ids)
    assert ReviewStore.for_run(run).decisions_for([ids[shown[0]]])[ids[shown[0]]].decision == "exclude"
    assert at.progress[0].text.startswith("Reviewed 1 of") and "1 excluded from training" in at.progress[0].text
    assert any(m.value.startswith("⊘ excluded from training by ann") for m in at.markdown)
    assert "exclude" in ReviewStore.for_run(run).decisions_csv()


def test_two_reviewers_see_who_decided_what_and_when(fresh):
    """Issue 29: the last reviewer won silently and the other tab kept showing its own decision."""
    run, open_review = fresh
    ids, shown = run.ids("train"), first_page(run)
    ann = open_review("ann")
    press(ann, "keep", shown[0], ids)
    bob = open_review("bob")
    assert any(m.value.startswith("✓ label kept by ann, just now") for m in bob.markdown)
    wanted = next(b for b in bob.selectbox if (b.key or "").startswith(f"label-{ids[shown[0]]}-")).value
    press(bob, "mislabeled", shown[0], ids)
    ann.run()  # ann's next rerun shows bob's decision on top, hers below, and that they disagree
    (shown_text,) = [m.value for m in ann.markdown if "by bob" in m.value]
    assert shown_text.startswith(f"✗ mislabeled → **{wanted}** by bob, just now")
    assert "Earlier: ✓ label kept by ann, just now" in shown_text and "Reviewers disagree" in shown_text
    assert "T" not in shown_text.split("by bob")[1].split("\n")[0]  # no raw ISO time


def test_a_reviewer_name_is_plain_text(fresh):
    """Issue 29: a name like `**bold** [x](javascript:…)` was drawn as bold text and a link."""
    run, open_review = fresh
    ids, shown = run.ids("train"), first_page(run)
    name = "**bold** [x](javascript:alert(1))"
    at = open_review(name)
    press(at, "keep", shown[0], ids)
    (text,) = [m.value for m in at.markdown if "label kept by" in m.value]
    assert r"by \*\*bold\*\* \[x\]\(javascript\:alert\(1\)\)" in text and "](javascript" not in text
