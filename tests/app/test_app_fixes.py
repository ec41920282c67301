"""The find → fix → verify loop in the app (AppTest on a copy of the demo run): Retrain with N decisions, the
before / after view of the child, its headline on Overview, and the exports."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from influence_core.fixes import lineage
from influence_core.review import ReviewStore
from influence_core.run import Run

APP = Path(__file__).resolve().parents[2] / "app.py"
pytestmark = pytest.mark.slow  # retrains the demo


@pytest.fixture(scope="module")
def loop_parent(demo_run, runs_root):
    """A copy of the demo run (influences included, no review store) with one flipped label corrected and one
    image excluded."""
    import shutil

    dest = runs_root / "loop-parent"
    shutil.copytree(demo_run.path, dest, ignore=shutil.ignore_patterns("reviews.sqlite*"))
    run = Run(dest)
    train = run.part("train")
    flipped = train[train["flipped"]].iloc[0]
    store = ReviewStore.for_run(run)
    store.record(
        flipped["id"], "mislabeled", "Ana", run.classes[int(flipped["true_label"])], idempotency_key=uuid.uuid4().hex
    )
    store.record(train[~train["flipped"]]["id"].iloc[0], "exclude", "Ana", idempotency_key=uuid.uuid4().hex)
    return run


def _finish_jobs(at: AppTest) -> None:
    """Wait for the app's background jobs (influences, retraining), then run the page again."""
    from pages.ui.runs import job_registry

    for job in job_registry().running():
        assert job.wait(600), job
    at.run()


def _open(page: str, run_name: str, monkeypatch, runs_root) -> AppTest:
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.query_params.update({"run": run_name, "reviewer": "Ana"})
    at.switch_page(f"pages/{page}.py").run()
    _finish_jobs(at)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def test_before_and_after_of_a_run_without_corrections_says_how_to_get_one(demo_run, runs_root, monkeypatch):
    at = _open("compare", demo_run.path.name, monkeypatch, runs_root)
    text = " ".join(i.value for i in at.info)
    assert "Retrain with N decisions" in text
    labels = [b.label for b in at.button] + [d.label for d in at.get("download_button")]
    assert "Prepare the corrected training set (zip)" in labels


def test_retrain_with_decisions_lands_on_the_before_and_after_view(loop_parent, runs_root, monkeypatch):
    at = _open("review_queue", loop_parent.path.name, monkeypatch, runs_root)
    button = next(b for b in at.button if b.label.startswith("Retrain with 2 decisions"))
    button.click().run()
    _finish_jobs(at)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    headline = " ".join(s.value for s in at.success)
    assert "We corrected 1 label(s) and left out 1 image(s)" in headline
    child = Run(runs_root / at.session_state["run"])
    assert lineage(child)["parent_key"] == loop_parent.key
    accuracy = next(m for m in at.metric if m.label == "Test accuracy")
    assert accuracy.value == f"{child.metrics['accuracy_test']:.1%}"
    assert "Fixed: wrong before, right now" in " ".join(m.value for m in at.markdown)
    # the child's own Overview says the same in one sentence
    at.switch_page("pages/overview.py").run()
    assert headline.split(":")[0] in " ".join(s.value for s in at.success)
    # the child's review queue shows the carried decision as reviewed, nothing left to apply
    at.switch_page("pages/review_queue.py").run()
    assert not at.exception, at.exception
    assert not any(b.label.startswith("Retrain with") for b in at.button)
    # the parent's before / after page offers the child
    at.session_state["run"] = loop_parent.path.name
    at.switch_page("pages/compare.py").run()
    assert f"Open {child.path.name}" in [b.label for b in at.button]
