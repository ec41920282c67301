"""The explorer, whole-test-set and corruption-lab pages in headless chromium: clicks, layout and speed.

Uses the demo server of ``test_browser.py`` (its runs root also holds a synthetic 1,000 × 10,000 run written by
hand, see ``_synthetic_run.py``) and saves screenshots under ``test-output/``.
"""

from __future__ import annotations

import pytest
from test_browser import SHOTS, VIEWPORT, browser, server, settle  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser


def open_tab(browser, base: str, page: str, run: str, text: str):  # noqa: F811
    """A fresh tab on ``page`` of ``run`` (``page`` may carry a query), once ``text`` shows and the run settled."""
    tab = browser.new_context(viewport=VIEWPORT).new_page()
    tab.set_default_timeout(120_000)
    tab.goto(f"{base}/{page}{'&' if '?' in page else '?'}run={run}")
    tab.get_by_text(text).first.wait_for()
    settle(tab)
    return tab


def test_first_click_on_all_keeps_the_test_image_picker_open(browser, server):  # noqa: F811
    base, run = server
    tab = open_tab(browser, base, "explorer", run, "Most helpful training images")
    inspect = tab.get_by_role("button", name="Inspect")
    assert inspect.first.is_visible()
    tab.get_by_role("radio", name="all", exact=True).click()
    settle(tab)
    assert inspect.first.is_visible(), "the picker collapsed on the first click"
    tab.screenshot(path=SHOTS / "explorer-picker-all.png", full_page=True)
    tab.context.close()
