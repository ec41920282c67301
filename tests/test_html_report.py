"""The offline HTML report (:mod:`influence_core.html_report`, ``influence-core report --html``) on synthetic runs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _synthetic_run import make_synthetic_run
from browsing import open_offline

from influence_core import counterfactual as cf
from influence_core import html_report as html_report_module
from influence_core.cli import main
from influence_core.html_report import html_report
from influence_core.pipeline import load_influence
from influence_core.review import ReviewStore

MAX_BYTES = 10_000_000


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    """A synthetic 1,100-image run (32 px) with two retraining checks and one review decision."""
    root = tmp_path_factory.mktemp("report")
    run = make_synthetic_run(root / "runs" / "r", root / "data", n_classes=10, n_train=800, n_test=200, image_size=32)
    result = load_influence(run)
    for direction in ("helpful", "random"):  # the retraining is replaced by fixed logits
        cf.run_check(result, 5, k=7, direction=direction, retrain=lambda exclude: np.eye(10)[3] * 9.0)
    suspect = run.ids("train")[int(np.argmax(result.signals[result.best_signal]))]
    ReviewStore.for_run(run).record(suspect, "mislabeled", "ana", "class-004", idempotency_key="report-test")
    return run


def test_report_holds_every_section_and_embeds_its_images(checked_run):
    """Guards the contents: run, detection, suspects with their decision, test images, checks; no linked file."""
    text = html_report(checked_run)
    for heading in (
        "The run",
        "Finding wrong labels",
        "Most suspicious training images",
        "What the model learned from",
        "Retraining checks",
    ):
        assert f"<h2>{heading}" in text, heading
    assert "reviewed: mislabeled" in text
    assert "folder (data)" in text and str(checked_run.path.parents[1]) not in text  # no place on this machine
    assert "k = 7 removed → prediction flipped in" in text and "random removal flipped it in" in text
    assert text.count("Plotly.newPlot") == 5  # the detection curve and four test images' histograms
    assert text.count("<script>") == 1 + 5  # plotly's library once, then one call per figure
    body = text.split("</head>", 1)[1]  # the head holds plotly's library, whose code names URLs it never loads
    sources = re.findall(r'(?:src|href)="([^"]*)"', body)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), set(sources) - {""}


def test_child_run_gets_a_before_after_section(checked_run, monkeypatch):
    """Guards the lineage section: shown for a child run (its numbers from compare_runs), left out for others.
    tests/test_fixes.py checks it on a real child run."""
    assert "Before and after" not in html_report(checked_run)
    monkeypatch.setitem(checked_run.config, "lineage", {"parent": "p", "relabelled": 12, "excluded": 3})
    d = {"before": 0.8, "after": 0.85, "difference": 0.05, "low": 0.01, "high": 0.09}
    monkeypatch.setattr(
        html_report_module,
        "compare_runs",
        lambda run: {
            "before": {"name": "parent-run"},
            "after": {"name": "child-run"},
            "difference": {"accuracy": d, "f1": d},
            "changes": {"relabelled": 12, "excluded": 3},
            "fixed": ["a", "b"],
            "broken": [],
            "per_class": [{"class": "x", "recall_before": 0.5, "recall_after": 0.75}],
        },
    )
    text = html_report(checked_run)
    assert "<h2>Before and after the corrections" in text
    assert "child-run was trained from parent-run with 12 labels corrected and 3 images left out" in text
    assert "+0.050 (+0.010 to +0.090)" in text and "2 predictions became right" in text


@pytest.mark.browser
@pytest.mark.slow
def test_report_opens_offline_in_chromium_and_draws_its_plots(checked_run, browser, tmp_path, capsys):
    """Guards "a report that travels": written by the CLI, under 10 MB for a 1,000-image run, and in chromium with
    every network request refused none is made while the plots draw and every thumbnail decodes."""
    out = tmp_path / "report.html"
    assert main(["report", "--run-dir", str(checked_run.path), "--html", str(out)]) == 0
    assert "opens offline" in capsys.readouterr().err
    assert out.stat().st_size < MAX_BYTES
    opened = open_offline(browser, out, plots=5)
    assert opened["plots"] == 5 and opened["images_decoded"] and opened["marks"] > 0
    assert opened["requests"] == [] and opened["errors"] == []
