"""Shared UI helpers for every page: runs and cached loads, progress, images, charts, downloads, errors.

Pages only lay out; everything they share lives here, and the logic lives in :mod:`influence_core`.
Session state keys: ``run`` (a run reference: a name under the runs root or an absolute path),
``settings`` (:class:`InfluenceSettings`), ``test`` (selected test position), ``reviewer``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from influence_core import InfluenceLensError, Run, TrainConfig, train
from influence_core.data import parse_spec
from influence_core.pipeline import (DEFAULT_SETTINGS, InfluenceResult, InfluenceSettings, cache_key,
                                     compute_influence, saliency_maps)
from influence_core.storage import stable_hash

RUNS_ENV = "INFLUENCE_LENS_RUNS"
DEMO_CONFIG = TrainConfig(dataset="demo", image_size=16, downsample=0.5, epochs=5, corrupt_fraction=0.1,
                          n_checkpoints=2)  # ~900 digits, test F1 ≈ 0.85
URL_KEYS = ("run", "test")
COLORS = px.colors.qualitative.Safe
GOOD, BAD = "#1a9850", "#d73027"


# --- runs ---------------------------------------------------------------------------------------------------

def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs")).expanduser().resolve()


def run_dir_for(config: TrainConfig) -> Path:
    """``<runs root>/<dataset name>-<hash of the config>``: one directory per training config."""
    kind, path = parse_spec(config.dataset)
    name = kind if not path else f"{kind}-{Path(path).name}"
    cfg = dataclasses.asdict(config) | {"split": list(config.split)}
    return runs_root() / f"{name}-{stable_hash(cfg, length=10)}"


def run_ref(path: Path) -> str:
    """How a run appears in the URL: its name under the runs root, else its absolute path."""
    path = Path(path).resolve()
    return path.name if path.parent == runs_root() else str(path)


def resolve_ref(ref: str) -> Path:
    path = Path(ref).expanduser()
    return path if path.is_absolute() else runs_root() / ref


def list_runs() -> list[Path]:
    """Finished runs under the runs root, newest first."""
    root = runs_root()
    found = [p for p in root.iterdir() if (p / "train_key").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: (p / "train_key").stat().st_mtime, reverse=True)


@st.cache_resource(max_entries=8, show_spinner=False)
def _open_run(path: str, mtime: float) -> Run:
    return Run(path)


def open_run(path: str | Path) -> Run:
    """A :class:`Run`, cached until its training is replaced (keyed on path and ``train_key`` mtime)."""
    key_file = Path(path) / "train_key"
    if not key_file.is_file():
        raise InfluenceLensError(f"{path} is not a finished run directory (no train_key file).",
                                 "pick a folder written by Influence Lens training, or train a new run")
    return _open_run(str(Path(path).resolve()), key_file.stat().st_mtime)


def current_run() -> Run:
    """The run the session looks at: the one chosen (or in the URL), else the demo, trained on first use."""
    ref = st.session_state.get("run")
    if ref:
        return open_run(resolve_ref(ref))
    run = train_with_progress(DEMO_CONFIG, "Preparing the demo: training a ResNet18 on handwritten digits")
    st.session_state["run"] = run_ref(run.path)
    return run


def run_picker() -> None:
    """Sidebar choice among the runs under the runs root (and the current one, wherever it lives)."""
    demo = run_ref(run_dir_for(DEMO_CONFIG))
    current = st.session_state.get("run") or demo
    refs = list(dict.fromkeys([current, demo] + [run_ref(p) for p in list_runs()]))
    refs.sort(key=lambda r: r != demo)
    choice = st.selectbox("Run", refs, index=refs.index(current), help=f"Runs live under {runs_root()}",
                          format_func=lambda r: f"{r} (demo)" if r == demo else r)
    if choice != current:
        select_run(resolve_ref(choice))
        st.rerun()
    st.caption(f"Influence: {settings().describe()}")


def settings() -> InfluenceSettings:
    return st.session_state.get("settings", DEFAULT_SETTINGS)


# --- progress ----------------------------------------------------------------------------------------------

class StatusProgress:
    """A ``progress(stage, done, total)`` callback drawing one progress bar (redrawn at most 5 times a second)."""

    def __init__(self):
        self.bar = st.progress(0.0, text="starting…")
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last > 0.2 or done >= total:
            self._last = now
            self.bar.progress(min(done / max(total, 1), 1.0), text=f"{stage} — {done}/{total}")


def train_with_progress(config: TrainConfig, label: str, run_dir: Path | None = None) -> Run:
    """Train (or fetch the cached run) inside an ``st.status`` box with a progress bar and a log."""
    run_dir = run_dir or run_dir_for(config)
    if (run_dir / "train_key").is_file() and (run_dir / "config.json").is_file():
        try:  # identical config → the directory already holds it (the name is the config's hash)
            return open_run(run_dir)
        except InfluenceLensError:
            pass
    with st.status(label, expanded=True) as status:
        run = train(config, run_dir, progress=StatusProgress())
        status.update(label=f"{label} — done", state="complete", expanded=False)
    return run


@st.cache_resource(max_entries=32, show_spinner=False)
def _cache_key(path: str, mtime: float, s: InfluenceSettings) -> str:
    return cache_key(open_run(path), s)


@st.cache_resource(max_entries=8, show_spinner=False)
def _result(path: str, key: str) -> InfluenceResult:
    return InfluenceResult(open_run(path), Path(path) / "influence" / key)


def cached_influence(run: Run, s: InfluenceSettings | None = None) -> InfluenceResult | None:
    """The cached influence result of ``run`` (held in memory), or None without computing anything."""
    s = s or settings()
    key = _cache_key(str(run.path), (run.path / "train_key").stat().st_mtime, s)
    return _result(str(run.path), key) if (run.path / "influence" / key / "meta.json").is_file() else None


def influence(run: Run, s: InfluenceSettings | None = None) -> InfluenceResult:
    """The influence result of ``run``, computed inside an ``st.status`` box when not cached yet."""
    s = s or settings()
    found = cached_influence(run, s)
    if found is not None:
        return found
    label = f"Computing influences ({s.describe()})"
    with st.status(label, expanded=True) as status:
        compute_influence(run, s, progress=StatusProgress())
        status.update(label=f"{label} — done", state="complete", expanded=False)
    return cached_influence(run, s)


@st.cache_data(max_entries=64, show_spinner=False)
def _saliency(path: str, mtime: float, s: InfluenceSettings, test: int, train_position: int) -> np.ndarray:
    return saliency_maps(open_run(path), s, test, [train_position])[0]


def saliency(run: Run, test: int, train_position: int) -> np.ndarray:
    """(S, S) signed saliency of one training image for one test image (cached)."""
    return _saliency(str(run.path), (run.path / "train_key").stat().st_mtime, settings(), test, train_position)


# --- state shared through the URL --------------------------------------------------------------------------

def read_url() -> None:
    """Copy ``run`` and ``test`` from the URL into the session once, so a shared link reopens the same view."""
    if st.session_state.get("_url_read"):
        return
    st.session_state["_url_read"] = True
    params = st.query_params
    if params.get("run"):
        st.session_state["run"] = params["run"]
    if params.get("test", "").isdigit():
        st.session_state["test"] = int(params["test"])


def write_url() -> None:
    """Mirror the session's ``run`` and ``test`` into the URL (page switches clear it)."""
    for key in URL_KEYS:
        value = st.session_state.get(key)
        if value is None:
            st.query_params.pop(key, None)
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


