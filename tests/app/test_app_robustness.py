"""The app on damaged or changed synthetic runs (``AppTest``, no training): one clear message in place of a
traceback, never a stale result, class names shown as text, and a run whose data moved re-pointed from the page
(issue 29, items 8-10, 14, 15 and 17)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _synthetic_run import make_synthetic_run
from streamlit.testing.v1 import AppTest

from influence_core.paths import RunPaths

APP = Path(__file__).resolve().parents[2] / "app.py"


@pytest.fixture
def runs_root(tmp_path, monkeypatch) -> Path:
    """A runs root holding one small synthetic run ``run`` (its data in ``tmp_path / "data"``)."""
    make_synthetic_run(tmp_path / "runs" / "run", tmp_path / "data", n_classes=4, n_train=60, n_test=16)
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def open_page(page: str, run: str = "run", at: AppTest | None = None) -> AppTest:
    at = at or AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"run": run})
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def edit_config(runs_root: Path, **fields) -> None:
    path = RunPaths(runs_root / "run").config
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def test_a_link_with_a_null_byte_is_refused_without_server_paths(runs_root):
    # guards: ?run=gl%00x showed "ValueError: embedded null byte" with server paths
    at = open_page("overview", run="gl\x00x")
    assert any("outside the folders the app may open" in e for e in errors(at)), errors(at)
    assert not any(str(runs_root.parent) in e for e in errors(at))


@pytest.mark.parametrize("page", ["overview", "setup_run", "explorer"])
def test_a_config_field_of_the_wrong_type_is_a_clear_message(runs_root, page):
    # guards: "classes": 5 in config.json gave a TypeError on three pages
    edit_config(runs_root, classes=5)
    at = open_page(page)
    assert any("config.json is malformed" in e and "classes must be" in e for e in errors(at)), errors(at)


@pytest.mark.parametrize("page", ["overview", "review_queue"])
def test_nan_losses_are_refused_not_ranked(runs_root, page):
    # guards: Overview raised "Input contains NaN"; the review queue ranked by "Score nan" in file order
    paths = RunPaths(runs_root / "run")
    with np.load(paths.dynamics) as f:
        dynamics = {k: f[k] for k in f.files}
    dynamics["loss"][1, 5] = np.nan
    np.savez(paths.dynamics, **dynamics)
    at = open_page(page)
    assert any("not finite numbers" in e for e in errors(at)), errors(at)
    assert "score nan" not in " ".join(str(m.value) for m in [*at.markdown, *at.caption]).lower()


def test_an_edited_label_is_never_shown_with_the_old_influence(runs_root):
    # guards: the app kept the run (and its influence entry) of the labels it first opened
    at = open_page("explorer")
    assert not errors(at) and at.get("plotly_chart")
    samples_path = RunPaths(runs_root / "run").samples
    samples = pd.read_csv(samples_path, dtype={"id": str})
    first = samples.index[samples["split"] == "train"][0]
    samples.loc[first, "label"] = (samples.loc[first, "label"] + 1) % 4
    samples.to_csv(samples_path, index=False)
    at = open_page("explorer")
    # the synthetic run has no model, so computing the influence for the new labels fails, with a message
    from pages.ui.runs import job_registry

    for job in job_registry().running():
        assert job.wait(120), job
    at.run()
    assert not at.exception, at.exception
    assert not at.get("plotly_chart"), "a chart of the old labels' influence is shown"


def test_class_names_are_shown_as_text_in_charts(runs_root):
    # guards: Plotly rendered "<b>bold" in a class name as bold text in the confusion matrix
    edit_config(runs_root, classes=["<b>bold", "a<br>b", "100%{x}", "plain"])
    at = open_page("setup_run")
    assert not errors(at), errors(at)
    spec = " ".join(chart.proto.spec for chart in at.get("plotly_chart"))
    assert "&lt;b&gt;bold" in spec and "a&lt;br&gt;b" in spec and "100&#37;{x}" in spec
    assert "<b>bold" not in spec and "a<br>b" not in spec


def test_a_run_whose_data_moved_is_repointed_from_the_page(runs_root, tmp_path):
    # guards: the page said "copy the data to the same path" and offered no way to point the run elsewhere
    shutil.move(tmp_path / "data", tmp_path / "moved")
    at = open_page("setup_run")
    assert any("cannot be opened here" in e and "repoint" in e for e in errors(at)), errors(at)
    at.text_input(key="repoint-run").input(f"folder:{tmp_path / 'nowhere'}")
    at.button(key="repoint-button-run").click().run()
    assert not at.exception and any("does not exist" in e for e in errors(at)), errors(at)
    at.text_input(key="repoint-run").input(f"folder:{tmp_path / 'moved'}")
    at.button(key="repoint-button-run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    assert json.loads(RunPaths(runs_root / "run").config.read_text())["dataset"] == f"folder:{tmp_path / 'moved'}"
