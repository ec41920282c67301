"""The numbers behind the app's charts and lists: readable histograms, label groups, top confusions.

Plain numpy/pandas (no plotting, no streamlit), so the pages only lay out and every rule here is tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

OTHERS, ALL = "all other labels", "all labels"


@dataclass(frozen=True)
class GroupedHistogram:
    """Counts of values in shared bins, one row per group, over a range that leaves the extreme outliers out.

    ``edges``: (bins + 1,) bin edges; ``counts``: (n_groups, bins) int64; ``groups``: n_groups names;
    ``below`` / ``above``: (n_groups,) int64 values left of ``edges[0]`` / right of ``edges[-1]`` (not drawn).
    """

    edges: np.ndarray
    counts: np.ndarray
    groups: list[str]
    below: np.ndarray
    above: np.ndarray

    @property
    def n_outside(self) -> int:
        return int(self.below.sum() + self.above.sum())

    def outliers_note(self) -> str:
        """One sentence on what the x-range leaves out ('' when nothing is)."""
        if not self.n_outside:
            return ""
        return (f"{self.n_outside:,} extreme values are left out of the x-range "
                f"({int(self.below.sum()):,} below {self.edges[0]:+.3g}, {int(self.above.sum()):,} above "
                f"{self.edges[-1]:+.3g}).")


def grouped_histogram(values: np.ndarray, codes: np.ndarray, groups: list[str], bins: int = 60,
                      percentiles: tuple[float, float] = (1, 99)) -> GroupedHistogram:
    """Histogram of ``values`` (n,) split by ``codes`` (n,) int in ``range(len(groups))``.

    The x-range is the ``percentiles`` range of all values widened by half its width on each side (no further
    than the data go, and always including 0, the helpful/harmful border), so a handful of huge influences cannot
    squeeze everything else into one bar; what falls outside is counted.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = (np.percentile(values, percentiles) if len(values) else (0.0, 0.0))
    margin = (hi - lo) / 2
    lo, hi = max(lo - margin, values.min(initial=0.0)), min(hi + margin, values.max(initial=0.0))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros((len(groups), bins), np.int64)
    inside = (values >= lo) & (values <= hi)
    index = np.clip(np.searchsorted(edges, values[inside], side="right") - 1, 0, bins - 1)
    np.add.at(counts, (codes[inside], index), 1)
    below = np.bincount(codes[values < lo], minlength=len(groups))
    above = np.bincount(codes[values > hi], minlength=len(groups))
    return GroupedHistogram(edges, counts, groups, below, above)


def label_groups(labels: np.ndarray, classes: list[str],
                 featured: list[tuple[int, str]]) -> tuple[np.ndarray, list[str]]:
    """Group training points by label: each featured class on its own, every other label pooled.

    ``labels``: (n,) class indices; ``featured``: (class index, role) pairs, e.g. ``[(3, "test image's label"),
    (5, "predicted")]`` — a class featured twice keeps its first role. Returns (codes (n,) int64, group names);
    the pooled group comes last ("all labels" when nothing is featured) and is dropped when no label falls in it.
    """
    roles: dict[int, str] = {}
    for c, role in featured:
        roles.setdefault(c, role)
    names = [f"{classes[c]} ({role})" if role else classes[c] for c, role in roles.items()]
    lookup = np.full(len(classes), len(roles), np.int64)
    lookup[list(roles)] = np.arange(len(roles))
    codes = lookup[np.asarray(labels)]
    if (codes == len(roles)).any():
        names.append(OTHERS if roles else ALL)
    return codes, names


def top_confusions(matrix: np.ndarray | list[list[int]], classes: list[str], k: int = 15) -> pd.DataFrame:
    """The ``k`` largest off-diagonal cells of a confusion matrix (rows: true, columns: predicted), largest first.

    Columns: ``true``, ``predicted``, ``test images``, ``share of true class`` (that count over the true class's
    test images). Empty cells are left out.
    """
    m = np.asarray(matrix, dtype=np.int64)
    off = m.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:k]
    rows, cols = np.unravel_index(flat, m.shape)
    keep = off[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    totals = np.maximum(m.sum(1), 1)
    return pd.DataFrame({"true": [classes[r] for r in rows], "predicted": [classes[c] for c in cols],
                         "test images": off[rows, cols], "share of true class": off[rows, cols] / totals[rows]})


def pages(n_items: int, per_page: int) -> int:
    """How many pages of ``per_page`` items ``n_items`` fill (at least 1)."""
    return max(1, -(-n_items // per_page))

