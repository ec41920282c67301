"""Measured accuracy and cost of each influence method, as data written by the benchmarks.

``benchmarks/lds.py score --measured influence_core/data/measured.json`` writes the file (:func:`write_measured`), which
ships with the package as package data; the app shows :meth:`MethodMeasurement.describe` (plain words) next to each
method's name, the figures (:meth:`MethodMeasurement.details`) behind a help icon. Format::

    {"workload": "goldfish vs lemon, 880 train / 110 test, 32 px, ResNet18 from scratch, 15 epochs, 10 % flips",
     "n_models": M, "commit": "abc1234", "created": "<UTC time of writing>",
     "methods": {"<method>/<scope>": {"job": "ours_ekfac_all", "lds": 0.21 | null, "lds_se": 0.02 | null,
                                      "slope": 0.01 | null, "cost_x_floor": 31.0 | null,
                                      "fidelity": "rel. err 1.6 vs direct (head)" | null,
                                      "full_lds": 0.23 | null,
                                      "note": "what the measurements mean for a user" | null}}}

``lds``: linear datamodeling score (mean over test points of the Spearman correlation between the margins of
M models retrained on random halves of the training set and the sums of the method's influences over each half);
``slope``: measured over predicted loss change on those halves (1 = calibrated magnitudes), ``pearson``: their
correlation (below :data:`TRACKS_PEARSON` the slope means nothing and the app says so); ``cost_x_floor``: time
to the full test × train matrix in multiples of one forward+backward pass (``benchmarks/run.py``); ``full_lds``:
the LDS of the same method without its cost-saving approximations (K-FAC/EK-FAC with every eigenvector, example
and position), where measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np

from influence_core.storage import atomic_write_json

MEASURED_FILE = Path(str(files("influence_core") / "data" / "measured.json"))
"""The measurements that ship with the package (package data, so an installed wheel has them too)."""


TRACKS_PEARSON = 0.2
"""Below this Pearson correlation between predicted and measured loss changes the predictions do not track them,
and the app shows no magnitude factor (a least-squares slope of uncorrelated numbers is noise)."""


@dataclass(frozen=True)
class MethodMeasurement:
    """What the benchmark measured for one method and scope."""

    method: str
    scope: str
    job: str
    lds: float | None
    lds_se: float | None
    workload: str
    n_models: int
    slope: float | None = None
    cost_x_floor: float | None = None
    fidelity: str | None = None
    note: str | None = None
    pearson: float | None = None
    full_lds: float | None = None

    def describe(self) -> str:
        """For screens, in plain words: exact or approximate, how well the method agreed with retraining, whether
        its values' sizes mean anything, and its cost. The figures behind it are :meth:`details` (for a help icon)."""
        first = (self.note or "").split(" ")[0].rstrip(":.,")
        parts = [f"{first}."] if first in ("Exact", "Approximate") else []
        if self.lds is not None:
            parts.append(f"Agreement with retraining: {agreement(self.lds)}.")
        if self.pearson is not None and abs(self.pearson) < TRACKS_PEARSON:
            parts.append("The sizes of its values do not follow the loss changes of retraining: use its order.")
        elif self.slope is not None and self.slope <= 0:
            parts.append("Its values point the wrong way on average: use them with care.")
        if self.cost_x_floor is not None:
            parts.append(f"Takes about {self.cost_x_floor:.2g}× the time of one pass of the model over the images.")
        return " ".join(parts)

    def details(self) -> str:
        """The figures behind :meth:`describe`, e.g. ``LDS 0.21 ± 0.02 (50 retrained models; goldfish vs lemon …)``,
        the magnitude slope, the cost and the benchmark's note: for help icons and reports."""
        parts = []
        if self.lds is not None:
            se = f" ± {self.lds_se:.2f}" if self.lds_se is not None else ""
            parts.append(f"LDS {self.lds:.2f}{se} ({self.n_models} retrained models; {self.workload})")
            if self.full_lds is not None:
                parts.append(
                    f"without its projections and fit subsets (every eigenvector, example and position) "
                    f"{self.full_lds:.3f} against {self.lds:.3f}"
                )
        if self.pearson is not None and abs(self.pearson) < TRACKS_PEARSON:
            parts.append(
                f"predicted loss changes do not track those of the retrained models (Pearson {self.pearson:.2f})"
            )
        elif self.slope is not None:
            parts.append(
                f"magnitudes ×{1 / self.slope:.3g} the measured loss changes"
                if self.slope > 0
                else "predicted loss changes have the wrong sign on average"
            )
        if self.cost_x_floor is not None:
            parts.append(f"{self.cost_x_floor:.3g}× a forward+backward pass")
        if self.fidelity:
            parts.append(self.fidelity)
        measured = ("Measured: " + "; ".join(parts) + ".") if parts else ""
        return " ".join(p for p in (self.note, measured) if p)