def select_run(path: Path) -> None:
    """Make ``path`` the current run (the test selection belongs to the old run)."""
    st.session_state["run"] = run_ref(path)
    st.session_state.pop("test", None)


# --- errors and downloads ----------------------------------------------------------------------------------

def show_error(e: InfluenceLensError) -> None:
    st.error(f"**{e.problem}**" + (f"\n\n**Fix:** {e.fix}" if e.fix else ""), icon="⚠️")


@contextmanager
def errors_shown():
    """Show an :class:`InfluenceLensError` raised inside the block where it happened; the page goes on."""
    try:
        yield
    except InfluenceLensError as e:
        show_error(e)


def download_csv(df: pd.DataFrame | str, file_name: str, label: str = "Download CSV", key: str | None = None) -> None:
    data = df if isinstance(df, str) else df.to_csv(index=False)
    st.download_button(label, data, file_name=file_name, mime="text/csv", key=key or f"dl-{file_name}",
                       icon=":material/download:")


def table(df: pd.DataFrame, file_name: str, **kwargs) -> None:
    """A dataframe with its CSV download button underneath."""
    st.dataframe(df, hide_index=True, width="stretch", **kwargs)
    download_csv(df, file_name)


# --- images ------------------------------------------------------------------------------------------------

def enlarge(image: np.ndarray, size: int = 96) -> Image.Image:
    """A (S, S, 3) uint8 image scaled up with sharp pixels for display."""
    return Image.fromarray(image).resize((size, size), Image.NEAREST)


