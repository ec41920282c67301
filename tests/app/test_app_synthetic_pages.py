"""Explorer, whole test set and corruption lab in ``AppTest`` on synthetic runs written by hand (no training).

``small``: 10 classes, 400 / 80 images, 10 % flipped labels of which half *help* the test set (so "most helpful"
lists can hold flipped images, as on the demo). ``many``: 200 classes, 2,000 / 200 images.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from _synthetic_run import make_synthetic_run
from streamlit.testing.v1 import AppTest

from influence_core.analysis import corruption_table, detection_metrics
from influence_core.display import finding_words
from influence_core.pipeline import load_influence

APP = Path(__file__).resolve().parents[2] / "app.py"


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Runs root holding the ``small`` and ``many`` runs: (root, {name: (run, result)})."""
    root = tmp_path_factory.mktemp("synthetic")
    runs = {}
    for name, shape, helpful in (("small", (10, 400, 80), 0.5), ("many", (200, 2000, 200), 0.0)):
        run = make_synthetic_run(root / "runs" / name, root / f"data-{name}", *shape, helpful_flips=helpful)
        runs[name] = (run, load_influence(run))
    return root / "runs", runs


@pytest.fixture
def page(synthetic_runs, monkeypatch):
    """Open ``page`` of a synthetic run (already run once, no exception, no error box)."""
    root, _ = synthetic_runs
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(root))

    def open_page(name: str, run: str, **params) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.query_params.update({"run": run, **params})
        at.run()
        at.switch_page(f"pages/{name}.py").run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        assert len(at.title) == 1, [t.value for t in at.title]  # drawn once, inside app.py's frame
        return at

    return open_page


def captions(at: AppTest) -> list[str]:
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


