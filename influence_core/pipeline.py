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
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .analysis import best_signal, suspicion_signals
from .errors import InfluenceLensError
from .influence import (
    METHODS,
    Curvature,
    Damping,
    Direct,
    InfluenceModel,
    Method,
    Scope,
    ScopeArg,
    default_damping,
    parse_scope,
    scope_text,
)
from .influence.calculator import BlockCalculator, BlockScorer, SequentialCalculator
from .measured import measured_for, scope_note
from .paths import TEMP_PREFIX, InfluencePaths
from .progress import Progress, tagged
from .results import (
    COLUMN_BLOCK,
    TOP_K,
    InfluenceStore,
    SummaryBuilder,
    column_blocks,
    create_matrix,
    entry_problem,
    write_histograms,
)
from .run import Run
from .rundir import remove_orphans, run_lock
from .second_pass import load_second_pass
from .storage import atomic_torch_save, atomic_write_json, file_hash, read_json, stable_hash

log = logging.getLogger(__name__)

METHOD_CHOICES = tuple(METHODS)
CACHE_VERSION = "influence-v5"  # bump when the engine's results, curvature.pt or InfluenceSettings.record change


@dataclass(frozen=True)
class InfluenceSettings:
    """What decides an influence result (besides the run itself), as objects: text (the CLI's flags, the app's
    boxes) is read into them once, by :func:`parse_settings`."""

    method: Method = Direct()  # a configured method, e.g. EKFAC() or KFAC(rank=1024)
    scope: ScopeArg = Scope.HEAD
    damping: Damping | None = None  # λ of (H + λI)⁻¹; None: default_damping(scope), stored in its place
    curvature: Curvature = Curvature.GAUSS_NEWTON
    checkpoints: bool = True  # also self-influence at every kept checkpoint (TracIn-style signal)

    def __post_init__(self):
        """Checks the types (text belongs in :func:`parse_settings`) and that the method supports the curvature."""
        if not isinstance(self.method, Method):
            raise TypeError(f"method must be a Method (e.g. Direct()), not {self.method!r}; text: parse_settings()")
        if not isinstance(self.scope, Scope) and not (
            isinstance(self.scope, tuple) and self.scope and all(isinstance(n, str) for n in self.scope)
        ):
            raise TypeError(f"scope must be a Scope or a tuple of module names, not {self.scope!r}")
        if self.damping is None:
            object.__setattr__(self, "damping", default_damping(self.scope))
        elif not isinstance(self.damping, Damping):
            raise TypeError(f"damping must be a Damping (e.g. Damping.absolute(1e-3)), not {self.damping!r}")
        if not isinstance(self.curvature, Curvature):
            raise TypeError(f"curvature must be a Curvature, not {self.curvature!r}")
        self.method.check_curvature(self.curvature)

    def record(self) -> dict[str, Any]:
        """The settings as JSON, as cache keys (with the method's fingerprint) and ``meta.json`` store them. The
        layout is the first cache version's, so that keys of existing results stay valid: the method by name (its
        options are in its fingerprint), the damping as ``"regularization"``, an absolute one as a bare number."""
        damping = self.damping
        assert damping is not None  # resolved in __post_init__
        return {
            "method": self.method.name,
            "scope": self.scope,
            "regularization": dataclasses.asdict(damping) if damping.relative_to else damping.value,
            "curvature": self.curvature,
            "checkpoints": self.checkpoints,
        }

    def influence_model(self, model, device: str = "auto", progress: Progress | None = None) -> InfluenceModel:
        """The (unfitted) engine for these settings."""
        return InfluenceModel(
            model,
            method=self.method,
            scope=self.scope,
            damping=self.damping,
            curvature=self.curvature,
            device=device,
            progress=progress,
        )

    def describe(self) -> str:
        return f"{self.method.describe()}, scope {scope_text(self.scope)}, λ={self.damping}, {self.curvature.value}"

    @property
    def scope_key(self) -> str:
        """``"head"``, ``"all"`` or ``"modules"``: how the benchmarks' measurements name the scope."""
        return self.scope.value if isinstance(self.scope, Scope) else "modules"

    def accuracy_note(self) -> str:
        """How exact these settings are, as the benchmarks measured them (``benchmarks/measured.json``, written
        next to the benchmark results; see :mod:`.measured`)."""
        scope, name, options = self.scope_key, self.method.name, self.method.options()
        found = measured_for(name, scope)
        if found:
            if options:
                given = ", ".join(f"{k}={v}" for k, v in options.items())
                return f"{found.describe()} (Measured at {name}'s defaults, not with {given}.)"
            return found.describe()
        missing = f"Not measured by the benchmarks for {name} on scope {scope}."
        return " ".join(filter(None, (scope_note(scope), missing)))


