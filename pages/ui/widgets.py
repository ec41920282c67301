"""Widgets shared by the pages: the run picker, errors, downloads, tables and image grids."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from influence_core import InfluenceLensError, Run
from influence_core.display import computation, export_csv, influence_unit, pages, short_id
from influence_core.jobs import user_error
from influence_core.pipeline import InfluenceSettings
from influence_core.run import DatasetMovedError

from .runs import (
    DEMO_CONFIG,
    RUNS_ENV,
    job_registry,
    list_runs,
    repoint_form,
    resolve_ref,
    run_dir_for,
    run_ref,
    select_run,
)
from .state import settings

log = logging.getLogger(__name__)


def run_picker() -> None:
    """Sidebar choice among the runs under the runs root (and the current one, wherever it lives)."""
    demo = run_ref(run_dir_for(DEMO_CONFIG))
    current = st.session_state.get("run") or demo
    refs = list(dict.fromkeys([current, demo] + [run_ref(p) for p in list_runs()]))
    refs.sort(key=lambda r: r != demo)
    choice = st.selectbox(
        "Run",
        refs,
        index=refs.index(current),
        help=f"Runs of the server's runs folder (`{RUNS_ENV}`) and its extra run folders",
        format_func=lambda r: f"{r} (demo)" if r == demo else r,
    )
    if choice != current:
        select_run(resolve_ref(choice))
        st.rerun()
    s = settings()
    st.caption(f"Influence: {computation(s.method.name, s.scope_key)}", help=f"Settings: {s.describe()}")


def computation_caption(run: Run, shown: InfluenceSettings | None = None, note: str | None = None) -> None:
    """Which computation the influence values of this page come from (``shown``, default: the sidebar's settings),
    and their unit; when it is not the sidebar's, say so (values of different computations are on different
    scales). ``note``: the figures behind the choice, for the help icon."""
    s = settings()
    shown = shown or s
    text = f"**Influence values on this page:** {computation(shown.method.name, shown.scope_key)}. "
    other = (shown.method, shown.scope_key) != (s.method, s.scope_key)
    if other:
        text += (
            f"The other pages show {computation(s.method.name, s.scope_key)} (the sidebar's setting): their values are "
            "on another scale, not comparable with these. "
        )
    st.caption(
        text + influence_unit(len(run.ids("train"))), help=note if other and note else f"Settings: {shown.describe()}"
    )


def running_jobs() -> None:
    """One line per job running on the server (training, influences), refreshed every 2 s until all have ended;
    then the app reruns once to show their results."""
    if job_registry().running():
        _running_jobs()


@st.fragment(run_every=2.0)
def _running_jobs() -> None:
    jobs = job_registry().running()
    if not jobs:
        st.rerun(scope="app")
    for job in jobs:
        st.caption(f":material/hourglass_top: {job.description}: {job.describe_progress()}")


_SHORTCUTS_JS = """<script>
(() => {
  // One key at a time: a key clicks its button, and the next waits until the page's next run has drawn the
  // page again (this script, last on the page, runs with a new run id), so it acts on what the reviewer then
  // sees (the moved focus) and never on the stale page of the previous run.
  const s = window.__influenceLensKeys || (window.__influenceLensKeys = {queue: [], busy: false, run: null});
  s.bindings = %s;  // key -> [container key, button label]
  const press = () => {
    if (s.busy && Date.now() - s.since > %d) { s.busy = false; s.queue = []; }  // no run came: drop, never guess
    while (!s.busy && s.queue.length) {
      const [container, label] = s.bindings[s.queue.shift()] || [];
      const box = container && document.querySelector(".st-key-" + container);
      const button = box && [...box.querySelectorAll("button")].find((b) => b.innerText.trim() === label);
      if (button && !button.disabled) { s.busy = true; s.since = Date.now(); button.click(); }
    }
  };
  if (s.run !== %s) { s.run = %s; s.busy = false; press(); }
  if (!s.listening) {
    s.listening = true;
    document.addEventListener("keydown", (e) => {
      const t = e.target, tag = (t && t.tagName) || "";
      if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || ["INPUT", "TEXTAREA", "SELECT"].includes(tag)
          || (t && t.isContentEditable) || !(e.key in s.bindings)) return;
      e.preventDefault();
      s.queue.push(e.key);
      press();
    });
  }
})();
</script>"""
KEY_WAIT_MS = 15_000  # a key pressed while the page's run takes longer than this is dropped


def keyboard_shortcuts(bindings: dict[str, tuple[str, str]]) -> None:
    """Keys that click buttons, as annotation tools have them: ``{key: (container key, button label)}`` presses
    the button showing ``label`` inside the ``st.container(key=...)``. Ignored while typing in a text box.
    Call it last on the page: keys pressed quickly are queued and each waits until the previous one's run has
    drawn the page again (so ``k n m`` keeps, moves on, then marks the image focused by then).

    Streamlit has no key events; a small script (``st.html`` with JavaScript) listens in the page; each run
    gives it a new run id, which tells it that the page is drawn."""
    run = json.dumps(uuid.uuid4().hex)
    st.html(_SHORTCUTS_JS % (json.dumps(bindings), KEY_WAIT_MS, run, run), unsafe_allow_javascript=True)


def show_error(e: InfluenceLensError) -> None:
    st.error(f"**{e.problem}**" + (f"\n\n**Fix:** {e.fix}" if e.fix else ""), icon="⚠️")


@contextmanager
def errors_shown():
    """Show a problem raised inside the block where it happened, as one clear message; the page goes on.

    An :class:`InfluenceLensError` shows as is; an ``OSError`` or SQLite error (a read-only or full disk, a
    broken review store) as :func:`~influence_core.jobs.user_error` words it, without server paths; the full
    exception goes to the server log. A run whose dataset moved gets a form that points it at the new place."""
    try:
        yield
    except DatasetMovedError as e:  # with a form that points the run at the data's new place
        show_error(e)
        with errors_shown():
            repoint_form(e)
    except InfluenceLensError as e:
        show_error(e)
    except (OSError, sqlite3.Error) as e:
        log.exception("shown to the user as a clear error")
        show_error(user_error(e))


def download_csv(df: pd.DataFrame | str, file_name: str, label: str = "Download CSV", key: str | None = None) -> None:
    data = df if isinstance(df, str) else export_csv(df)
    st.download_button(
        label, data, file_name=file_name, mime="text/csv", key=key or f"dl-{file_name}", icon=":material/download:"
    )


def table(df: pd.DataFrame, file_name: str, **kwargs) -> None:
    """A dataframe with its CSV download button underneath."""
    st.dataframe(df, hide_index=True, width="stretch", **kwargs)
    download_csv(df, file_name)


def enlarge(image: np.ndarray, size: int = 96) -> Image.Image:
    """A (S, S, 3) uint8 image scaled up with sharp pixels for display."""
    return Image.fromarray(image).resize((size, size), Image.NEAREST)


def image_grid(
    images: np.ndarray,
    captions: list[str],
    columns: int = 8,
    size: int = 96,
    button: str | None = None,
    key: str = "grid",
    selected: int | None = None,
    on_click: Callable[[int], None] | None = None,
) -> None:
    """Images in a grid with captions; with ``button``, one button each, whose click calls ``on_click(index)``
    before the page's next run (so that run already draws the choice: one run per click, no ``st.rerun``). Buttons
    sit above their images, so that they line up whatever the captions' lengths."""
    for start in range(0, len(images), columns):
        cols = st.columns(columns)
        for i in range(start, min(start + columns, len(images))):
            with cols[i - start]:
                if button:
                    st.button(
                        button,
                        key=f"{key}-{i}",
                        width="stretch",
                        type="primary" if i == selected else "secondary",
                        on_click=on_click,
                        args=(i,),
                    )
                st.image(enlarge(images[i], size), caption=captions[i], width="stretch")


