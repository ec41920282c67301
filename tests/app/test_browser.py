"""End to end in headless chromium: every page renders, review decisions persist and two reviewers lose nothing.

Serves ``app.py`` with ``streamlit run`` on a free port against the small cached demo run (influences
computed beforehand, so nothing trains), and saves screenshots under ``test-output/``.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest
from browsing import SHOTS, VIEWPORT, open_page, serve, settle

from influence_core.analysis import rank_suspects
from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence
from influence_core.review import ReviewStore
from influence_core.run import Run

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PAGES = {  # screenshot name: (address, text that shows once the page is drawn); the default page lives at /
    "overview": ("", "Flips found in the top 10 %"),
    "setup": ("setup_run", "Sample images per class"),
    "explorer": ("explorer?test=3", "Most helpful training images"),
    "test-set": ("test_set", "Per class: the most and least useful"),
    "review": ("review_queue", "Rank suspects by"),
    "corruption": ("corruption_lab", "Mean influence per label"),
    "before-and-after": ("compare", "Take the corrections elsewhere"),
}


def suspect(demo_run, rank: int) -> tuple[int, str]:
    """Training position and id of the suspect at ``rank`` (0-based) in the default review queue."""
    result = compute_influence(demo_run, DEFAULT_SETTINGS)
    pos = int(rank_suspects(result.signals[result.best_signal])[rank])
    return pos, demo_run.ids("train")[pos]


def review(tab, name: str, pos: int, action: str) -> None:
    """Type the reviewer name (if not yet there) and press ``action`` on the suspect at training position ``pos``."""
    settle(tab)  # the previous click's rerun must be over: its stale copy of the page still holds the buttons
    box = tab.get_by_role("textbox", name="Your name")
    if box.input_value() != name:
        box.fill(name)
        box.press("Enter")
        settle(tab)
    buttons = tab.locator(f".st-key-suspect-{pos}").get_by_role("button", name=action, exact=True)
    buttons.and_(tab.locator("button:enabled")).click()  # under load a disabled stale copy may still be on the page


def test_every_page_renders(browser, server):
    context = browser.new_context(viewport=VIEWPORT)
    for name, (page, text) in PAGES.items():
        tab = open_page(context, server, page, text)
        assert tab.locator('[data-testid="stException"]').count() == 0, name
        assert tab.locator('[data-testid="stAlertContentError"]').count() == 0, name
        assert tab.get_by_text("Page not found").count() == 0, name
        tab.screenshot(path=SHOTS / f"page-{name}.png", full_page=True)
        tab.close()
    context.close()


def test_pages_name_their_computation_and_the_review_buttons_say_what_they_move(browser, server):
    """Issue 29 items 19 and 3 as a reviewer sees them: each page with influence values says which computation they
    come from and their unit, the same as the sidebar; the focus buttons are named for the image they move to."""
    context = browser.new_context(viewport=VIEWPORT)
    for page, text in (
        ("explorer?test=3", "Most helpful training images"),
        ("test_set", "Per class: the most and least useful"),
        ("corruption_lab", "Mean influence per label"),
    ):
        tab = open_page(context, server, page, text)
        caption = tab.locator("p", has_text="Influence values on this page:").first.inner_text()
        assert "exact influence through the last layer" in caption and "the number of training images" in caption
        assert tab.locator('[data-testid="stSidebar"]').get_by_text("exact influence through the last layer").count()
        tab.close()
    tab = open_page(context, server, "review_queue", "Rank suspects by")
    for name in ("◀ Previous image", "Next image ▶"):
        assert tab.get_by_role("button", name=name, exact=True).count() == 1, name
    assert tab.get_by_role("button", name="Next", exact=True).count() == 0
    context.close()


def test_sidebar_navigation_keeps_the_run_in_the_url(browser, server):
    context = browser.new_context(viewport=VIEWPORT)
    tab = open_page(context, server, "", "Flips found in the top 10 %")
    tab.get_by_test_id("stSidebarNav").get_by_text("Whole test set").click()
    tab.get_by_text("Per class: the most and least useful").wait_for()
    tab.wait_for_url(re.compile(rf"/test_set\?(.*&)?run={re.escape(server[1])}"))
    context.close()


def test_saliency_shows_beside_the_training_image(browser, server):
    context = browser.new_context(viewport=VIEWPORT)
    tab = open_page(context, server, "explorer?test=3", "Most helpful training images")
    tab.get_by_role("button", name="Saliency").first.click()
    tab.get_by_text("Red pixels").wait_for()
    settle(tab)
    assert tab.locator('[data-testid="stException"]').count() == 0
    assert "test=3" in tab.url
    tab.screenshot(path=SHOTS / "explorer-saliency.png", full_page=True)
    context.close()


def test_review_decision_persists_after_reload(browser, server, demo_run):
    pos, sid = suspect(demo_run, 0)
    context = browser.new_context(viewport=VIEWPORT)
    tab = open_page(context, server, "review_queue", "Rank suspects by")
    review(tab, "ann", pos, "Keep")
    tab.locator(f".st-key-suspect-{pos}").get_by_text("✓ label kept").wait_for()
    settle(tab)
    assert "reviewer=ann" in tab.url
    tab.reload()
    tab.locator(f".st-key-suspect-{pos}").get_by_text("label kept by ann").wait_for()
    settle(tab)
    assert tab.get_by_role("textbox", name="Your name").input_value() == "ann"  # the name is in the URL
    tab.screenshot(path=SHOTS / "review-after-reload.png", full_page=True)
    assert ReviewStore.for_run(demo_run).decisions_for([sid])[sid].reviewer == "ann"
    context.close()


def test_two_reviewers_at_once_lose_nothing(browser, server, demo_run):
    names = {"bob": ("Skip", "skip"), "cat": ("Mislabeled", "mislabeled")}
    tabs = {
        name: open_page(browser.new_context(viewport=VIEWPORT), server, "review_queue", "Rank suspects by")
        for name in names
    }
    expected = {}
    for first_rank in (1, 3, 5):  # each round both reviewers click at once, then each sees their decision
        clicked = []
        for rank, name in enumerate(names, start=first_rank):
            pos, sid = suspect(demo_run, rank)
            button, decision = names[name]
            review(tabs[name], name, pos, button)
            expected[sid] = (name, decision)
            clicked.append((name, pos))
        for name, pos in clicked:
            tabs[name].locator(f".st-key-suspect-{pos}").get_by_text(f"by {name}").wait_for()
    found = ReviewStore.for_run(demo_run).decisions_for(expected)
    assert {sid: (a.reviewer, a.decision) for sid, a in found.items()} == expected
    settle(tabs["cat"])
    tabs["cat"].screenshot(path=SHOTS / "review-two-reviewers.png", full_page=True)
    for tab in tabs.values():
        tab.context.close()


def no_error_but(tab, text: str) -> None:
    """The page shows ``text`` in an error box, and no traceback nor "Page not found"."""
    tab.locator('[data-testid="stAlertContentError"]').get_by_text(text).first.wait_for()
    assert tab.locator('[data-testid="stException"]').count() == 0
    assert tab.get_by_text("Page not found").count() == 0


def test_a_deep_link_into_a_fresh_server_runs_inside_the_app(browser, demo_run, runs_root):
    """The first request of a new server is a link to the review page: it shows in the app's frame."""
    compute_influence(demo_run, DEFAULT_SETTINGS)
    with serve(runs_root, "streamlit-fresh.log") as base:
        tab = browser.new_context(viewport=VIEWPORT).new_page()
        tab.set_default_timeout(120_000)
        tab.goto(f"{base}/review_queue?run={demo_run.path.name}&reviewer=dee")
        tab.get_by_text("Rank suspects by").first.wait_for()
        settle(tab)
        assert tab.get_by_text("Page not found").count() == 0
        assert tab.get_by_test_id("stSidebarNav").get_by_text("Mislabel review").count() == 1  # app.py's frame
        assert tab.get_by_role("textbox", name="Your name").input_value() == "dee"  # app.py read the URL
        tab.screenshot(path=SHOTS / "deep-link-fresh-server.png", full_page=True)
        tab.context.close()


