"""The retraining check on the explorer and the list of checks on Overview, in ``AppTest`` on a synthetic run
(no model: the retraining is replaced by fixed logits, everything else is the app's)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from _synthetic_run import make_synthetic_run
from streamlit.testing.v1 import AppTest

from influence_core import counterfactual as cf
from influence_core.pipeline import load_influence

APP = Path(__file__).resolve().parents[2] / "app.py"


@pytest.fixture
def app(tmp_path, monkeypatch):
    """(open(page, **params) -> AppTest, run) on a synthetic 3-class run."""
    run = make_synthetic_run(tmp_path / "runs" / "small", tmp_path / "data", n_classes=3, n_train=200, n_test=12)
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(tmp_path / "runs"))

    def open_page(name: str, **params) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.query_params.update({"run": "small", **params})
        at.run()
        at.switch_page(f"pages/{name}.py").run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        return at

    return open_page, run


def test_explorer_button_checks_the_image_and_the_random_control_then_overview_lists_them(app, monkeypatch):
    """Guards the explorer section: the button runs the image's own direction and the random control in the
    background, shows predicted against measured, and Overview lists the checks with the summary line."""
    open_page, run = app
    probs, labels = run.predictions["probs_test"], run.labels("test")
    test = int(np.flatnonzero(probs.argmax(1) == labels)[0])
    other = (int(labels[test]) + 1) % 3
    trainings = []

    def fake_recipe(run_, test_, device, progress):  # the retrained model predicts another class
        def retrain(exclude):
            trainings.append(int(exclude.sum()))
            return np.eye(3)[other] * 9.0 if len(trainings) == 1 else np.eye(3)[int(labels[test])] * 9.0

        return retrain

    monkeypatch.setattr(cf, "_recipe", fake_recipe)
    at = open_page("explorer", test=str(test))
    assert not [e for e in at.expander if "Retraining checks" in e.label]  # nothing checked yet
    button = at.button(key=f"check-run-{test}")
    assert "retrain twice" in button.label
    button.click().run()
    deadline = time.time() + 60
    while len(cf.checks(run)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    k = cf.choose_k(load_influence(run), test, "helpful")[0]
    assert trainings == [k, k]
    table = next(d.value for d in at.dataframe if "loss change, measured" in d.value.columns)
    assert list(table["removed"]) == [f"{k} most helpful", f"{k} random, same labels"]
    assert table["prediction"].iloc[0].endswith("(flipped)") and not table["prediction"].iloc[1].endswith("(flipped)")
    assert table["loss change, predicted"].iloc[0] > 0  # removing helpful images is predicted to raise the loss
    overview = open_page("overview")
    labels_shown = [e.label for e in overview.expander]
    summary = f"k = {k} removed → prediction flipped in 1 of 1 checks, random removal flipped it in 0 of 1"
    assert f"Retraining checks of the rankings: {summary}" in labels_shown
    assert [b.proto.label for b in overview.get("download_button") if b.proto.id.endswith("html-report")] == [
        "Download the report (HTML, opens offline)"
    ]
