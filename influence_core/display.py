"""The numbers behind the app's charts and lists: readable histograms, label groups, top confusions.

Plain numpy/pandas (no plotting, no streamlit), so the pages only lay out and every rule here is tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePath

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
"""The claim "held" when ranking by lowest mean influence finds flips with AUROC ≥ 0.7 (and in most labels flipped
images have the lower mean); "did not hold" below 0.6 (near the 0.5 of guessing); else "partly held"."""
RANDOM_ELSEWHERE = (
    "on four pairs of tiny-imagenet classes, randomly flipped labels were found by mean influence little better "
    "than by guessing when training only mirrored the images, and moderately better when training also shifted "
    "them (the default now); the loss during training found them far better on every one"
)
"""What random flips did to the claim on other runs (measured by the benchmarks; figures in the README)."""
TOP_INFLUENCE_IMPLICATION = (
    "The flipped images were the most influential ones of a clean run: flipping the label of an image that "
    "strongly supports its class makes it harmful by construction, so the claim is expected to hold here and "
    "says little about real mislabels."
)


def finding_words(auroc: float) -> str:
    """How well a ranking finds flipped labels, in words, from its AUROC (0.5 = guessing, 1 = perfect)."""
    if auroc >= 0.9:
        return "much better than guessing"
    if auroc >= CLAIM_HOLDS_AUROC:
        return "clearly better than guessing"
    if auroc >= CLAIM_FAILS_AUROC:
        return "a little better than guessing"
    return "no better than guessing"


@dataclass(frozen=True)
class ClaimCheck:
    """Does the claim "flipped images have lower mean influence" hold on one run?

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
        """The verdict in plain words (the figure is :meth:`figures`)."""
        return (
            f"The claim “flipped images have lower mean influence” **{self.verdict}** on this run: ranking by "
            f"lowest mean influence finds the flips {finding_words(self.auroc)}, and in "
            f"{self.labels_held} of {self.labels_tested} labels with flipped images their mean influence is "
            f"lower than the clean images'."
        )

    def figures(self) -> str:
        """The figure behind :meth:`summary`, for a help icon."""
        return (
            f"Detection AUROC {self.auroc:.2f}: the chance that a flipped image ranks above a clean one by lowest "
            f"mean influence (0.5 is guessing, 1 is perfect). “Held” needs at least {CLAIM_HOLDS_AUROC} and a "
            f"lower mean for the flipped images in two thirds of the labels; below {CLAIM_FAILS_AUROC} it did not "
            f"hold."
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


_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def plain(text: object) -> str:
    """``text`` as literal text inside Markdown (a reviewer name, a class name, a file id): every ASCII punctuation
    character backslash-escaped and line breaks made spaces, so ``**x** [a](javascript:…)`` shows as typed."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A text cell a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage return) with a
    leading apostrophe, which spreadsheets show as text; numbers and other values unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def export_csv(df: pd.DataFrame) -> str:
    """The CSV text of every download: ``df`` without its index, text cells and headers made
    :func:`spreadsheet_safe`, lines ended as RFC 4180 says (so a cell holding a line break is quoted)."""
    safe = df.rename(columns=lambda c: spreadsheet_safe(str(c)))
    text_columns = [c for c in safe.columns if not pd.api.types.is_numeric_dtype(safe[c])]
    safe[text_columns] = safe[text_columns].map(spreadsheet_safe)
    return safe.to_csv(index=False, lineterminator="\r\n")


def ago(when: str | datetime, now: datetime | None = None) -> str:
    """How long ago ``when`` (an ISO time with its zone, as the review store writes it) was, in words:
    "just now", "3 minutes ago", "2 hours ago", "yesterday", "5 days ago"."""
    then = datetime.fromisoformat(when) if isinstance(when, str) else when
    seconds = max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        count = int(seconds // size)
        if count:
            return "yesterday" if (unit, count) == ("day", 1) else f"{count} {unit}{'s' * (count > 1)} ago"
    return "just now"


DATASET_NAMES = {
    "demo": "handwritten digits (demo)",
    "tiny-imagenet": "Tiny ImageNet",
    "fashion-mnist": "Fashion-MNIST",
}


def dataset_name(spec: str) -> str:
    """A dataset spec as people name it, never a server path: ``"tiny-imagenet:/data/x/tiny-imagenet-200"`` →
    "Tiny ImageNet", ``"folder:/srv/pets"`` → "image folder “pets”", ``"demo"`` → "handwritten digits (demo)"."""
    kind, _, path = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "folder":
        return f"image folder “{PurePath(path.rstrip('/')).name or path}”"
    return DATASET_NAMES.get(kind, kind)


def short_id(sample_id: str, max_chars: int = 18) -> str:
    """A file id short enough for an image caption: its file name, with the middle of a long name replaced by
    "…" (``n01443537_123456.JPEG`` → ``n014435…3456.JPEG``), so a caption never wraps in the middle of a name."""
    name = PurePath(str(sample_id)).name
    if len(name) <= max_chars:
        return name
    tail = (max_chars - 1) // 2
    return f"{name[: max_chars - 1 - tail]}…{name[-tail:]}"


METHOD_WORDS = {
    "direct": "exact",
    "cg": "exact (iterative solve)",
    "lissa": "approximate (LiSSA series)",
    "arnoldi": "approximate (low-rank)",
    "kfac": "approximate (K-FAC)",
    "ekfac": "approximate (EK-FAC)",
}
SCOPE_WORDS = {"head": "the last layer", "all": "the whole network"}


def computation(method: str, scope: str) -> str:
    """Which computation influence values come from, in words: ``("direct", "head")`` → "exact influence through
    the last layer"; ``scope`` as ``InfluenceSettings.scope_key`` ("head", "all" or "modules")."""
    return f"{METHOD_WORDS.get(method, method)} influence through {SCOPE_WORDS.get(scope, 'chosen layers')}"


STAGE_WORDS = {
    "features": "gradients of the training images",
    "test factors": "the test images",
    "influences": "influence of every training image",
    "self-influence": "each training image's influence on itself",
    "saliency": "heat maps",
    "curvature": "the model's curvature",
    "final": "final model",
}


def stage_words(stage: str) -> str:
    """A progress stage in words: ``"epoch_4: features"`` → "model after epoch 4: gradients of the training
    images"; parts it does not know (``"epoch 3/15"``, ``"lissa"``) stay as they are."""

    def part(text: str) -> str:
        if text.startswith("epoch_") and text[6:].isdigit():
            return f"model after epoch {text[6:]}"
        return STAGE_WORDS.get(text, text)

    return ": ".join(part(p) for p in stage.split(": "))


def influence_unit(n_train: int) -> str:
    """What the size of an influence value means, for a run with ``n_train`` training images."""
    return (
        f"Positive helps, negative hurts; leaving the image out would change the test loss by about the value "
        f"÷ {n_train:,} (the number of training images)."
    )
