"""Issue 27's flow end to end in headless chromium, on the digits demo and on real tiny-imagenet images (goldfish
vs lemon): pick a test image in the explorer, check its ranking by retraining (with the random control), find the
check listed on Overview, download the HTML report and open it with the network off."""

from __future__ import annotations

import numpy as np
import pytest
from browsing import SHOTS, VIEWPORT, influence_copy, open_offline, serve, settle

from influence_core import counterfactual as cf
from influence_core.run import Run

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module", params=["demo_run", "tiny_run"])
def check_run(request, runs_root) -> Run:
    """A copy of the demo run (or of goldfish vs lemon) with its influences and no checks yet."""
    dest = runs_root / f"browser-check-{request.param}"
    return influence_copy(request.getfixturevalue(request.param), dest, "reviews.sqlite*", "checks")


def test_check_by_retraining_then_overview_then_the_offline_report(browser, check_run, runs_root, tmp_path):
    run = check_run
    probs, labels = run.predictions["probs_test"], run.labels("test")
    test = int(np.flatnonzero(probs.argmax(1) == labels)[0])
    assert cf.checks(run) == []
    with serve(runs_root, "streamlit-checks.log") as base:
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        tab = context.new_page()
        tab.set_default_timeout(600_000)  # two retrainings run while the page waits
        tab.goto(f"{base}/explorer?run={run.path.name}&test={test}")
        tab.locator(f".st-key-check-run-{test} button").first.wait_for()
        settle(tab)  # a rerun in flight may still show a stale copy of the button
        button = tab.locator(f".st-key-check-run-{test} button").and_(tab.locator("button:enabled")).first
        assert "random images, retrain twice" in button.inner_text()
        button.click()
        tab.get_by_text("Loss: the test image's loss (nats)").wait_for()
        found = cf.checks(run)
        assert sorted(c.direction for c in found) == ["helpful", "random"] and {c.test for c in found} == {test}
        line = f"Retraining checks of the rankings: {cf.summary(found)}"
        tab.get_by_text(line).first.wait_for()  # listed on the explorer
        settle(tab)
        tab.screenshot(path=SHOTS / f"check-{run.path.name}.png", full_page=True)

        tab.goto(f"{base}/?run={run.path.name}")
        tab.get_by_text(line).first.wait_for()  # and on Overview
        settle(tab)
        with tab.expect_download() as download:
            tab.get_by_role("button", name="Download the report (HTML, opens offline)").click()
        report = tmp_path / "report.html"
        download.value.save_as(report)
        context.close()
    text = report.read_text()
    assert f"#{test}" in text and "random" in text  # the checks are in the report
    opened = open_offline(browser, report, plots=text.count('class="plotly-graph-div"'))
    assert opened["plots"] >= 3 and opened["images_decoded"] and opened["marks"] > 0
    assert opened["requests"] == [] and opened["errors"] == []
