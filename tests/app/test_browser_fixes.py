"""End to end in headless chromium: decide on suspects, press *Retrain with N decisions*, land on the corrected
run's before / after view, download the corrected training set, and keep reviewing in the corrected run; on the
digits demo and on real tiny-imagenet images (goldfish vs lemon)."""

from __future__ import annotations

import io
import zipfile
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest
from browsing import SHOTS, VIEWPORT, influence_copy, serve, settle
from test_browser import review, suspect

from influence_core.fixes import lineage
from influence_core.review import ReviewStore
from influence_core.run import Run

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module", params=["demo_run", "tiny_run"])
def loop_run(request, runs_root) -> Run:
    """A copy of the demo run (or of goldfish vs lemon) with its influences and an empty review store."""
    dest = runs_root / f"browser-loop-{request.param}"
    return influence_copy(request.getfixturevalue(request.param), dest, "reviews.sqlite*")


def test_review_retrain_compare_export_and_keep_reviewing(browser, loop_run, runs_root):
    (first, first_id), (second, second_id) = suspect(loop_run, 0), suspect(loop_run, 1)
    with serve(runs_root, "streamlit-fixes.log") as base:
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        tab = context.new_page()
        tab.set_default_timeout(600_000)  # the retraining runs while the page waits
        tab.goto(f"{base}/review_queue?run={loop_run.path.name}")
        tab.get_by_text("Rank suspects by").first.wait_for()
        review(tab, "eve", first, "Mislabeled")
        tab.locator(f".st-key-suspect-{first}").get_by_text("mislabeled →").first.wait_for()
        review(tab, "eve", second, "Exclude")
        tab.locator(f".st-key-suspect-{second}").get_by_text("excluded").first.wait_for()
        settle(tab)
        tab.get_by_role("button", name="Retrain with 2 decisions").click()
        tab.get_by_text("We corrected 1 label(s) and left out 1 image(s)").wait_for()
        settle(tab)
        assert "/compare" in tab.url
        tab.get_by_text("95 % interval").first.wait_for()
        tab.screenshot(path=SHOTS / f"before-and-after-{loop_run.path.name}.png", full_page=True)
        child = Run(runs_root / parse_qs(urlparse(tab.url).query)["run"][0])
        assert lineage(child)["parent_key"] == loop_run.key and second_id not in child.ids("train")

        tab.get_by_role("button", name="Prepare the corrected training set (zip)").click()
        settle(tab)
        with tab.expect_download() as download:
            tab.get_by_role("button", name="Download the corrected training set").click()
        with zipfile.ZipFile(io.BytesIO(open(download.value.path(), "rb").read())) as z:
            manifest_name = next(n for n in z.namelist() if n.endswith("manifest.csv"))
            manifest = pd.read_csv(z.open(manifest_name), dtype=str, keep_default_na=False)
        assert len(manifest) == len(child.ids("train")) and manifest["decision"].eq("mislabeled").sum() == 1

        # keep reviewing in the corrected run: the earlier decision shows there, a new one lands in its store
        tab.goto(f"{base}/review_queue?run={child.path.name}&reviewer=eve")
        tab.get_by_text("Rank suspects by").first.wait_for()
        settle(tab)
        new_pos, new_id = next(
            (p, i) for p, i in (suspect(child, r) for r in range(10)) if i not in (first_id, second_id)
        )
        assert tab.locator(f".st-key-suspect-{first}").count() == 0  # decided before retraining: hidden here
        review(tab, "eve", new_pos, "Keep")
        tab.locator(f".st-key-suspect-{new_pos}").wait_for(state="detached")  # decided: it leaves the queue
        decisions = ReviewStore.for_run(child).decisions_for([first_id, new_id])
        assert decisions[first_id].decision == "mislabeled" and decisions[new_id].decision == "keep"
        context.close()