def parse_settings(
    method: str = "direct",
    options: Iterable[str] = (),
    scope: str | Sequence[str] = Scope.HEAD,
    damping: str | Damping | None = None,
    curvature: str = Curvature.GAUSS_NEWTON,
    checkpoints: bool = True,
) -> InfluenceSettings:
    """Settings from text, as the CLI's ``influence`` flags and the app's boxes give them; every problem is an
    :class:`~.errors.InfluenceLensError` naming the value and its fix.

    ``method``: a key of :data:`~.influence.METHODS`; ``options``: ``"KEY=VALUE"`` texts read as each option's
    type (:meth:`~.influence.Method.parse`: ``["rank=1024", "fit_examples=none"]``); ``scope``: ``"head"``,
    ``"all"`` or module names (``"layer4.1.conv2,fc"``); ``damping``: ``"1e-3"`` (absolute), ``"top:1e-5"`` or
    ``"rel:0.1"`` (:meth:`~.influence.Damping.parse`), None for the scope's default; ``curvature``:
    ``"gauss-newton"`` or ``"hessian"``.
    """
    return InfluenceSettings(
        method=Method.parse(method, options),
        scope=parse_scope(scope),
        damping=Damping.parse(damping) if isinstance(damping, str) else damping,
        curvature=Curvature.parse(curvature),
        checkpoints=checkpoints,
    )


DEFAULT_SETTINGS = InfluenceSettings()


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
        """Signal key (see :data:`analysis.SIGNALS`) → (n_train,) float64, higher = more suspicious
        (:func:`run_signals` with this result)."""
        return run_signals(self.run, self)

    @property
    def best_signal(self) -> str:
        """The second pass once computed, else ``mean_loss`` (else final-model self-influence)."""
        return best_signal(self.signals)


def run_signals(run: Run, result: InfluenceResult | None = None) -> dict[str, np.ndarray]:
    """Signal key (see :data:`analysis.SIGNALS`) → (n_train,) float64, higher = more suspicious
    (:func:`analysis.suspicion_signals`): those of ``run``'s training, those of its influence ``result`` when given,
    and its second pass once it is computed (looked up on each call)."""
    second = load_second_pass(run)
    return suspicion_signals(
        labels=run.labels("train"),
        probs_train=run.predictions["probs_train"],
        dynamics=run.dynamics,
        self_influence=None if result is None else result.self_influence,
        mean_influence=None if result is None else result.mean_influence,
        checkpoint_self_influence=None if result is None else result.checkpoint_self_influence,
        second_pass_loss=None if second is None else second.loss,
    )


def cache_key(run: Run, settings: InfluenceSettings) -> str:
    ckpts = run.checkpoint_paths() if settings.checkpoints else run.checkpoint_paths()[-1:]
    return stable_hash(
        CACHE_VERSION,
        [file_hash(p) for p in ckpts],
        *run.influence_inputs(),
        settings.record(),
        settings.method.fingerprint(),
    )


def inputs_key(run: Run, checkpoints: bool = True) -> str:
    """Hash of what an entry depends on in the run (checkpoint files, train and test ids, labels and splits), kept
    in its ``meta.json``: an entry whose record differs was computed on another state of the run."""
    ckpts = run.checkpoint_paths() if checkpoints else run.checkpoint_paths()[-1:]
    return stable_hash("inputs-v1", [file_hash(p) for p in ckpts], *run.influence_inputs())


def usable_entry(run: Run, entry: InfluencePaths) -> bool:
    """Whether the entry is complete and whole (:func:`~.results.entry_problem`); a damaged one is logged, treated
    as absent and computed again when asked for."""
    if not entry.is_complete():
        return False
    problem = entry_problem(entry, len(run.labels("test")), len(run.labels("train")))
    if problem:
        log.warning("the cached influence entry %s is damaged (%s); it is computed again", entry.root.name, problem)
    return problem is None


def load_influence(run: Run, settings: InfluenceSettings = DEFAULT_SETTINGS) -> InfluenceResult | None:
    """The cached result for ``settings``, or None (never computes)."""
    entry = run.paths.influence_entry(cache_key(run, settings))
    return InfluenceResult(run, entry.root) if usable_entry(run, entry) else None


