"""Helpers of the browser tests (fixtures ``browser`` and ``server`` are in ``conftest.py``): a fresh
``streamlit run app.py`` on a free port, addresses and waiting for Streamlit to settle in headless chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence
from influence_core.run import Run

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-output"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 2400}  # Streamlit scrolls inside the page: a tall window shows it all


def need(what: str, reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} missing in CI: {reason}")
    pytest.skip(f"{what} missing: {reason}")


@contextmanager
def serve(runs_root: Path, log_name: str = "streamlit.log"):
    """A freshly started ``streamlit run app.py`` on a free port over ``runs_root``: yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, INFLUENCE_LENS_RUNS=str(runs_root))
    SHOTS.mkdir(exist_ok=True)
    log = open(SHOTS / log_name, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--browser.gatherUsageStats",
            "false",
            "--server.fileWatcherType",
            "none",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start within 60 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def url(server: tuple[str, str], page: str) -> str:
    """The address of ``page`` (``path?query``) on the demo run."""
    base, run = server
    return f"{base}/{page}{'&' if '?' in page else '?'}run={run}"


def open_page(context, server, page: str, text: str):
    """Open ``page`` and wait until ``text`` shows and the script has finished running."""
    tab = context.new_page()
    tab.set_default_timeout(120_000)
    tab.goto(url(server, page))
    tab.get_by_text(text).first.wait_for()
    settle(tab)
    return tab


def settle(tab) -> None:
    """Wait until Streamlit has no script run in flight and every element has replaced its placeholder."""
    tab.wait_for_timeout(300)
    tab.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")
    tab.wait_for_function("() => !document.querySelector('[data-testid=\"stSkeleton\"]')")
    tab.wait_for_timeout(500)


def open_offline(browser, path: Path, plots: int) -> dict:
    """Open the HTML file ``path`` in a chromium context whose every network request is refused; wait until
    ``plots`` plotly charts have drawn. Returns ``{"requests": refused URLs, "errors": page errors, "plots": n,
    "images_decoded": bool, "marks": drawn bars and lines}``."""
    context = browser.new_context(offline=True)
    refused: list[str] = []

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {plots}", timeout=60_000)
    found = {
        "requests": refused,
        "errors": errors,
        "plots": page.evaluate("document.querySelectorAll('.js-plotly-plot').length"),
        "images_decoded": page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)"),
        "marks": page.evaluate(
            "document.querySelectorAll('.js-plotly-plot .bars .point, .js-plotly-plot .scatter').length"
        ),
    }
    context.close()
    return found


def influence_copy(run: Run, dest: Path, *ignore: str) -> Run:
    """A copy of ``run`` (its influences computed first) at ``dest``, without the files matching ``ignore``."""
    compute_influence(run, DEFAULT_SETTINGS)
    shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns(*ignore))
    return Run(dest)
