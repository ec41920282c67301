"""Influence results for a run: compute once with :class:`~influence_core.influence.InfluenceModel`, cache on disk.

A cache entry lives in ``run_dir/influence/<key>/`` where ``key`` hashes the checkpoint files, the train and
test ids and labels, the settings and the method's :meth:`~influence_core.influence.Method.fingerprint` (its
options and what its ``"auto"`` options resolve to); a changed model, label or default is a miss. Entries are written to a
temporary folder and renamed into place, so an interrupted computation leaves nothing half-written::

    influences.zarr/                (n_test, n_train) float32, positive = helpful (final model), one shard per
                                    block of 4,096 training points (see :mod:`influence_core.results`)
    top_helpful_{positions,values}.npy, top_harmful_{positions,values}.npy   (n_test, 100) per test point
    mean_influence.npy              (n_train,) float64; mean_influence_by_label.npy (n_classes, n_train) float32
    histogram_edges.npy, histogram_counts.npy   (n_test, 2) lo/hi, (n_test, n_classes, 30) int32 by train label
    self_influence.npy              (n_train,) float32 (final model)
    checkpoint_self_influence.npy   (n_checkpoints, n_train) float32, one row per kept checkpoint + final
    curvature.pt                    fitted curvature tensors of the final model (state_dict of the method)
    meta.json                       settings, method (fingerprint), checkpoint names, timings_s
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .analysis import SIGNALS, cross_entropy
from .distributed import ClusterSpec
from .errors import InfluenceLensError
from .influence import (
    METHODS,
    Curvature,
    Damping,
    InfluenceFactors,
    InfluenceModel,
    Method,
    Scope,
    ScopeArg,
    default_damping,
    method_options,
    parse_scope,
    scope_text,
)
from .influence.engine import Images
from .influence.kfac.inverse import DEFAULT_FIT_EXAMPLES, KFAC
from .measured import TRACKS_PEARSON, MethodMeasurement, load_measured, measured_for, scope_note
from .paths import TEMP_PREFIX, InfluencePaths
from .progress import Progress, tagged
from .results import (
    COLUMN_BLOCK,
    TOP_K,
    BlockSummary,
    InfluenceStore,
    SummaryBuilder,
    column_blocks,
    create_matrix,
    open_matrix,
    summarise_block,
    write_histograms,
)
from .run import Run
from .rundir import remove_orphans, run_lock
from .second_pass import SECOND_PASS_SIGNAL, load_second_pass
from .storage import atomic_torch_save, atomic_write_json, file_hash, read_json, resolve_device, stable_hash

log = logging.getLogger(__name__)

METHOD_CHOICES = tuple(METHODS)
CACHE_VERSION = "influence-v5"  # bump when the engine's results or curvature.pt format change
DEFAULT_SIGNAL = "mean_loss"  # best first-pass AUROC measured on real data (README, "Finding wrong labels")


@dataclass(frozen=True)
class InfluenceSettings:
    """What decides an influence result (besides the run itself)."""

    method: str = "direct"  # a key of METHODS (default options)
    scope: ScopeArg = Scope.HEAD
    regularization: float | Damping | None = None  # None: default_damping(scope); a float is an absolute λ
    curvature: Curvature = Curvature.GAUSS_NEWTON
    checkpoints: bool = True  # also self-influence at every kept checkpoint (TracIn-style signal)
    options: tuple[tuple[str, Any], ...] = ()  # the method's options; () = its defaults. Given as pairs, a dict or
    # "KEY=VALUE" texts ({"rank": 1024}, ("rank=1024",)), stored as sorted (key, value) pairs

    def __post_init__(self):
        """Checks every choice and stores it typed (text such as ``"layer4.1.conv2,fc"`` or ``"top:1e-5"`` is read
        here, and no regularization becomes the scope's :func:`default_damping`); an absolute λ is kept as a plain
        float so that its cache key stays what it was."""
        if self.method not in METHODS:
            raise InfluenceLensError(
                f"Unknown influence method {self.method!r}.", f"use one of {', '.join(METHOD_CHOICES)}"
            )
        object.__setattr__(self, "scope", parse_scope(self.scope))
        if self.regularization is None:
            damping = default_damping(self.scope)
        elif isinstance(self.regularization, str):
            damping = Damping.parse(self.regularization)
        else:
            damping = Damping.of(self.regularization)
        if not math.isfinite(damping.value):  # Damping refuses λ ≤ 0 and NaN; an infinite λ gives all-zero influences
            raise InfluenceLensError(
                f"Regularization λ must be positive and finite, not {damping.value}.",
                "use e.g. 1e-3 (absolute) or top:1e-5 (relative to the curvature)",
            )
        object.__setattr__(self, "regularization", damping if damping.relative_to else damping.value)
        object.__setattr__(self, "curvature", Curvature.parse(self.curvature))
        given = self.options
        texts = not isinstance(given, dict) and all(isinstance(o, str) for o in given)  # "rank=1024", as the CLI
        options = method_options(given) if texts else dict(given)  # type: ignore[arg-type]
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        self.method_object.check_curvature(self.curvature)

    @property
    def method_object(self) -> Method:
        """The method with these settings' options (unknown options are a clear error)."""
        return Method.named(self.method, **dict(self.options))

    def influence_model(self, model, device: str = "auto", progress: Progress | None = None) -> InfluenceModel:
        """The (unfitted) engine for these settings."""
        return InfluenceModel(
            model,
            method=self.method_object,
            scope=self.scope,
            regularization=self.damping,
            curvature=self.curvature,
            device=device,
            progress=progress,
        )

    @property
    def damping(self) -> Damping:
        """The regularization as a :class:`Damping` (``regularization`` keeps an absolute λ as a float)."""
        assert self.regularization is not None  # resolved in __post_init__
        return Damping.of(self.regularization)

    def describe(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options)
        return f"{self.method}{options}, scope {scope_text(self.scope)}, λ={self.damping}, {self.curvature.value}"

    @property
    def scope_key(self) -> str:
        """``"head"``, ``"all"`` or ``"modules"``: how the benchmarks' measurements name the scope."""
        return self.scope.value if isinstance(self.scope, Scope) else "modules"

    def accuracy_note(self) -> str:
        """How exact these settings are, as the benchmarks measured them (``benchmarks/measured.json``, written
        next to the benchmark results; see :mod:`.measured`)."""
        scope = self.scope_key
        found = measured_for(self.method, scope)
        if found:
            if self.options:
                options = ", ".join(f"{k}={v}" for k, v in self.options)
                return f"{found.describe()} (Measured at {self.method}'s defaults, not with {options}.)"
            return found.describe()
        missing = f"Not measured by the benchmarks for {self.method} on scope {scope}."
        return " ".join(filter(None, (scope_note(scope), missing)))


DEFAULT_SETTINGS = InfluenceSettings()

AFFORDABLE_CPU_SECONDS = 300.0
"""A better-measured whole-network result is offered by default only when its estimated CPU time is at most this
(on a GPU it always is)."""
CPU_FIT_SECONDS = 2.0
"""Whole-network K-FAC on 2 CPU cores, the part of the fit that does not grow with the data: the
eigendecompositions of a ResNet18's Kronecker factors (calibration: :func:`estimated_cpu_seconds`)."""
CPU_FIT_SECONDS_PER_MEGAPIXEL_COLUMN = 4.5
"""The fit's pass (covariances) per million pixels of the images it is fitted on
(:data:`~.influence.kfac.inverse.DEFAULT_FIT_EXAMPLES` of the training set) and per output-curvature column."""
CPU_SCORE_SECONDS_PER_MEGAPIXEL = 4.0
"""Test factors, then the matrix and self-influence in one pass, per million training + test pixels."""


def estimated_cpu_seconds(run: Run) -> float:
    """Estimated seconds of the whole-network K-FAC upgrade (fit, test factors, matrix, self-influence) on
    ``run`` on 2 CPU cores: :data:`CPU_FIT_SECONDS` + :data:`CPU_FIT_SECONDS_PER_MEGAPIXEL_COLUMN` × fitted
    megapixels × output-curvature columns + :data:`CPU_SCORE_SECONDS_PER_MEGAPIXEL` × all megapixels.
    Convolution cost grows with the pixels; only the fit's backward passes grow with the columns.

    Calibrated on goldfish/lemon (880 + 110 images at 64 px, 1 column) and the app's digits demo (718 + 90 at
    16 px, 9 columns) with ``benchmarks/upgrade_timing.py``, 2026-11-30 22:55 (K-FAC with ``fit_positions``):
    estimated 22.9 s / 5.5 s, measured 19.1–20.9 s / 4.6–4.7 s (2 runs each) on this VM, so the estimate stays
    10–20 % above; with the constants of that afternoon it estimated 39.9 s / 11.7 s for 32.0–36.8 s / 6.7 s."""
    pixels = run.config["image_size"] ** 2 / 1e6
    n_train, n_test = len(run.labels("train")), len(run.labels("test"))
    columns = KFAC().backward_passes(run.n_classes)
    fitted = min(n_train, DEFAULT_FIT_EXAMPLES) * pixels
    return (
        CPU_FIT_SECONDS
        + CPU_FIT_SECONDS_PER_MEGAPIXEL_COLUMN * fitted * columns
        + CPU_SCORE_SECONDS_PER_MEGAPIXEL * (n_train + n_test) * pixels
    )


@dataclass(frozen=True)
class RankingUpgrade:
    """Settings whose helpful / harmful rankings measured better than the current ones, and by how much."""

    settings: InfluenceSettings
    measured: MethodMeasurement  # its LDS (benchmarks/measured.json)
    current: MethodMeasurement  # that of the settings it replaces
    estimated_s: float | None  # estimated CPU seconds (None on a GPU)

    def describe(self) -> str:
        """E.g. ``ekfac on the whole network (LDS 0.083 ± 0.015 against 0.073 ± 0.016 for the last layer, measured on
        goldfish vs lemon)``."""

        def lds(m: MethodMeasurement) -> str:
            return f"{m.lds:.3f}" + (f" ± {m.lds_se:.3f}" if m.lds_se is not None else "")

        where = self.measured.workload.split(",")[0]  # e.g. "goldfish vs lemon": measured there, not on this run
        return (
            f"{self.settings.method} on the whole network (LDS {lds(self.measured)} against {lds(self.current)} "
            f"for the last layer, measured on {where})"
        )

    def scale_note(self) -> str:
        """What the size of the upgraded values means, when the benchmark found that it does not track loss changes
        (empty otherwise)."""
        pearson = self.measured.pearson
        if pearson is None or abs(pearson) >= TRACKS_PEARSON:
            return ""
        return (
            "Its values order the training images; their size is not a loss change (against the retrained models' "
            f"loss changes, Pearson {pearson:.2f})."
        )


def best_whole_network_method() -> MethodMeasurement | None:
    """The engine method (at its defaults) with the best measured LDS on the whole network, if any was measured."""
    table = load_measured() or {}
    candidates = [m for (method, scope), m in table.items() if scope == "all" and method in METHODS and m.lds]
    return max(candidates, key=lambda m: m.lds or 0.0, default=None)


def ranking_upgrade(run: Run, settings: InfluenceSettings, device: str = "auto") -> RankingUpgrade | None:
    """What the explorer should rank helpful / harmful training images with instead of the default ``settings``:
    the product method with the best measured LDS on the whole network, when that beats the default's LDS and is
    affordable for ``run`` on ``device`` (see :data:`AFFORDABLE_CPU_SECONDS`). None when ``settings`` are not the
    defaults (a choice the user made stands), nothing measured better, or it would take too long."""
    if settings != DEFAULT_SETTINGS:
        return None
    current = (load_measured() or {}).get((settings.method, settings.scope_key))
    best = best_whole_network_method()
    if current is None or current.lds is None or best is None or best.lds is None or best.lds <= current.lds:
        return None
    estimated = None
    if resolve_device(device).type != "cuda":
        estimated = estimated_cpu_seconds(run)
        if estimated > AFFORDABLE_CPU_SECONDS:
            return None
    upgraded = InfluenceSettings(method=best.method, scope=Scope.ALL, checkpoints=False)
    return RankingUpgrade(upgraded, best, current, estimated)


@dataclass
class InfluenceResult:
    """A cached influence entry of a run, read lazily (:class:`~.results.InfluenceStore`), with the
    mislabel-suspicion signals derived from it. Nothing here reads the whole matrix."""

    run: Run
    path: Path

    @property
    def files(self) -> InfluencePaths:
        return InfluencePaths(self.path)

    @cached_property
    def meta(self) -> dict:
        return read_json(self.files.meta)

    @cached_property
    def store(self) -> InfluenceStore:
        return InfluenceStore(InfluencePaths(self.path))

    @property
    def influences(self):
        """(n_test, n_train) float32 zarr array read on demand: index rows (:meth:`row`), never load it whole."""
        return self.store.matrix

    def row(self, test: int) -> np.ndarray:
        """(n_train,) float32 influences of every training point on test point ``test``."""
        return self.store.row(test)

    def top_helpful(self, test: int, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
        """Positions (k,) int64 into the training split and influences (k,) float32, most helpful first."""
        return self.store.top_helpful(test, k)

    def top_harmful(self, test: int, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
        """Positions (k,) int64 and influences (k,) float32, most harmful (most negative) first."""
        return self.store.top_harmful(test, k)

    def histogram(self, test: int) -> tuple[np.ndarray, np.ndarray]:
        """Bin edges (bins + 1,) float64 shared by every label, counts (n_classes, bins) int64 by training label."""
        return self.store.histogram(test)

    @property
    def mean_influence(self) -> np.ndarray:
        """(n_train,) float64 mean influence of each training point over the test set."""
        return self.store.mean_influence

    @property
    def mean_influence_by_label(self) -> np.ndarray:
        """(n_classes, n_train) float32: mean influence over the test points of each (given) test label."""
        return self.store.mean_influence_by_label

    @property
    def self_influence(self) -> np.ndarray:
        """(n_train,) float32 self-influence at the final model."""
        return self.store.self_influence

    @cached_property
    def checkpoint_self_influence(self) -> np.ndarray:
        return np.load(self.files.checkpoint_self_influence)

    @property
    def signals(self) -> dict[str, np.ndarray]:
        """Signal key (see :data:`analysis.SIGNALS`) → (n_train,) float64, higher = more suspicious; with the
        run's second pass once it is computed (looked up on each call)."""
        out = dict(self._signals)
        if (second := load_second_pass(self.run)) is not None:
            out[SECOND_PASS_SIGNAL] = second.loss.astype(np.float64)
        return {k: out[k] for k in SIGNALS if k in out}

    @cached_property
    def _signals(self) -> dict[str, np.ndarray]:
        labels = self.run.labels("train")
        out = {
            "self_influence": self.self_influence.astype(np.float64),
            "neg_mean_test_influence": -self.mean_influence,
            "training_loss": cross_entropy(self.run.predictions["probs_train"], labels),
            "mean_margin": -self.run.dynamics["margin"].mean(0).astype(np.float64),
            "mean_loss": self.run.dynamics["loss"].mean(0).astype(np.float64),
        }
        if len(self.checkpoint_self_influence) > 1:
            out["checkpoint_self_influence"] = self.checkpoint_self_influence.sum(0).astype(np.float64)
        return out

    @property
    def best_signal(self) -> str:
        """The second pass once computed, else ``mean_loss`` (else final-model self-influence)."""
        signals = self.signals
        return next(k for k in (SECOND_PASS_SIGNAL, DEFAULT_SIGNAL, "self_influence") if k in signals)


def cache_key(run: Run, settings: InfluenceSettings) -> str:
    ckpts = run.checkpoint_paths() if settings.checkpoints else run.checkpoint_paths()[-1:]
    return stable_hash(
        CACHE_VERSION,
        [file_hash(p) for p in ckpts],
        *run.influence_inputs(),
        # the options are in the method's fingerprint; leaving them out here keeps the keys of earlier caches
        {k: v for k, v in dataclasses.asdict(settings).items() if k != "options"},
        settings.method_object.fingerprint(),
    )


def load_influence(run: Run, settings: InfluenceSettings = DEFAULT_SETTINGS) -> InfluenceResult | None:
    """The cached result for ``settings``, or None (never computes)."""
    entry = run.paths.influence_entry(cache_key(run, settings))
    return InfluenceResult(run, entry.root) if entry.is_complete() else None


def cached_results(run: Run) -> list[InfluenceResult]:
    """Every complete cache entry of the run, newest first (temporary folders of a computation and entries of
    older cache versions, with a whole ``influences.npy``, never count)."""
    root = run.paths.influence
    found = [InfluencePaths(p) for p in root.iterdir()] if root.is_dir() else []
    entries = [InfluenceResult(run, e.root) for e in found if e.is_complete() and e.influences.exists()]
    return sorted(entries, key=lambda r: r.meta.get("created", 0), reverse=True)


def compute_influence(
    run: Run,
    settings: InfluenceSettings = DEFAULT_SETTINGS,
    device: str = "auto",
    progress: Progress | None = None,
    recompute: bool = False,
    wait: bool = True,
    cluster: ClusterSpec | None = None,
) -> InfluenceResult:
    """Compute (or fetch) the influence matrix, its summaries, self-influence and checkpoint self-influence.

    Computes under the run directory's lock (``wait=False``: fail at once if another process holds it); status
    lines go to this module's logger. The matrix is scored and written by training column blocks
    (:mod:`.results`), here or, with ``cluster``, on the Dask workers it names (:mod:`.distributed`). Peak
    memory: the fitted curvature and test factors plus one block (``n_test × 4096`` float32) and the images of
    one engine batch."""
    key = cache_key(run, settings)
    final = run.paths.influence_entry(key).root
    if not recompute and InfluencePaths(final).is_complete():
        log.info("cached: %s", final)
        return InfluenceResult(run, final)
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    ckpts = run.checkpoint_paths() if settings.checkpoints else run.checkpoint_paths()[-1:]
    timings: dict[str, float] = {}
    checkpoint_si = []
    with writing_entry(run, key, wait=wait) as tmp:
        if not recompute and InfluencePaths(final).is_complete():  # computed by another process while we waited
            log.info("cached: %s", final)
            return InfluenceResult(run, final)
        for i, ckpt in enumerate(ckpts):
            is_final = i == len(ckpts) - 1
            tag = "final" if is_final else ckpt.stem
            model = run.load_model(ckpt)
            im = settings.influence_model(model, device=device, progress=tagged(progress, tag))
            t = time.perf_counter()
            im.fit(x_train, y_train)
            timings[f"fit_{tag}"] = time.perf_counter() - t
            t = time.perf_counter()
            if not is_final:
                checkpoint_si.append(
                    np.concatenate(
                        [im.self_influence(x_train[a:b], y_train[a:b]) for a, b in column_blocks(len(y_train))]
                    )
                )
                timings[f"self_influence_{tag}"] = time.perf_counter() - t
                continue
            factors = im.test_factors(x_test, y_test)
            timings["test_factors"] = time.perf_counter() - t
            t = time.perf_counter()
            scorer = BlockScorer(im, factors, x_train, y_train, y_test.numpy(), run.n_classes)
            create_matrix(tmp, len(y_test), len(y_train))
            summaries = SummaryBuilder(len(y_test), len(y_train), run.n_classes)
            if cluster is None:
                for a, b in column_blocks(len(y_train)):
                    summaries.add(scorer.score(tmp, a, b))
            else:
                from .distributed import score_on_cluster

                for summary in score_on_cluster(cluster, scorer, tmp, column_blocks(len(y_train))):
                    summaries.add(summary)
            timings["test_x_train_matrix_and_self_influence"] = time.perf_counter() - t
            summaries.write(tmp)
            checkpoint_si.append(summaries.self_influence)
            t = time.perf_counter()
            write_histograms(tmp, y_train.numpy(), run.n_classes)
            timings["histograms"] = time.perf_counter() - t
            atomic_torch_save(tmp.curvature, im.state_dict())
        np.save(tmp.checkpoint_self_influence, np.stack(checkpoint_si).astype(np.float32))
        timings["total"] = float(sum(timings.values()))
        atomic_write_json(
            tmp.meta,
            {
                "settings": dataclasses.asdict(settings),
                "method": settings.method_object.fingerprint(),  # options and what "auto" resolved to
                "checkpoints": [p.name for p in ckpts],
                "n_train": len(y_train),
                "n_test": len(y_test),
                "timings_s": timings,
                "created": time.time(),
                "device": str(im.device_),
                "workers": cluster.describe() if cluster else None,
                "matrix": {"dtype": "float32", "format": "zarr", "column_block": COLUMN_BLOCK, "top_k": TOP_K},
            },
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp.root, final)
    log.info("influence computed in %.1f s", timings["total"])
    return InfluenceResult(run, final)


@contextmanager
def writing_entry(run: Run, key: str, wait: bool = True) -> Iterator[InfluencePaths]:
    """Hold the run's lock and yield a fresh temporary folder ``influence/.tmp-<key>-<pid>`` for the entry ``key``;
    the caller renames ``tmp.root`` to ``run.paths.influence_entry(key).root`` when it is complete, else the folder
    is removed on exit. Also checks that the run was not retrained since ``run`` was opened, and removes the
    temporary folders of processes that are gone. ``wait=False``: fail at once if another process holds the lock."""
    with run_lock(run.paths, wait=wait):
        run.require_unchanged()
        remove_orphans(run.paths.influence, TEMP_PREFIX)
        tmp = run.paths.influence_temp(key, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield InfluencePaths(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class BlockScorer:
    """Scores training column blocks against fitted test factors and writes them into a result's matrix.

    Holds the fitted ``InfluenceModel`` ``im``, its ``factors`` for the test set, the training inputs (a lazy
    image source, ``x[a:b] -> (b - a, C, H, W)`` float32) and labels, the test labels ``(n_test,)`` int64 and the
    number of classes. Picklable, so :mod:`.distributed` ships one to each worker once.
    """

    im: InfluenceModel | None  # None in the template shipped to Dask workers, which rebuild their own
    factors: InfluenceFactors
    x_train: Images
    y_train: torch.Tensor
    test_labels: np.ndarray
    n_classes: int

    def score(self, paths: InfluencePaths, start: int, stop: int) -> BlockSummary:
        """Write ``I[:, start:stop]`` into ``paths``' matrix; return the block's summaries (incl. self-influence)."""
        assert self.im is not None, "a worker scores with its own rebuilt model (distributed.WorkerPayload)"
        x, y = self.x_train[start:stop], self.y_train[start:stop]
        block, self_inf = self.im.influences_and_self_influence(self.factors, x, y)
        open_matrix(paths, mode="r+")[:, start:stop] = block
        return summarise_block(block, start, self.test_labels, self.n_classes, self_inf)


def saliency_maps(
    run: Run, settings: InfluenceSettings, test_position: int, train_positions: list[int], device: str = "auto"
) -> np.ndarray:
    """Perturbation influence of the chosen training images on one test image: (k, S, S) float32.

    Uses the cached curvature of ``settings`` (computing the influence entry first if needed); cg and lissa,
    which cache no curvature, are fitted again.
    """
    import torch

    result = compute_influence(run, settings, device=device)
    im = settings.influence_model(run.load_model(), device=device)
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    state = torch.load(result.files.curvature, weights_only=True)
    if state:
        im.load_state_dict(state)
    else:  # iterative methods (cg, lissa) keep no fitted state: they solve against the data again
        im.fit(x_train, y_train)
    idx = torch.as_tensor(list(train_positions), dtype=torch.long)
    return im.saliency(
        x_test[test_position : test_position + 1], y_test[test_position : test_position + 1], x_train[idx], y_train[idx]
    )