def ignored_entries(run: Run) -> dict[str, str]:
    """Entry name → why a complete cache entry of the run is not used: damaged, or computed on other checkpoints,
    ids or labels than the run's files hold now (e.g. a label edited in ``samples.csv``)."""
    root = run.paths.influence
    found = [InfluencePaths(p) for p in sorted(root.iterdir())] if root.is_dir() else []
    current = {inputs_key(run, True), inputs_key(run, False)}
    default = cache_key(run, DEFAULT_SETTINGS)
    out = {}
    for entry in found:
        if not (entry.is_complete() and entry.influences.exists()):
            continue
        problem = entry_problem(entry, len(run.labels("test")), len(run.labels("train")))
        if problem:
            out[entry.root.name] = f"damaged: {problem}"
        elif entry.root.name != default and read_json(entry.meta).get("inputs") not in current:
            out[entry.root.name] = "computed on other labels, samples or checkpoints than the run holds now"
    return out


def cached_results(run: Run) -> list[InfluenceResult]:
    """Every complete, whole cache entry computed on the run as it is now, newest first (temporary folders of a
    computation, entries of older cache versions, with a whole ``influences.npy``, and :func:`ignored_entries`
    never count)."""
    root = run.paths.influence
    found = [InfluencePaths(p) for p in root.iterdir()] if root.is_dir() else []
    ignored = ignored_entries(run)
    entries = [
        InfluenceResult(run, e.root)
        for e in found
        if e.is_complete() and e.influences.exists() and e.root.name not in ignored
    ]
    return sorted(entries, key=lambda r: r.meta.get("created", 0), reverse=True)


def compute_influence(
    run: Run,
    settings: InfluenceSettings = DEFAULT_SETTINGS,
    device: str = "auto",
    progress: Progress | None = None,
    recompute: bool = False,
    wait: bool = True,
    calculator: BlockCalculator | None = None,
) -> InfluenceResult:
    """Compute (or fetch) the influence matrix, its summaries, self-influence and checkpoint self-influence.

    Computes under the run directory's lock (``wait=False``: fail at once if another process holds it); status
    lines go to this module's logger. The matrix is scored and written by training column blocks
    (:mod:`.results`) by ``calculator``: in this process by default, or on Dask workers
    (:class:`~.influence.calculator.DaskCalculator`). Peak
    memory: the fitted curvature and test factors plus one block (``n_test × 4096`` float32) and the images of
    one engine batch."""
    calculator = calculator or SequentialCalculator()
    key = cache_key(run, settings)
    final = run.paths.influence_entry(key).root
    if not recompute and usable_entry(run, InfluencePaths(final)):
        log.info("cached: %s", final)
        return InfluenceResult(run, final)
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    ckpts = run.checkpoint_paths() if settings.checkpoints else run.checkpoint_paths()[-1:]
    timings: dict[str, float] = {}
    checkpoint_si = []
    with writing_entry(run, key, wait=wait) as tmp:
        if not recompute and usable_entry(run, InfluencePaths(final)):  # computed by another process meanwhile
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
            for summary in calculator.score(scorer, tmp, column_blocks(len(y_train))):
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
                "settings": {**settings.record(), "options": settings.method.options()},
                "method": settings.method.fingerprint(),  # options and what "auto" resolved to
                "checkpoints": [p.name for p in ckpts],
                "inputs": inputs_key(run, settings.checkpoints),  # see ignored_entries
                "n_train": len(y_train),
                "n_test": len(y_test),
                "timings_s": timings,
                "created": time.time(),
                "device": str(im.device_),
                "workers": calculator.describe(),
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


def saliency_maps(
    run: Run, settings: InfluenceSettings, test_position: int, train_positions: list[int], device: str = "auto"
) -> np.ndarray:
    """Perturbation influence of the chosen training images on one test image: (k, S, S) float32.

    Uses the cached curvature of ``settings`` (computing the influence entry first if needed); cg and lissa,
    which cache no curvature, are fitted again.
    """
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


def clean_run_scores(clean: Run, device: str = "auto", progress: Progress | None = None) -> np.ndarray:
    """Mean test influence of each training point of ``clean`` (n_train,) float64, for
    :func:`~.corruption.flip_top_influence`.

    Uses the run's cached default influence entry, computing it if missing. ``clean`` must have no flipped
    labels: the notebook ranks points by their influence in a clean model.
    """
    n_flipped = int(clean.flipped().sum())
    if n_flipped:
        raise InfluenceLensError(
            f"{clean.path} is not a clean run: {n_flipped} of its training labels are flipped.",
            "train a run without --corrupt-fraction and take the scores from it",
        )
    result = compute_influence(clean, DEFAULT_SETTINGS, device=device, progress=progress)
    return np.asarray(result.mean_influence, dtype=np.float64)
