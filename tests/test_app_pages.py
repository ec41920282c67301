"""Every page of the Streamlit app, run headless with ``AppTest`` on the small cached demo run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence
from influence_core.review import ReviewStore

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture(scope="module")
def demo_result(demo_run):
    return compute_influence(demo_run, DEFAULT_SETTINGS)


@pytest.fixture
def app(demo_run, demo_result, runs_root, monkeypatch):
    """A function opening the app on one page of the demo run (``?run=demo``), already run once."""
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))

    def open_page(page: str | None = None, **params) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.query_params.update({"run": demo_run.path.name, **params})
        at.run()
        if page:
            at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        return at

    return open_page


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_overview_tells_the_story(app, demo_run, demo_result):
    at = app()
    flipped = demo_run.flipped()
    assert metric(at, "Test F1 (macro)") == f"{demo_run.metrics['f1_test']:.3f}"
    assert metric(at, "Training labels flipped") == f"{flipped.mean():.0%}"
    order = np.argsort(-demo_result.signals[demo_result.best_signal], kind="stable")[:int(np.ceil(0.1 * len(flipped)))]
    assert metric(at, "Flips found in the top 10 %") == f"{flipped[order].sum()} of {flipped.sum()}"
    assert len(at.get("image")) >= 8  # the eight most suspicious training images
    assert at.query_params["run"] == demo_run.path.name


def test_setup_page_shows_quality_and_weights(app, demo_run):
    at = app("setup_run")
    assert metric(at, "Test F1 (macro)") == f"{demo_run.metrics['f1_test']:.3f}"
    weights = "trained from scratch" if demo_run.config["weights"] == "scratch" else "ImageNet-pretrained"
    assert any(weights in box.value for box in [*at.warning, *at.success])
    assert [m.label for m in at.multiselect][0].startswith("Classes (type to search; empty = all 10)")
    assert any(c.value == DEFAULT_SETTINGS.accuracy_note() and "Exact" in c.value for c in at.caption)
    next(r for r in at.radio if r.label == "Parameters").set_value("all").run()
    assert any(c.value.startswith("Approximate: influence functions assume") for c in at.caption)


def test_setup_page_opens_a_run_directory(app, demo_run, tmp_path):
    at = app("setup_run")
    folder = next(t for t in at.text_input if t.label == "Run directory")
    folder.input(str(tmp_path)).run()
    next(b for b in at.button if b.label == "Open run").click().run()
    assert "not a finished run directory" in at.error[0].value and "Fix:" in at.error[0].value
    folder.input(str(demo_run.path)).run()
    next(b for b in at.button if b.label == "Open run").click().run()
    assert not at.error and at.session_state["run"] == demo_run.path.name


def test_explorer_shows_top_k_for_the_test_image_in_the_url(app, demo_run):
    at = app("explorer", test="3")
    assert at.session_state["test"] == 3
    assert any("Test image #3" in m.value for m in at.markdown)
    assert len([b for b in at.button if b.label == "Saliency"]) == 2 * 8  # k helpful + k harmful
    at.slider[0].set_value(4).run()
    assert len([b for b in at.button if b.label == "Saliency"]) == 2 * 4
    next(b for b in at.button if b.label == "Saliency").click().run()
    assert not at.exception
    assert at.session_state["train_pick"] is not None
    assert any("Red pixels" in c.value for c in at.caption)


def test_whole_test_set_page_lists_every_training_image(app, demo_run):
    at = app("test_set")
    assert len(at.dataframe[0].value) == len(demo_run.ids("train"))


def test_review_queue_records_and_undoes(app, demo_run, demo_result):
    order = np.argsort(-demo_result.signals[demo_result.best_signal], kind="stable")
    queue = [demo_run.ids("train")[p] for p in order[:int(np.ceil(0.1 * len(order)))]]
    store = ReviewStore.for_run(demo_run)
    sid = next(i for i in queue if i not in store.decisions_for(queue))  # other tests may have reviewed some
    before = store.progress(queue)["reviewed"]
    at = app("review_queue")
    assert at.progress[0].text.startswith(f"Reviewed {before} of {len(queue)}")
    assert at.selectbox[0].value == demo_result.best_signal  # default: the best signal
    assert len(at.get("image")) == 10  # one page of suspects
    at.text_input[0].input("ann").run()
    at.button(key=f"keep-{sid}").click().run()
    assert store.decisions_for([sid])[sid].decision == "keep"
    assert at.progress[0].text.startswith(f"Reviewed {before + 1} of {len(queue)}")
    assert any("label kept by ann" in m.value for m in at.markdown)
    next(b for b in at.button if b.label == "Undo my last action").click().run()
    assert store.decisions_for([sid]) == {}
    assert at.progress[0].text.startswith(f"Reviewed {before} of {len(queue)}")


def test_corruption_lab_shows_the_notebook_table(app, demo_run):
    at = app("corruption_lab")
    table = at.dataframe[0].value
    assert list(table["label"]) == demo_run.classes
    assert table["n_corrupted"].sum() == demo_run.flipped().sum()


def test_a_missing_run_is_a_clear_error(demo_run, runs_root, monkeypatch):
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "no-such-run"
    at.run()
    assert not at.exception
    assert "not a finished run directory" in at.error[0].value


@pytest.mark.parametrize("page", [None, "setup_run", "explorer", "test_set", "review_queue", "corruption_lab"])
def test_every_page_works_on_a_tiny_imagenet_run(tiny_run, runs_root, monkeypatch, page):
    compute_influence(tiny_run, DEFAULT_SETTINGS)
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"run": tiny_run.path.name})
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    run = at.query_params["run"]
    assert (run[0] if isinstance(run, list) else run) == tiny_run.path.name  # no fallback to the demo
