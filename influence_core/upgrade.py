"""The ranking upgrade: which better-measured whole-network settings the explorer ranks helpful / harmful
training images with instead of the defaults, and whether that is affordable on this run.

The policy: at the default settings, offer the engine method with the best measured LDS on the whole network
(``benchmarks/measured.json``, see :mod:`.measured`) when it beats the default's and its estimated CPU time is at
most :data:`AFFORDABLE_CPU_SECONDS` (on a GPU it always is).
"""

from __future__ import annotations

from dataclasses import dataclass

from .influence import METHODS, Method, Scope
from .influence.kfac.inverse import DEFAULT_FIT_EXAMPLES, KFAC
from .measured import TRACKS_PEARSON, MethodMeasurement, load_measured
from .pipeline import DEFAULT_SETTINGS, InfluenceSettings
from .run import Run
from .storage import resolve_device

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
            f"{self.settings.method.name} on the whole network (LDS {lds(self.measured)} against {lds(self.current)} "
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
    current = (load_measured() or {}).get((settings.method.name, settings.scope_key))
    best = best_whole_network_method()
    if current is None or current.lds is None or best is None or best.lds is None or best.lds <= current.lds:
        return None
    estimated = None
    if resolve_device(device).type != "cuda":
        estimated = estimated_cpu_seconds(run)
        if estimated > AFFORDABLE_CPU_SECONDS:
            return None
    upgraded = InfluenceSettings(method=Method.named(best.method), scope=Scope.ALL, checkpoints=False)
    return RankingUpgrade(upgraded, best, current, estimated)