def test_links_outside_the_runs_root_are_refused(browser, server, runs_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(runs_root / server[1], elsewhere, ignore=shutil.ignore_patterns("influence", "reviews.sqlite*"))
    before = sorted(p.name for p in elsewhere.rglob("*"))
    context = browser.new_context(viewport=VIEWPORT)
    for ref in (str(elsewhere), f"../{elsewhere.name}"):
        for page in ("", "review_queue"):
            tab = context.new_page()
            tab.set_default_timeout(120_000)
            tab.goto(f"{server[0]}/{page}?run={ref}")
            no_error_but(tab, "outside the folders the app may open")
            assert str(tmp_path) not in tab.locator('[data-testid="stMain"]').inner_text()
            tab.close()
    assert sorted(p.name for p in elsewhere.rglob("*")) == before  # nothing computed or created there
    context.close()


def test_keyboard_shortcuts_decide_on_the_focused_suspect(browser, server, demo_run):
    ids = demo_run.ids("train")
    result = compute_influence(demo_run, DEFAULT_SETTINGS)
    first_page = rank_suspects(result.signals[result.best_signal], 10)
    decided = ReviewStore.for_run(demo_run).decisions_for([ids[p] for p in first_page])
    first = next(i for i, p in enumerate(first_page[:-1]) if ids[p] not in decided)  # the initial focus
    focused, target = int(first_page[first]), int(first_page[first + 1])
    context = browser.new_context(viewport=VIEWPORT)
    tab = open_page(context, server, "review_queue?reviewer=kim", "Rank suspects by")
    tab.locator("h1").first.click()  # focus on the page, not in a text box
    tab.keyboard.press("n")  # focus moves from the first undecided suspect to the next one ...
    tab.locator(f".st-key-suspect-{target}").get_by_text("▶").wait_for()  # as the reviewer sees it move
    settle(tab)
    tab.keyboard.press("k")  # ... and k keeps its label
    tab.locator(f".st-key-suspect-{target}").get_by_text("label kept by kim").wait_for()
    store = ReviewStore.for_run(demo_run)
    assert store.decisions_for([ids[target]])[ids[target]].reviewer == "kim"
    assert ids[focused] not in store.decisions_for([ids[focused]])
    tab.screenshot(path=SHOTS / "review-keyboard.png", full_page=True)
    context.close()


@pytest.mark.slow
def test_quick_keys_decide_on_the_image_the_focus_moved_to(browser, server, demo_run, runs_root):
    """Issue 29: `k n m n s` typed at once stored keep on #1, mislabeled on #3 and then skip on #3 again (the focus
    jumped back after each decision), losing the correction. Now: keep #1, mislabeled #3, skip #5, exclude (x)
    #6, nothing on #2 and #4. On a fresh copy of the demo run, so no other test's decisions move the focus."""
    shutil.copytree(demo_run.path, runs_root / "keys", ignore=shutil.ignore_patterns("reviews.sqlite*"))
    run = Run(runs_root / "keys")
    ids = run.ids("train")
    result = compute_influence(run, DEFAULT_SETTINGS)
    ranked = [ids[p] for p in rank_suspects(result.signals[result.best_signal], 10)]
    context = browser.new_context(viewport=VIEWPORT)
    tab = open_page(context, (server[0], "keys"), "review_queue?reviewer=kim", "Rank suspects by")
    assert tab.get_by_role("button", name="Next image ▶").count() == 1  # named for what they do (item 3)
    tab.locator("h1").first.click()  # focus on the page, not in a text box
    for key in "knmnsx":  # as fast as a reviewer types: no waiting between keys
        tab.keyboard.press(key)
    store = ReviewStore.for_run(run)
    deadline = time.monotonic() + 120
    while len(store.current()) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    settle(tab)
    found = {ranked.index(s) + 1: a.decision for s, a in store.decisions_for(ranked).items()}
    assert found == {1: "keep", 3: "mislabeled", 5: "skip", 6: "exclude"}
    assert len(store.history()) == 4  # nothing overwritten on the way
    tab.get_by_text("⊘ excluded from training by kim").wait_for()
    tab.screenshot(path=SHOTS / "review-quick-keys.png", full_page=True)

    other = open_page(context, (server[0], "keys"), "review_queue?reviewer=lee", "Rank suspects by")
    store.record(ranked[1], "exclude", "**bold** [x](javascript:alert(1))", idempotency_key="browser-1")
    # another reviewer's decision shows without a click, and the name as typed, not as a link (items 2 and 4)
    other.get_by_text("⊘ excluded from training by **bold** [x](javascript:alert(1))").wait_for(timeout=30_000)
    assert other.locator("a[href^='javascript']").count() == 0
    context.close()