def image_grid(images: np.ndarray, captions: list[str], columns: int = 8, size: int = 96,
               button: str | None = None, key: str = "grid", selected: int | None = None) -> int | None:
    """Images in a grid with captions; with ``button``, one button each: returns the index clicked, if any."""
    clicked = None
    for start in range(0, len(images), columns):
        cols = st.columns(columns)
        for i in range(start, min(start + columns, len(images))):
            with cols[i - start]:
                st.image(enlarge(images[i], size), caption=captions[i], width="stretch")
                if button and st.button(button, key=f"{key}-{i}", width="stretch",
                                        type="primary" if i == selected else "secondary"):
                    clicked = i
    return clicked


def index_of(positions: np.ndarray, position: int | None) -> int | None:
    """Where ``position`` sits in ``positions`` (to highlight the selected image of a grid), or None."""
    hits = np.flatnonzero(positions == position) if position is not None else []
    return int(hits[0]) if len(hits) else None


def saliency_figure(image: np.ndarray, saliency: np.ndarray, title: str) -> go.Figure:
    """The training image beside its signed saliency map (red: more helpful if brighter, blue: less)."""
    from plotly.subplots import make_subplots

    limit = float(np.abs(saliency).max()) or 1.0
    fig = make_subplots(1, 2, subplot_titles=("training image", "saliency (perturbation influence)"),
                        horizontal_spacing=0.08)
    fig.add_trace(go.Image(z=image), 1, 1)
    fig.add_trace(go.Heatmap(z=saliency, colorscale="RdBu_r", zmin=-limit, zmax=limit, colorbar=dict(len=0.9)),
                  1, 2)
    fig.update_yaxes(autorange="reversed", scaleanchor="x2", row=1, col=2)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=70, b=10))
    return fig


# --- charts ------------------------------------------------------------------------------------------------

def chart(fig: go.Figure, key: str | None = None) -> None:
    fig.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=50 if fig.layout.title.text else 20, b=10))
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


def influence_histogram(values: np.ndarray, labels: list[str], title: str, x_title: str) -> go.Figure:
    """Overlaid histograms of ``values`` coloured by training label."""
    df = pd.DataFrame({x_title: values, "training label": labels})
    fig = px.histogram(df, x=x_title, color="training label", barmode="overlay", nbins=60, opacity=0.65,
                       title=title, color_discrete_sequence=COLORS,
                       category_orders={"training label": sorted(set(labels), key=_natural)})
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_layout(yaxis_title="training images", height=380, legend_title_text="training label")
    return fig


def _natural(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> go.Figure:
    fig = px.imshow(np.asarray(matrix), x=classes, y=classes, text_auto=True, color_continuous_scale="Blues",
                    labels=dict(x="predicted", y="true", color="test images"), title="Confusion matrix (test set)")
    fig.update_xaxes(type="category", side="bottom")
    fig.update_yaxes(type="category")
    fig.update_layout(height=420, coloraxis_showscale=False)
    return fig


# --- run facts shared by pages -----------------------------------------------------------------------------

def fmt(value: float) -> str:
    """A signed influence value, short: +1,234 or +0.0123."""
    return f"{value:+,.0f}" if abs(value) >= 100 else f"{value:+.3g}"


def class_names(run: Run, codes: np.ndarray) -> list[str]:
    return [run.classes[c] for c in codes]


def predicted(run: Run, split: str) -> np.ndarray:
    return run.predictions[f"probs_{split}"].argmax(1)


def flips_found_at(result: InfluenceResult, signal: str, fraction: float = 0.1) -> tuple[int, int]:
    """(flips among the top ``fraction`` of training images by ``signal``, flips in total)."""
    flipped = result.run.flipped()
    k = int(np.ceil(fraction * len(flipped)))
    top = np.argsort(-result.signals[signal], kind="stable")[:k]
    return int(flipped[top].sum()), int(flipped.sum())


def describe_run(run: Run) -> str:
    """One line: dataset, classes, model and weights."""
    cfg = run.config
    n = run.samples["split"].value_counts()
    weights = "ImageNet-pretrained" if cfg["weights"] == "pretrained" else "trained from scratch"
    layers = "only the last layer trained" if cfg["train_layers"] == "head" else "whole network trained"
    return (f"**{cfg['dataset']}** · {run.n_classes} classes · {n.get('train', 0)} train / {n.get('val', 0)} val / "
            f"{n.get('test', 0)} test images at {cfg['image_size']} px · ResNet18, {weights}, {layers}, "
            f"{cfg['epochs']} epochs")