def index_of(positions: np.ndarray, position: int | None) -> int | None:
    """Where ``position`` sits in ``positions`` (to highlight the selected image of a grid), or None."""
    hits = np.flatnonzero(positions == position) if position is not None else []
    return int(hits[0]) if len(hits) else None


def fmt(value: float) -> str:
    """A signed influence value, short: +1,234 or +0.0123."""
    return f"{value:+,.0f}" if abs(value) >= 100 else f"{value:+.3g}"


def training_captions(
    run: Run, positions: np.ndarray, flags: pd.DataFrame, values: np.ndarray, value_name: str = "influence"
) -> list[str]:
    """Captions saying what each number is, with flipped and reviewed marks, for training images.

    ``positions``: (k,) training positions; ``flags``: their ``runs.flags_at`` rows; ``values``: (k,) the ranked
    value, shown first. E.g. "influence +801 · trained as 8 (really 3) · id 60.png · ⚑ flipped" (long file names
    shortened in the middle).
    """
    true = run.true_labels("train")[positions]
    captions = []
    for row, t, value in zip(flags.itertuples(), true, values, strict=True):
        really = f" (really {run.classes[t]})" if row.flipped else ""
        text = f"{value_name} {fmt(value)} · trained as {row.label}{really} · id {short_id(row.id)}"
        captions.append(text + (f" · ⚑ {row.marks}" if row.marks else ""))
    return captions


ROW_PX = 35  # height of one st.dataframe row: a page of a paged table shows all its rows without scrolling


def paged_table(df: pd.DataFrame, file_name: str, per_page: int = 50, key: str = "table", **kwargs) -> None:
    """One page of ``df`` at a time (page number above it) and a CSV download of all rows, written on click."""
    n_pages = pages(len(df), per_page)
    page = 1
    if n_pages > 1:
        page = st.number_input(
            f"Page (of {n_pages:,}; {per_page} of {len(df):,} rows each)", 1, n_pages, 1, key=f"{key}-page"
        )
    rows = df.iloc[(page - 1) * per_page : page * per_page]
    st.dataframe(rows, hide_index=True, width="stretch", height=ROW_PX * (len(rows) + 1) + 3, **kwargs)
    st.download_button(
        "Download CSV (all rows)",
        lambda: export_csv(df),
        file_name=file_name,
        mime="text/csv",
        key=f"dl-{file_name}",
        icon=":material/download:",
        on_click="ignore",
    )