AGREEMENT = ((0.35, "good"), (0.2, "fair"), (float("-inf"), "weak"))
"""Words for the linear datamodeling score (LDS, a rank correlation with retrained models; 0 = none, 1 = perfect):
the best methods of the benchmarks score about 0.4 on the whole network and 0.3 on the last layer, gradient
similarity about 0.17."""


def agreement(lds: float) -> str:
    """How well a method's influences agreed with retraining, in one word: good, fair or weak."""
    return next(word for floor, word in AGREEMENT if lds >= floor)


def load_measured(path: str | Path | None = None) -> dict[tuple[str, str], MethodMeasurement] | None:
    """``(method, scope) → measurement`` from ``path`` (default :data:`MEASURED_FILE`), or None when absent."""
    data = _read(path)
    if data is None:
        return None
    out = {}
    for key, m in data["methods"].items():
        method, _, scope = key.partition("/")
        out[(method, scope)] = MethodMeasurement(
            method,
            scope,
            m["job"],
            m.get("lds"),
            m.get("lds_se"),
            data["workload"],
            data["n_models"],
            m.get("slope"),
            m.get("cost_x_floor"),
            m.get("fidelity"),
            m.get("note"),
            m.get("pearson"),
            m.get("full_lds"),
        )
    return out


def scope_note(scope: str, path: str | Path | None = None) -> str | None:
    """What the benchmarks found for a whole scope (e.g. the whole network), whatever the method, in plain words
    (the note's first sentence; its figures are :func:`scope_details`), or None."""
    found = scope_details(scope, path)
    return None if found is None else found.split(". ")[0].rstrip(".") + "."


def scope_details(scope: str, path: str | Path | None = None) -> str | None:
    """The benchmarks' full note on a scope, figures included (for help icons and reports), or None."""
    data = _read(path)
    return None if data is None else data.get("scope_notes", {}).get(scope)


