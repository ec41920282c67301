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
        return (
            f"{self.n_outside:,} extreme values are left out of the x-range "
            f"({int(self.below.sum()):,} below {self.edges[0]:+.3g}, {int(self.above.sum()):,} above "
            f"{self.edges[-1]:+.3g})."
        )


def grouped_histogram(
    values: np.ndarray, codes: np.ndarray, groups: list[str], bins: int = 60, percentiles: tuple[float, float] = (1, 99)
) -> GroupedHistogram:
    """Histogram of ``values`` (n,) split by ``codes`` (n,) int in ``range(len(groups))``.

    The x-range is the ``percentiles`` range of all values widened by half its width on each side (no further
    than the data go, and always including 0, the helpful/harmful border), so a handful of huge influences cannot
    squeeze everything else into one bar; what falls outside is counted.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, percentiles) if len(values) else (0.0, 0.0)
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


def label_groups(
    labels: np.ndarray, classes: list[str], featured: list[tuple[int, str]]
) -> tuple[np.ndarray, list[str]]:
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
    return pd.DataFrame(
        {
            "true": [classes[r] for r in rows],
            "predicted": [classes[c] for c in cols],
            "test images": off[rows, cols],
            "share of true class": off[rows, cols] / totals[rows],
        }
    )


def pages(n_items: int, per_page: int) -> int:
    """How many pages of ``per_page`` items ``n_items`` fill (at least 1)."""
    return max(1, -(-n_items // per_page))


CLAIM_HOLDS_AUROC, CLAIM_FAILS_AUROC = 0.7, 0.6
"""The notebook's claim "held" when ranking by lowest mean influence finds flips with AUROC ≥ 0.7 (and in most
labels flipped images have the lower mean); "did not hold" below 0.6 (near the 0.5 of guessing); else "partly held"."""
RANDOM_ELSEWHERE = (
    "on four tiny-imagenet pairs trained from scratch with horizontal flips only, random flips left the "
    "mean-influence signal near chance (AUROC 0.52–0.63; 0.59 on one with a pretrained backbone and exact head "
    "influence), and with random shifts, the training default for tiny-imagenet since 2026-11-30, the same pairs "
    "scored 0.75–0.88, still far below the loss during training (0.95–0.99)"
)
"""What random flips did to the claim on other runs (README, "Finding wrong labels")."""
TOP_INFLUENCE_IMPLICATION = (
    "The flipped images were the most influential ones of a clean run (the reference notebook's choice): flipping "
    "the label of an image that strongly supports its class makes it harmful by construction, so the claim is "
    "expected to hold here and says little about real mislabels."
)


@dataclass(frozen=True)
class ClaimCheck:
    """Does "flipped images have lower mean influence" (the reference notebook's claim) hold on one run?

    ``auroc``: of the lowest-mean-influence ranking at finding the flips (0.5 = guessing); ``labels_held`` of
    ``labels_tested`` (labels with both clean and flipped images) have a lower mean for the flipped ones;
    ``mode``: the run's corruption mode; ``verdict``: "held", "partly held" or "did not hold".
    """

    auroc: float
    labels_held: int
    labels_tested: int
    mode: str
    verdict: str

    def summary(self) -> str:
        return (
            f"The claim “flipped images have lower mean influence” **{self.verdict}** on this run: ranking by "
            f"lowest mean influence finds the flips with AUROC {self.auroc:.2f} (0.5 is guessing), and in "
            f"{self.labels_held} of {self.labels_tested} labels with flipped images their mean influence is "
            f"lower than the clean images'."
        )

    def implication(self) -> str:
        """What the verdict means for this corruption mode; never contradicts the run's own numbers."""
        if self.mode == "top-influence":
            return TOP_INFLUENCE_IMPLICATION
        if self.mode != "random":
            return f"Corruption mode {self.mode!r}."
        fair = "The flipped images were chosen at random, so this is a fair test of the claim"
        if self.verdict == "did not hold":
            return f"{fair}. Elsewhere it depended on the training: {RANDOM_ELSEWHERE}."
        return f"{fair}, and here the signal is above chance. It is not always: {RANDOM_ELSEWHERE}."


def check_notebook_claim(table: pd.DataFrame, auroc: float, mode: str) -> ClaimCheck:
    """The verdict from the run's own numbers: ``table`` from ``analysis.corruption_table`` (per label
    ``n_clean``, ``n_corrupted``, ``difference`` = clean mean − corrupted mean), ``auroc`` of the
    ``neg_mean_test_influence`` signal, ``mode`` from the run's corruption.json."""
    tested = table[(table["n_clean"] > 0) & (table["n_corrupted"] > 0)]
    held, n = int((tested["difference"] > 0).sum()), len(tested)
    if auroc >= CLAIM_HOLDS_AUROC and held * 3 >= 2 * n:
        verdict = "held"
    elif auroc < CLAIM_FAILS_AUROC or held * 2 < n:
        verdict = "did not hold"
    else:
        verdict = "partly held"
    return ClaimCheck(float(auroc), held, n, mode, verdict)
