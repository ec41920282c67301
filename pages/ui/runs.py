"""Runs for the app: where they live, opening them (cached), training and influences with progress bars."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from influence_core import InfluenceLensError, Run, TrainConfig, train
from influence_core.analysis import training_flags
from influence_core.data import parse_spec
from influence_core.paths import RunPaths
from influence_core.pipeline import (
    InfluenceResult,
    InfluenceSettings,
    cache_key,
    compute_influence,
    saliency_maps,
)
from influence_core.review import Action, ReviewStore
from influence_core.storage import stable_hash

from .state import settings

RUNS_ENV = "INFLUENCE_LENS_RUNS"
DEMO_CONFIG = TrainConfig(dataset="demo", image_size=16, downsample=0.5, epochs=5, corrupt_fraction=0.1,
                          n_checkpoints=2)  # ~900 digits, test F1 ≈ 0.85


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


def select_run(path: Path) -> None:
    """Make ``path`` the current run (the test selection belongs to the old run)."""
    st.session_state["run"] = run_ref(path)
    st.session_state.pop("test", None)


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


def describe_run(run: Run) -> str:
    """One line: dataset, classes, model and weights."""
    cfg = run.config
    n = run.samples["split"].value_counts()
    weights = "ImageNet-pretrained" if cfg["weights"] == "pretrained" else "trained from scratch"
    layers = "only the last layer trained" if cfg["train_layers"] == "head" else "whole network trained"
    return (f"**{cfg['dataset']}** · {run.n_classes} classes · {n.get('train', 0)} train / {n.get('val', 0)} val / "
            f"{n.get('test', 0)} test images at {cfg['image_size']} px · ResNet18, {weights}, {layers}, "
            f"{cfg['epochs']} epochs")


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


@st.cache_resource(max_entries=16, show_spinner=False)
def _split_rows(path: str, mtime: float, split: str) -> np.ndarray:
    return np.flatnonzero((open_run(path).samples["split"] == split).to_numpy())


def images_at(run: Run, split: str, positions: np.ndarray) -> np.ndarray:
    """(k, S, S, 3) uint8 display images of the samples at ``positions`` within ``split`` (copies only those)."""
    rows = _split_rows(str(run.path), (run.path / "train_key").stat().st_mtime, split)
    return run.dataset.images[rows[np.asarray(positions, dtype=np.int64)]]


def review_decisions(run: Run, sample_ids: list[str]) -> dict[str, Action]:
    """Sample id → current review decision of those of ``sample_ids`` reviewed on this run's data.

    Reads the run's review store only when it exists (looking never creates one).
    """
    if not RunPaths(run.path).reviews.is_file():
        return {}
    return ReviewStore.for_run(run).decisions_for(sample_ids)


def flags_at(run: Run, positions: np.ndarray) -> pd.DataFrame:
    """:func:`~influence_core.analysis.training_flags` rows (flipped, review, marks) of the training images at
    ``positions``, in that order (reads only those images' review decisions)."""
    ids = run.ids("train")
    chosen = [ids[p] for p in positions]
    return training_flags(chosen, class_names(run, run.labels("train")[positions]), run.flipped()[positions],
                          review_decisions(run, chosen))
