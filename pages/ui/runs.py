"""Runs for the app: where they may live, opening them (cached), and training and influences as background jobs.

Runs are named in links and in the session by a *run reference*: a relative path under the runs root
(``INFLUENCE_LENS_RUNS``, default ``runs/``) or under one of the extra roots (``INFLUENCE_LENS_EXTRA_ROOTS``,
separated by ``os.pathsep``). Anything else (an absolute path, ``..``, a symlink leading out of the roots) is
refused with a message that names no server folder, before anything is read, computed or created there.

Training and influence computations run in the server's :class:`~influence_core.jobs.JobRegistry` (one per
process), so they go on when the page is left; a page that needs their result shows their progress instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitAPIException

from influence_core import InfluenceLensError, Run, TrainConfig, train
from influence_core.analysis import training_flags
from influence_core.display import computation, dataset_name
from influence_core.experiments import run_dir_name
from influence_core.jobs import Job, JobRegistry
from influence_core.paths import RunPaths
from influence_core.pipeline import (
    InfluenceResult,
    InfluenceSettings,
    cache_key,
    compute_influence,
    saliency_maps,
    usable_entry,
)
from influence_core.review import Action, ReviewStore
from influence_core.run import DatasetMovedError, repoint
from influence_core.rundir import finished_runs
from influence_core.second_pass import DEFAULT_SHARE, compute_second_pass, load_second_pass
from influence_core.upgrade import ranking_upgrade

from .navigation import require_frame
from .state import settings

RUNS_ENV = "INFLUENCE_LENS_RUNS"
EXTRA_ROOTS_ENV = "INFLUENCE_LENS_EXTRA_ROOTS"
UPGRADE_ENV = "INFLUENCE_LENS_RANKING_UPGRADE"
DEMO_CONFIG = TrainConfig(
    dataset="demo", image_size=16, downsample=0.5, epochs=5, corrupt_fraction=0.1, n_checkpoints=2, augment_shift=0.0
)  # ~900 digits, test F1 ≈ 0.85; augment_shift=0 (the digits' default) keeps the demo's folder name


def outside_roots() -> InfluenceLensError:
    """The refusal of a run outside the roots; it names no server folder."""
    return InfluenceLensError(
        "This run is outside the folders the app may open.",
        f"pick a run from the sidebar list; the app only opens runs under its runs folder ({RUNS_ENV}) and the "
        f"folders listed in {EXTRA_ROOTS_ENV} when the server starts",
    )


def runs_root() -> Path:
    """Where new runs go and plain run references point: ``$INFLUENCE_LENS_RUNS`` or ``runs/``, resolved."""
    return Path(os.environ.get(RUNS_ENV, "runs")).expanduser().resolve()


def run_roots() -> list[Path]:
    """The runs root, then the extra roots of ``$INFLUENCE_LENS_EXTRA_ROOTS``: the only folders runs come from."""
    extra = [Path(p).expanduser().resolve() for p in os.environ.get(EXTRA_ROOTS_ENV, "").split(os.pathsep) if p]
    return list(dict.fromkeys([runs_root(), *extra]))


def confine(path: Path) -> Path:
    """``path`` with symlinks resolved if it lies inside one of :func:`run_roots`, else refused (a name the file
    system cannot hold, such as one with a null byte, too)."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (ValueError, OSError, RuntimeError):  # embedded null byte, name too long, a symlink loop
        raise outside_roots() from None
    if any(resolved.is_relative_to(root) for root in run_roots()):
        return resolved
    raise outside_roots()


def run_ref(path: Path) -> str:
    """How the run at ``path`` (inside the roots) appears in links: its path relative to the first root holding it."""
    resolved = confine(path)
    root = next(r for r in run_roots() if resolved.is_relative_to(r))
    return resolved.relative_to(root).as_posix()


def resolve_ref(ref: str) -> Path:
    """The folder a run reference names (see the module docstring); refused unless it stays inside the roots."""
    parts = PurePath(ref).parts
    if not ref or "\x00" in ref or PurePath(ref).is_absolute() or ref.startswith("~") or ".." in parts:
        raise outside_roots()
    candidates = [root / ref for root in run_roots()]
    try:
        found = next((c for c in candidates if c.is_dir()), candidates[0])
    except (ValueError, OSError):  # a name the file system cannot hold
        raise outside_roots() from None
    return confine(found)


def run_dir_for(config: TrainConfig) -> Path:
    """``<runs root>/<run_dir_name(config)>``: one readable directory per training config (dataset, classes, flip
    share and a hash of the whole config)."""
    return runs_root() / run_dir_name(config)