def figure(at: AppTest, index: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def values(array) -> np.ndarray:
    """A figure's array as numpy: plotly sends numpy arrays base64-encoded (``{"dtype", "bdata"}``)."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array)


def test_explorer_captions_say_what_each_number_is_and_mark_flips(page, synthetic_runs):
    run, result = synthetic_runs[1]["small"]
    at = page("explorer", "small", test="5")
    helpful = result.top_helpful(5, 8)[0]
    caps = [c for c in captions(at) if c.startswith("influence ")]
    assert len(caps) == 16  # 8 helpful + 8 harmful
    first = caps[0]
    assert re.match(r"influence [+-][\d,.]+ · trained as class-\d{3}", first) and " · id " in first
    flipped, true = run.flipped(), run.true_labels("train")
    for p, cap in zip(helpful, caps[:8], strict=True):
        assert ("⚑ flipped" in cap) == flipped[p]
        assert (f"(really {run.classes[true[p]]})" in cap) == flipped[p]
    note = f"{flipped[helpful].sum()} of the 8 images listed"
    assert any(c.value.startswith(note) for c in at.caption), [c.value for c in at.caption]


def test_explorer_histogram_shows_own_label_predicted_and_the_rest_with_200_classes(page, synthetic_runs):
    run, _ = synthetic_runs[1]["many"]
    at = page("explorer", "many", test="3")
    true, pred = run.labels("test")[3], run.predictions["probs_test"][3].argmax()
    names = [t["name"] for t in figure(at)["data"] if t["type"] == "bar"]
    expected = [f"{run.classes[true]} (this test image's label)"]
    expected += [f"{run.classes[pred]} (predicted)"] if pred != true else []
    assert names == expected + ["all other labels"]
    assert any("extreme values are left out" in c.value for c in at.caption)  # the synthetic outliers
    assert next(s for s in at.selectbox if s.label.startswith("Class")).label == "Class (type to search)"


def test_first_click_on_all_keeps_the_picker_open(page):
    at = page("explorer", "small")
    assert at.expander[0].proto.expanded
    at.get("button_group")[0].set_value("all").run()
    assert not at.exception
    assert at.expander[0].proto.expanded, "the picker was folded away on the first click"


def test_whole_test_set_titles_claim_clear_examples_only_when_no_flip_is_listed(page, synthetic_runs):
    run, result = synthetic_runs[1]["small"]
    mean, labels, flipped = result.mean_influence, run.labels("train"), run.flipped()
    at = page("test_set", "small")

    def highest_flipped(c: int) -> int:
        members = np.flatnonzero(labels == c)
        return int(flipped[members[np.argsort(-mean[members], kind="stable")[:8]]].sum())

    dirty = next(c for c in range(run.n_classes) if highest_flipped(c) > 0)
    clean = next(c for c in range(run.n_classes) if highest_flipped(c) == 0)
    for c in (dirty, clean):
        next(s for s in at.selectbox if s.label.startswith("Training label")).set_value(c).run()
        heading = next(m.value for m in at.markdown if m.value.startswith("**Highest mean influence"))
        assert ("clearest" in heading) == (c == clean), heading
        assert any(x.value.startswith(f"{highest_flipped(c)} of the 8 images listed") for x in at.caption)


def test_whole_test_set_histogram_gives_each_label_its_own_row_and_scale(page, synthetic_runs):
    run, result = synthetic_runs[1]["small"]
    fig = figure(page("test_set", "small"))
    bars = [t for t in fig["data"] if t["type"] == "bar"]
    assert [t["name"] for t in bars] == run.classes  # every label on its own with 10 classes
    assert sorted(t["base"] for t in bars) == list(range(run.n_classes))  # one row each, no overlap
    labels = run.labels("train")
    axis = fig["layout"]["yaxis"]
    ticks = dict(zip(values(axis["tickvals"]).tolist(), axis["ticktext"], strict=True))
    for c, trace in enumerate(bars):
        counts, heights = values(trace["customdata"]), values(trace["y"])
        assert counts.sum() <= (labels == c).sum()  # inside the x-range; the rest is counted in the caption
        assert heights.max() == pytest.approx(0.9)  # scaled to its own tallest bar
        assert np.allclose(heights / 0.9 * counts.max(), counts)
        assert ticks[trace["base"]].startswith(f"{run.classes[c]} — {(labels == c).sum():,} images")


def test_whole_test_set_with_200_classes_pools_labels_and_pages_the_table(page, synthetic_runs):
    run, _ = synthetic_runs[1]["many"]
    at = page("test_set", "many")
    assert [t["name"] for t in figure(at)["data"] if t["type"] == "bar"] == ["all labels"]
    assert len(at.dataframe[0].value) == 50
    assert next(n for n in at.number_input if n.label.startswith("Page")).label.startswith("Page (of 40;")
    picker = at.multiselect[0]
    picker.set_value([7, 9]).run()
    names = [t["name"] for t in figure(at)["data"] if t["type"] == "bar"]
    assert names == ["class-007", "class-009", "all other labels"]


def test_corruption_lab_checks_the_notebooks_claim_on_the_runs_numbers(page, synthetic_runs):
    for name in ("small", "many"):
        run, result = synthetic_runs[1][name]
        at = page("corruption_lab", name)
        mean, flipped = result.mean_influence, run.flipped()
        auroc = detection_metrics(-mean, flipped)["auroc"]
        table = corruption_table(mean, run.labels("train"), flipped, run.classes)
        tested = table[(table["n_clean"] > 0) & (table["n_corrupted"] > 0)]
        held = int((tested["mean_corrupted"] < tested["mean_clean"]).sum())
        verdict = next(b.value for b in [*at.success, *at.warning] if "The claim" in b.value)
        assert finding_words(auroc) in verdict and "AUROC" not in verdict  # plain words; the figure in help
        assert f"AUROC {auroc:.2f}" in next(c.help for c in at.caption if c.help and "AUROC" in c.help)
        assert f"in {held} of {len(tested)} labels" in verdict
        assert "chosen at random" in verdict  # the run's corruption mode and what it implies
        assert ("**held**" in verdict) == (name == "many")  # small: half the flips help
        assert len({x for t in figure(at, 0)["data"] for x in t["x"]}) == min(10, run.n_classes)  # box plot labels
        assert len(at.dataframe[0].value) == min(20, run.n_classes)  # one page of the per-label table


def test_setup_page_with_200_classes_shows_ten_classes_and_a_searchable_picker(page, synthetic_runs):
    run, _ = synthetic_runs[1]["many"]
    at = page("setup_run", "many")
    picker = next(m for m in at.multiselect if m.label.startswith("Classes to show"))
    assert picker.value == list(range(10)) and "200 in all" in picker.label
    shown = [m.value for m in at.markdown if m.value.startswith("**class-")]
    assert shown == [f"**{run.classes[c]}**" for c in range(10)]
    picker.set_value([150]).run()
    assert [m.value for m in at.markdown if m.value.startswith("**class-")] == [f"**{run.classes[150]}**"]
    assert not any(
        m.label.startswith("Classes to show") for m in page("setup_run", "small").multiselect
    )  # 10 classes: all shown
