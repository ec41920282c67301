"""The app's pages, and how a page script run on its own hands over to ``app.py``.

Streamlit treats a ``pages/`` folder beside the entrypoint as a legacy (v1) multipage app until some session
calls ``st.navigation``; from then on it ignores the folder ("As soon as any session of your app executes the
st.navigation command, your app will ignore the pages/ directory", ``st.navigation`` docs). So the first link
into a freshly started server (e.g. ``/review_queue?run=…``) runs ``pages/review_queue.py`` on its own, without
``app.py``'s frame (URL state, sidebar, clear errors). Moving the page scripts to a sub-folder the legacy
mechanism does not scan is no cure: the legacy router then finds no page for the link and shows "Page not
found" before ``app.py`` runs. Streamlit has no setting for this; its maintainers saw the behaviour when making
``st.navigation`` the default (streamlit/streamlit#10276, review discussion). The workaround below uses no
private API: a page that finds itself outside the frame runs ``app.py`` in its place, whose ``st.navigation``
call switches the server to ``st.navigation`` for good and runs the same page inside the frame, then stops.
(A rerun instead would drop the click that started this run.) So every page calls :func:`require_frame` (through
:func:`pages.ui.runs.current_run`) before it draws anything. Tested with Streamlit 1.67 (the range pinned in
``pyproject.toml``); ``AppTest`` starts every run in legacy mode, so the app tests exercise it on each run.
"""

from __future__ import annotations

import runpy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

APP_SCRIPT = Path(__file__).resolve().parents[2] / "app.py"

_frame = threading.local()  # .active: app.py is running a page in this script thread


def app_pages() -> list:
    """The pages of the app, in sidebar order (``st.Page`` objects; the first is the default)."""
    return [
        st.Page("pages/overview.py", title="Overview", icon=":material/home:", default=True),
        st.Page("pages/setup_run.py", title="Data & model", icon=":material/tune:"),
        st.Page("pages/explorer.py", title="Test image explorer", icon=":material/image_search:"),
        st.Page("pages/test_set.py", title="Whole test set", icon=":material/bar_chart:"),
        st.Page("pages/review_queue.py", title="Mislabel review", icon=":material/fact_check:"),
        st.Page("pages/compare.py", title="Before and after", icon=":material/compare_arrows:"),
        st.Page("pages/corruption_lab.py", title="Corruption lab", icon=":material/science:"),
    ]


@contextmanager
def framed() -> Iterator[None]:
    """``app.py`` runs the page inside this block (one script thread runs one page at a time)."""
    _frame.active = True
    try:
        yield
    finally:
        _frame.active = False


def require_frame() -> None:
    """If Streamlit's legacy ``pages/`` mechanism ran this page on its own: run ``app.py`` (which runs this
    page inside its frame), then stop this run of the page."""
    if not getattr(_frame, "active", False):
        runpy.run_path(str(APP_SCRIPT), run_name="__main__")
        st.stop()