def _read(path: str | Path | None) -> dict | None:
    """The parsed file at ``path`` (default :data:`MEASURED_FILE`), or None when absent; parsed once per version
    of the file (the app asks for it once per method on every rerun, and a benchmark may rewrite it)."""
    path = Path(path) if path else MEASURED_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _parse(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _parse(path: str, mtime_ns: int, size: int) -> dict:
    return json.loads(Path(path).read_text())


def method_label(method: str, scope: str, path: str | Path | None = None) -> str:
    """A method's name for pickers, with its measured agreement with retraining on ``scope`` when there is one:
    ``"ekfac · agreement with retraining: fair"``."""
    found = measured_for(method, scope, path)
    return (
        method
        if found is None or found.lds is None
        else f"{method} · agreement with retraining: {agreement(found.lds)}"
    )


def measured_for(method: str, scope: str, path: str | Path | None = None) -> MethodMeasurement | None:
    """The measurement of one method and scope, or None (no file, or not measured)."""
    table = load_measured(path)
    return None if table is None else table.get((method, scope))


# ------------------------------------------------------------------------------- writing (benchmarks/lds.py)
def job_method_scope(job: str) -> tuple[str, str] | None:
    """``ours_ekfac_all`` → (ekfac, all), ``tracin_all`` → (tracin, all); None for damping-scan, full-rank,
    fit-size, rank, depth, fitted-position and test-subset
    variants and for the peers' jobs (the app shows the LDS of the product's own methods
    at their defaults)."""
    if any(
        tag in job for tag in ("_lambda", "_rel", "_top", "_full", "_fit", "_first", "_rank", "_pos", "_depth")
    ) or job.startswith(("kronfluence_", "pydvl_")):
        return None
    parts = job.removeprefix("ours_").rsplit("_", 1)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def write_measured(
    result: dict,
    path: Path,
    bench_results: Path | None = None,
    matrices: Path | None = None,
    commit: str = "",
) -> dict:
    """The measurements file (this module's format) from ``benchmarks/lds.py``'s LDS scores ``result``, with the
    cost (× floor) of ``benchmarks/run.py``'s results.json if given, and for every head job the relative error
    of its matrix against ``ours_direct_head`` (the exact head at the same damping) in ``matrices`` if given.
    ``commit``: the checkout's commit, recorded in the file."""
    report = json.loads(bench_results.read_text()) if bench_results and bench_results.is_file() else None
    exact = matrices / "ours_direct_head.npy" if matrices else None
    exact_head = np.load(exact).astype(np.float64) if exact and exact.is_file() else None
    recipe = result["workload"]
    before = json.loads(path.read_text()) if path.is_file() else {}
    previous = before.get("methods", {})
    methods = {}
    for job, s in result["scores"].items():
        key = job_method_scope(job)
        if key is None:
            continue
        entry = {
            "job": job,
            "lds": round(s["margin"]["lds"], 4),
            "lds_se": round(s["margin"]["se"], 4),
            "slope": s["magnitude"]["slope"],
            "pearson": s["magnitude"].get("pearson"),
            # the measured accuracy text, and cost and fidelity from an earlier benchmark run, stay unless remeasured
            "cost_x_floor": previous.get("/".join(key), {}).get("cost_x_floor"),
            "fidelity": previous.get("/".join(key), {}).get("fidelity"),
            "note": previous.get("/".join(key), {}).get("note"),
        }
        full = result["scores"].get(f"{job}_full")
        if full is not None:
            entry["full_lds"] = round(full["margin"]["lds"], 4)
        if report:
            entry["cost_x_floor"] = job_cost(report, job, default=entry["cost_x_floor"])
        if (
            exact_head is not None
            and matrices is not None
            and key[1] == "head"
            and job != "ours_direct_head"
            and job.startswith("ours_")
        ):
            m = np.load(matrices / f"{job}.npy").astype(np.float64)
            error = np.linalg.norm(m - exact_head) / np.linalg.norm(exact_head)
            entry["fidelity"] = f"rel. err {error:.2g} vs exact direct (head, same damping)"
        methods["/".join(key)] = entry
    data = {
        "workload": f"{' vs '.join(recipe['classes'])}, {recipe['image_size']} px, ResNet18 from scratch, "
        f"{recipe['epochs']} epochs, {recipe['corrupt_fraction']:.0%} flipped labels, "
        + (f"random shifts up to {recipe['augment_shift']:.0%}" if recipe.get("augment_shift") else "no random shifts"),
        "n_models": result["n_models"],
        "commit": commit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": {**{k: v for k, v in previous.items() if k not in methods}, **methods},
        **({"costs_from": costs_source(report)} if report else {k: v for k, v in before.items() if k == "costs_from"}),
        "scope_notes": before.get("scope_notes", {}),
    }
    atomic_write_json(path, data)
    return data


def job_cost(report: dict, job: str, default: float | None = None) -> float | None:
    """Seconds to ``job``'s full matrix (fit included) over the floor of ``run.py``'s ``report``; ``default`` when
    that run did not time it."""
    matrix = (report.get("jobs", {}).get(job) or {}).get("matrix") or {}
    if "seconds_full" not in matrix:
        return default
    return round(matrix["seconds_full"] / report["floor"]["forward_backward_s"], 2)


def costs_source(report: dict) -> str:
    """Where measured.json's costs come from: the ``run.py`` run's date and floor."""
    return (
        f"benchmarks/run.py of {report['date']}, forward+backward floor {report['floor']['forward_backward_s']:.2f} s"
    )


def update_costs(path: Path, bench_results: Path) -> dict:
    """Replace every method's ``cost_x_floor`` in ``path`` (measured.json) by ``run.py``'s ``bench_results``
    where that run has the method's job; the LDS and notes stay."""
    report = json.loads(bench_results.read_text())
    data = json.loads(path.read_text())
    for entry in data["methods"].values():
        entry["cost_x_floor"] = job_cost(report, entry["job"], default=entry["cost_x_floor"])
    data["costs_from"] = costs_source(report)
    atomic_write_json(path, data)
    return data
