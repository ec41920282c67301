"""Influence results for a run: compute once with :class:`~influence_core.influence.InfluenceModel`, cache on disk.

A cache entry lives in ``run_dir/influence/<key>/`` where ``key`` hashes the checkpoint files, the train and
test ids and labels, and the settings; a changed model or label is a miss. Entries are written to a
temporary folder and renamed into place, so an interrupted computation leaves nothing half-written::

    influences.npy                  (n_test, n_train) float32, positive = helpful (final model)
    self_influence.npy              (n_train,) float32 (final model)
    checkpoint_self_influence.npy   (n_checkpoints, n_train) float32, one row per kept checkpoint + final
    curvature.pt                    fitted curvature tensors of the final model (state_dict of the method)
    meta.json                       settings, checkpoint names, timings_s
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .analysis import SIGNALS, cross_entropy
from .errors import InfluenceLensError
from .paths import TEMP_PREFIX, InfluencePaths
from .progress import Progress
from .run import Run
from .rundir import remove_orphans, run_lock
from .storage import atomic_torch_save, atomic_write_json, file_hash, read_json, stable_hash

log = logging.getLogger(__name__)

METHOD_CHOICES = ("direct", "cg", "lissa", "arnoldi", "kfac", "ekfac")
CACHE_VERSION = "influence-v2"  # bump when the engine's results or curvature.pt format change
DEFAULT_SIGNAL = "mean_loss"  # best AUROC measured on real data (README, "Finding wrong labels")


@dataclass(frozen=True)
class InfluenceSettings:
    """What decides an influence result (besides the run itself)."""

    method: str = "direct"
    scope: str = "head"
    regularization: float = 1e-3
    curvature: str = "gauss-newton"
    checkpoints: bool = True  # also self-influence at every kept checkpoint (TracIn-style signal)

    def __post_init__(self):
        if self.method not in METHOD_CHOICES:
            raise InfluenceLensError(f"Unknown influence method {self.method!r}.",
                                     f"use one of {', '.join(METHOD_CHOICES)}")
        if not self.regularization > 0:
            raise InfluenceLensError(f"Regularization λ must be positive, not {self.regularization}.",
                                     "for example 1e-3")

    def scope_arg(self) -> str | list[str]:
        """``head`` / ``all`` as is, anything else as a list of module names."""
        return self.scope if self.scope in ("head", "all") else [s.strip() for s in self.scope.split(",") if s.strip()]

    def describe(self) -> str:
        return f"{self.method}, scope {self.scope}, λ={self.regularization:g}, {self.curvature}"

    def accuracy_note(self) -> str:
        """How exact these settings are, with the error measured by ``benchmarks/run.py`` (see RESULTS.md)."""
        if self.scope == "head":
            return HEAD_ACCURACY[self.method]
        return WHOLE_NETWORK_ACCURACY


HEAD_ACCURACY = {
    "direct": "Exact on the last layer (matches a brute-force curvature to 2e-6).",
    "cg": "Exact up to the solver's tolerance on the last layer (relative error 5e-5 against direct).",
    "arnoldi": "Approximate: a low-rank inverse (20 directions by default). Measured on the last layer of "
               "goldfish/lemon: keeping 100 of its 1,026 directions gave relative error 0.19 against direct "
               "(Pearson 0.98); 20 directions gave Pearson 0.17.",
    "lissa": "Approximate at small λ: the series converges at a rate of about λ/scale per step. Measured on the "
             "last layer of goldfish/lemon at λ = 1e-3 after 300 steps: relative error 0.58 against direct "
             "(Pearson 0.82).",
    "kfac": "Approximate (Kronecker-factored curvature). Measured on the last layer of goldfish/lemon: relative "
            "error 2.1 against direct (Pearson 0.85); self-influence Pearson 0.9996.",
    "ekfac": "Approximate (Kronecker factors with fitted eigenvalues). Measured on the last layer of "
             "goldfish/lemon: relative error 1.6 against direct (Pearson 0.86); self-influence Pearson 0.9996.",
}
"""Per method, on the ``head`` scope: measured on goldfish vs lemon (880 / 110 images, ResNet18 from scratch)."""
WHOLE_NETWORK_ACCURACY = (
    "Approximate: influence functions assume the training loss is convex around the final weights, which a "
    "network trained from scratch is not. Measured on goldfish/lemon by retraining the whole network without the "
    "20 points EK-FAC ranked most helpful, most harmful, or random (3 test images): Pearson 0.91 between "
    "predicted and measured test-loss changes, but the predictions about 100 times too large and the sign right "
    "in 6 of 9 cases. EK-FAC on 880 images takes about 2.6 min on 2 CPU cores and about 3 s on a GPU.")


DEFAULT_SETTINGS = InfluenceSettings()


@dataclass
class InfluenceResult:
    """A cached influence entry of a run, with the mislabel-suspicion signals derived from it."""

    run: Run
    path: Path

    @property
    def files(self) -> InfluencePaths:
        return InfluencePaths(self.path)

    @cached_property
    def meta(self) -> dict:
        return read_json(self.files.meta)

    @cached_property
    def influences(self) -> np.ndarray:
        return np.load(self.files.influences)

    @cached_property
    def self_influence(self) -> np.ndarray:
        return np.load(self.files.self_influence)

    @cached_property
    def checkpoint_self_influence(self) -> np.ndarray:
        return np.load(self.files.checkpoint_self_influence)

    @cached_property
    def signals(self) -> dict[str, np.ndarray]:
        """Signal key (see :data:`analysis.SIGNALS`) → (n_train,) float64, higher = more suspicious."""
        labels = self.run.labels("train")
        out = {
            "self_influence": self.self_influence.astype(np.float64),
            "neg_mean_test_influence": -self.influences.mean(0).astype(np.float64),
            "training_loss": cross_entropy(self.run.predictions["probs_train"], labels),
            "mean_margin": -self.run.dynamics["margin"].mean(0).astype(np.float64),
            "mean_loss": self.run.dynamics["loss"].mean(0).astype(np.float64),
        }
        if len(self.checkpoint_self_influence) > 1:
            out["checkpoint_self_influence"] = self.checkpoint_self_influence.sum(0).astype(np.float64)
        return {k: out[k] for k in SIGNALS if k in out}

    @property
    def best_signal(self) -> str:
        return DEFAULT_SIGNAL if DEFAULT_SIGNAL in self.signals else "self_influence"


def cache_key(run: Run, settings: InfluenceSettings) -> str:
    ckpts = run.checkpoint_paths() if settings.checkpoints else run.checkpoint_paths()[-1:]
    samples = run.samples[run.samples["split"].isin(["train", "test"])]
    return stable_hash(CACHE_VERSION, [file_hash(p) for p in ckpts], samples["id"].tolist(),
                       samples["label"].to_numpy(), samples["split"].tolist(), dataclasses.asdict(settings))


def load_influence(run: Run, settings: InfluenceSettings = DEFAULT_SETTINGS) -> InfluenceResult | None:
    """The cached result for ``settings``, or None (never computes)."""
    entry = run.paths.influence_entry(cache_key(run, settings))
    return InfluenceResult(run, entry.root) if entry.is_complete() else None


def cached_results(run: Run) -> list[InfluenceResult]:
    """Every complete cache entry of the run, newest first (temporary folders of a computation never count)."""
    root = run.paths.influence
    folders = root.iterdir() if root.is_dir() else []
    entries = [InfluenceResult(run, p) for p in folders if InfluencePaths(p).is_complete()]
    return sorted(entries, key=lambda r: r.meta.get("created", 0), reverse=True)


def compute_influence(run: Run, settings: InfluenceSettings = DEFAULT_SETTINGS, device: str = "auto",
                      progress: Progress | None = None, recompute: bool = False, wait: bool = True) -> InfluenceResult:
    """Compute (or fetch) the influence matrix, self-influence and checkpoint self-influence of ``run``.

    Computes under the run directory's lock (``wait=False``: fail at once if another process holds it);
    status lines go to this module's logger."""
    from .influence import InfluenceModel

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
            im = InfluenceModel(model, scope=settings.scope_arg(), method=settings.method,
                                curvature=settings.curvature, regularization=settings.regularization,
                                device=device, progress=_tagged(progress, tag))
            t = time.perf_counter()
            im.fit(x_train, y_train)
            timings[f"fit_{tag}"] = time.perf_counter() - t
            t = time.perf_counter()
            checkpoint_si.append(im.self_influence(x_train, y_train))
            timings[f"self_influence_{tag}"] = time.perf_counter() - t
            if is_final:
                t = time.perf_counter()
                factors = im.test_factors(x_test, y_test)
                influences = im.influences(factors, x_train, y_train)
                timings["test_x_train_matrix"] = time.perf_counter() - t
                np.save(tmp.influences, np.asarray(influences, dtype=np.float32))
                atomic_torch_save(tmp.curvature, im.state_dict())
        si = np.stack(checkpoint_si).astype(np.float32)
        np.save(tmp.self_influence, si[-1])
        np.save(tmp.checkpoint_self_influence, si)
        timings["total"] = float(sum(timings.values()))
        atomic_write_json(tmp.meta, {
            "settings": dataclasses.asdict(settings), "checkpoints": [p.name for p in ckpts],
            "n_train": len(y_train), "n_test": len(y_test), "timings_s": timings, "created": time.time(),
            "device": str(im.device)})
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


def saliency_maps(run: Run, settings: InfluenceSettings, test_position: int, train_positions: list[int],
                  device: str = "auto") -> np.ndarray:
    """Perturbation influence of the chosen training images on one test image: (k, S, S) float32.

    Uses the cached curvature of ``settings`` (computing the influence entry first if needed); cg and lissa,
    which cache no curvature, are fitted again.
    """
    import torch

    from .influence import InfluenceModel

    result = compute_influence(run, settings, device=device)
    im = InfluenceModel(run.load_model(), scope=settings.scope_arg(), method=settings.method,
                        curvature=settings.curvature, regularization=settings.regularization, device=device)
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    state = torch.load(result.files.curvature, weights_only=True)
    if state:
        im.load_state_dict(state)
    else:  # iterative methods (cg, lissa) keep no fitted state: they solve against the data again
        im.fit(x_train, y_train)
    idx = torch.as_tensor(list(train_positions), dtype=torch.long)
    return im.saliency(x_test[test_position:test_position + 1], y_test[test_position:test_position + 1],
                       x_train[idx], y_train[idx])


def _tagged(progress: Progress | None, tag: str) -> Progress | None:
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{tag}: {stage}", done, total)