def list_runs() -> list[Path]:
    """Finished runs directly under each root (:func:`~influence_core.rundir.finished_runs`: never one being built
    or swapped; symlinks leading out of the roots left out), newest first."""
    roots = run_roots()
    found = {p.resolve() for root in roots for p in finished_runs(root)}
    inside = [p for p in found if any(p.is_relative_to(root) for root in roots)]
    return sorted(inside, key=lambda p: RunPaths(p).train_key.stat().st_mtime, reverse=True)


@st.cache_resource(max_entries=8, show_spinner=False)
def _open_run(path: str, stamp: tuple) -> Run:
    return Run(path)


def run_stamp(path: Path) -> tuple:
    """``(size, mtime)`` of each file a :class:`Run` reads when opened or asked for labels and arrays: a run is
    opened again (and its influence key computed again) once any of them changes, e.g. an edited label."""
    files = RunPaths(path)
    stamp = []
    for file in (
        files.train_key,
        files.config,
        files.samples,
        files.dynamics,
        files.predictions,
        files.final_checkpoint,
    ):
        try:
            st_ = file.stat()
            stamp.append((st_.st_size, st_.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def open_run(path: str | Path) -> Run:
    """A :class:`Run` inside the roots, cached until one of its files changes (:func:`run_stamp`)."""
    path = confine(Path(path))
    key_file = RunPaths(path).train_key
    if not key_file.is_file():
        raise InfluenceLensError(
            f"The run {run_ref(path)!r} is not a finished run (it holds no train_key file).",
            "pick a run written by Influence Lens training, or train a new run",
        )
    return _open_run(str(path), run_stamp(path))


def open_run_folder(folder: str) -> Run:
    """The run in ``folder`` as typed on the Data & model page: a full path, or a path relative to the runs
    root; it must lie inside the roots like any other run."""
    path = Path(folder.strip()).expanduser()
    return open_run(path if path.is_absolute() else runs_root() / path)


# --- background jobs --------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def job_registry() -> JobRegistry:
    """The server's one job registry: jobs outlive the page and the session that started them; one computes at
    a time (the others show what they wait for)."""
    return JobRegistry(slots=1)


def _training_key(run_dir: Path) -> str:
    return f"train:{run_dir}"


def start_training(
    config: TrainConfig, label: str, run_dir: Path | None = None, then: InfluenceSettings | None = None
) -> Path:
    """Train ``config`` into ``run_dir`` (default :func:`run_dir_for`) in the background, then compute the
    influences ``then`` if given; returns the run folder at once (open it with :func:`finished_run`)."""
    run_dir = confine(run_dir or run_dir_for(config))

    def work(progress) -> None:
        run = train(config, run_dir, progress=progress)
        if then is not None:
            compute_influence(run, then, progress=progress)

    job_registry().submit(_training_key(run_dir), work, label)
    return run_dir


def show_job(job: Job) -> None:
    """A progress bar of ``job`` that refreshes itself every second and reruns the app once the job ends."""

    @st.fragment(run_every=1.0)
    def progress() -> None:
        if job.status != "running":
            st.rerun(scope="app")
        st.progress(
            job.fraction,
            text=f"{job.description}: {job.describe_progress()} · "
            "runs on the server; you may leave this page and come back",
        )

    progress()


def settled(key: str, wait: bool = True) -> bool:
    """Whether no job runs under ``key``: a running one is shown and the page stops there (``wait=False``: goes
    on, and this returns False); a failed one raises its error once (the next visit tries again)."""
    registry = job_registry()
    job = registry.get(key)
    if job is None:
        return True
    if job.status == "running":
        show_job(job)
        if wait:
            st.stop()
        return False
    registry.forget(key)
    if job.error is not None:
        raise job.error
    return True


def finished_run(run_dir: Path) -> Run:
    """The run in ``run_dir`` once its training job (if any) has finished; meanwhile its progress (page stops)."""
    settled(_training_key(confine(run_dir)))
    return open_run(run_dir)


def current_run() -> Run:
    """The run the session looks at: the one chosen (or in the URL), else the demo, trained on first use.

    Every page starts with it, so it first makes sure the page runs inside ``app.py`` (:mod:`.navigation`)."""
    require_frame()
    demo = run_ref(run_dir_for(DEMO_CONFIG))
    ref = st.session_state.setdefault("run", demo)
    if ref == demo:
        return train_with_progress(DEMO_CONFIG, "Preparing the demo: training a ResNet18 on handwritten digits")
    return finished_run(resolve_ref(ref))


def select_run(path: Path) -> None:
    """Make ``path`` the current run (the test selection belongs to the old run)."""
    st.session_state["run"] = run_ref(path)
    st.session_state.pop("test", None)


def train_with_progress(config: TrainConfig, label: str, run_dir: Path | None = None) -> Run:
    """The run of ``config``: opened at once when already trained, else trained in the background (with the
    current influence settings computed after it) while this page shows the progress and stops."""
    run_dir = confine(run_dir or run_dir_for(config))
    if not RunPaths(run_dir).train_key.is_file() and job_registry().get(_training_key(run_dir)) is None:
        start_training(config, label, run_dir, then=settings())
    return finished_run(run_dir)


def _trained_at(run: Run) -> tuple:
    """The run's :func:`run_stamp`: part of every in-memory cache key."""
    return run_stamp(run.path)


@st.cache_resource(max_entries=32, show_spinner=False)
def _cache_key(path: str, stamp: tuple, s: InfluenceSettings) -> str:
    return cache_key(open_run(path), s)


@st.cache_resource(max_entries=8, show_spinner=False)
def _result(path: str, key: str, written: int) -> InfluenceResult:
    return InfluenceResult(open_run(path), RunPaths(Path(path)).influence_entry(key).root)


def cached_influence(run: Run, s: InfluenceSettings | None = None) -> InfluenceResult | None:
    """The cached influence result of ``run`` (held in memory), or None without computing anything (also when the
    entry on disk is damaged: :func:`~influence_core.pipeline.usable_entry`)."""
    s = s or settings()
    key = _cache_key(str(run.path), _trained_at(run), s)
    entry = RunPaths(run.path).influence_entry(key)
    if not usable_entry(run, entry):
        return None
    return _result(str(run.path), key, entry.meta.stat().st_mtime_ns)


def _influence_key(run: Run, s: InfluenceSettings) -> str:
    return f"influence:{run.path}:{_cache_key(str(run.path), _trained_at(run), s)}"


def _influence_job(run: Run, s: InfluenceSettings) -> Job:
    """The background computation of ``s`` for ``run`` (the running or finished one, else a new one)."""
    return job_registry().submit(
        _influence_key(run, s),
        lambda progress: compute_influence(run, s, progress=progress),
        f"Computing influences ({computation(s.method.name, s.scope_key)})",
    )


def influence(run: Run, s: InfluenceSettings | None = None) -> InfluenceResult:
    """The influence result of ``run``; when not cached yet it is computed in the background while this page
    shows the progress and stops (every page asking for it meanwhile shows the same job)."""
    result = _influence(run, s or settings(), wait=True)
    assert result is not None  # settled(wait=True) stops the page until the job has finished
    return result


def influence_when_ready(run: Run, s: InfluenceSettings | None = None) -> InfluenceResult | None:
    """As :func:`influence`, but the page goes on: None while the result is computed (its progress shows)."""
    return _influence(run, s or settings(), wait=False)


def _influence(run: Run, s: InfluenceSettings, wait: bool) -> InfluenceResult | None:
    found = cached_influence(run, s)
    if found is not None:
        return found
    key = _influence_key(run, s)
    if job_registry().get(key) is None:  # a failed job stays until settled has shown its error once
        _influence_job(run, s)
    return cached_influence(run, s) if settled(key, wait) else None


def repoint_form(error: DatasetMovedError) -> None:
    """Beside the error of a run whose dataset moved: a box for the data's new place and a button that points the
    run there (:func:`influence_core.run.repoint`, which checks that the same images are there)."""
    ref = run_ref(error.run_path)
    try:
        spec = st.text_input(
            "New place of the run's data",
            placeholder="e.g. tiny-imagenet:/data/tiny-imagenet-200 or folder:/data/photos",
            key=f"repoint-{ref}",
            help="The dataset spec as in Train a new run; the run is pointed there only if it holds the same images.",
        )
        clicked = st.button("Point the run there", key=f"repoint-button-{ref}", icon=":material/drive_file_move:")
    except StreamlitAPIException:  # the same error shown twice on one page: one form is enough
        return
    if clicked and spec.strip():
        repoint(error.run_path, spec.strip())
        st.rerun()


def second_pass_stamp(run: Run) -> int | None:
    """When ``run``'s second pass was written (None: not yet): part of the key of caches holding its signals."""
    path = RunPaths(run.path).second_pass
    return path.stat().st_mtime_ns if path.is_file() else None


def second_pass_control(run: Run) -> None:
    """The second pass of ``run``: a button that starts it in the background, its progress while it runs (the
    page goes on), its error once if it failed, or one line on what it did once computed."""
    second = load_second_pass(run)
    if second is not None:
        flipped = run.flipped()
        found = f", {(second.left_out & flipped).sum()} of them flipped on purpose" if flipped.any() else ""
        st.caption(
            f"Second pass: retrained without the top {second.left_out.sum()} suspects{found}; that model's test "
            f"accuracy is {second.accuracy_test:.3f} (this run's: {run.metrics['accuracy_test']:.3f})."
        )
        return
    key = f"second-pass:{run.path}:{run.key}"
    if not settled(key, wait=False):
        return
    minutes = run.metrics.get("timings_s", {}).get("train", 0) / 60
    if st.button(
        f"Second pass: retrain without the top {DEFAULT_SHARE * 100:.0f} % suspects (about {max(minutes, 0.1):.1f} min)",
        icon=":material/replay:",
        help="One more training of this run's recipe without the most suspicious images by training loss, which "
        "then judges every label again: a cleaner model, and on every run tested a better ranking. Runs on the "
        "server; the ranking switches to it when done.",
    ):
        job_registry().submit(
            key,
            lambda progress: compute_second_pass(run, progress=progress),
            f"Second pass: retraining without the top {DEFAULT_SHARE * 100:.0f} % suspects",
        )
        st.rerun()


@dataclass(frozen=True)
class Ranking:
    """What the explorer ranks helpful / harmful images with: ``result`` of ``settings``; ``note`` says why when
    they are not the session's settings; ``job`` computes a better-measured result meanwhile, or holds its error."""

    result: InfluenceResult
    settings: InfluenceSettings
    note: str | None = None
    job: Job | None = None


def rankings(run: Run) -> Ranking:
    """The session's influence result (computed first: the page waits for it), or, at the default settings, the
    better-measured whole-network one when it is affordable (:func:`influence_core.upgrade.ranking_upgrade`):
    used once cached, computed in the background meanwhile. ``INFLUENCE_LENS_RANKING_UPGRADE=0`` turns this off."""
    s = settings()
    base = influence(run, s)
    upgrade = None if os.environ.get(UPGRADE_ENV) == "0" else ranking_upgrade(run, s)
    if upgrade is None:
        return Ranking(base, s)
    found = cached_influence(run, upgrade.settings)
    if found is not None:
        note = f"Ranked by {upgrade.describe()}, computed in the background. {upgrade.scale_note()}"
        return Ranking(found, upgrade.settings, note.strip())
    # a failed job stays in the registry: shown with its error, not retried by this server
    job = job_registry().get(_influence_key(run, upgrade.settings)) or _influence_job(run, upgrade.settings)
    if job.status == "failed":
        return Ranking(base, s, f"Ranked by the last layer: {upgrade.describe()} could not be computed.", job)
    eta = f"; about {upgrade.estimated_s:.0f} s on the CPU" if upgrade.estimated_s is not None else ""
    return Ranking(
        base, s, f"Ranked by the last layer while {upgrade.describe()} is computed in the background{eta}.", job
    )


@st.cache_data(max_entries=64, show_spinner=False)
def _saliency(path: str, stamp: tuple, s: InfluenceSettings, test: int, train_position: int) -> np.ndarray:
    return saliency_maps(open_run(path), s, test, [train_position])[0]


def saliency(run: Run, test: int, train_position: int, s: InfluenceSettings | None = None) -> np.ndarray:
    """(S, S) signed saliency of one training image for one test image under ``s`` (default: the session's)."""
    return _saliency(str(run.path), _trained_at(run), s or settings(), test, train_position)


def describe_run(run: Run) -> str:
    """One line: dataset, classes, model and weights."""
    cfg = run.config
    n = run.samples["split"].value_counts()
    weights = "ImageNet-pretrained" if cfg["weights"] == "pretrained" else "trained from scratch"
    layers = "only the last layer trained" if cfg["train_layers"] == "head" else "whole network trained"
    return (
        f"**{dataset_name(cfg['dataset'])}** · {run.n_classes} classes · {n.get('train', 0)} train / {n.get('val', 0)} val / "
        f"{n.get('test', 0)} test images at {cfg['image_size']} px · ResNet18, {weights}, {layers}, "
        f"{cfg['epochs']} epochs"
    )


def class_names(run: Run, codes: np.ndarray) -> list[str]:
    return [run.classes[c] for c in codes]


def predicted(run: Run, split: str) -> np.ndarray:
    return run.predictions[f"probs_{split}"].argmax(1)


def images_at(run: Run, split: str, positions: np.ndarray) -> np.ndarray:
    """(k, S, S, 3) uint8 display images of the samples at ``positions`` within ``split`` (reads only those)."""
    return run.images(split)[np.asarray(positions, dtype=np.int64)]


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
    return training_flags(
        chosen,
        class_names(run, run.labels("train")[positions]),
        run.flipped()[positions],
        review_decisions(run, chosen),
    )
