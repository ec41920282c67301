"""The on-disk influence result: the (n_test, n_train) matrix in chunks, and summaries that never need it whole.

The matrix is a zarr array, float32 (the engine's values as computed, no rounding), sharded by training
column blocks: one shard file holds all test rows of :data:`COLUMN_BLOCK` training points, so whoever scores a
block (this process or a Dask worker on a shared file system) writes one file and never touches another's.
Inside a shard, chunks of :data:`ROW_CHUNK` rows make reading one test row cheap (one small chunk per shard).

While blocks are written, each one is summarised on its own (:func:`summarise_block`) and the summaries are
merged (:class:`SummaryBuilder`): per test point the top-``k`` helpful and harmful training points, per
training point the mean over the test set and the mean over the test points of each label. Per test point
histograms by training label need each row's range, so they are counted afterwards in one streaming pass over
row chunks of the written matrix (:func:`write_histograms`). Everything is read back lazily
(:class:`InfluenceStore`): memory-mapped ``.npy`` files, and matrix rows on demand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .paths import InfluencePaths

log = logging.getLogger(__name__)

COLUMN_BLOCK = 4096
"""Training points per shard (and per scoring task): a block holds ``n_test × 4096`` float32 (164 MB at 10k)."""
ROW_CHUNK = 16
"""Test rows per chunk inside a shard: reading one row reads ``16 × 4096 × 4`` bytes per shard."""
TOP_K = 100
"""Training points kept per test point and direction (helpful / harmful)."""
HISTOGRAM_BINS = 30


def create_matrix(paths: InfluencePaths, n_test: int, n_train: int):
    """An empty ``(n_test, n_train)`` float32 zarr array at ``paths.influences``, sharded by column blocks."""
    import zarr

    return zarr.create_array(
        store=str(paths.influences),
        shape=(n_test, n_train),
        dtype="float32",
        chunks=(ROW_CHUNK, COLUMN_BLOCK),
        shards=(-(-max(n_test, 1) // ROW_CHUNK) * ROW_CHUNK, COLUMN_BLOCK),
        compressors=None,
        fill_value=0.0,
        overwrite=True,
    )


def open_matrix(paths: InfluencePaths, mode: str = "r"):
    import zarr

    return zarr.open_array(str(paths.influences), mode=mode)


def column_blocks(n_train: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every training column block (one shard each)."""
    return [(s, min(s + COLUMN_BLOCK, n_train)) for s in range(0, n_train, COLUMN_BLOCK)]


@dataclass
class BlockSummary:
    """What one scored column block ``[start, stop)`` contributes to the summaries.

    ``helpful_*`` / ``harmful_*``: ``(n_test, k')`` global training positions (int64) and values (float32) of
    the block's largest / smallest influences per test row; ``column_mean`` ``(b,)`` float64 and
    ``label_mean`` ``(n_classes, b)`` float64 are the block's columns averaged over all test points / over the
    test points of each label; ``self_influence`` ``(b,)`` float32.
    """

    start: int
    stop: int
    helpful_positions: np.ndarray
    helpful_values: np.ndarray
    harmful_positions: np.ndarray
    harmful_values: np.ndarray
    column_mean: np.ndarray
    label_mean: np.ndarray
    self_influence: np.ndarray


def _top(values: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` largest ``values (n, m)`` sorted descending, with their ``positions (n, m)``."""
    k = min(k, values.shape[1])
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(values, part, 1)
    order = np.argsort(-top, axis=1, kind="stable")
    return (np.take_along_axis(np.take_along_axis(positions, part, 1), order, 1), np.take_along_axis(top, order, 1))


def summarise_block(
    block: np.ndarray, start: int, test_labels: np.ndarray, n_classes: int, self_influence: np.ndarray, k: int = TOP_K
) -> BlockSummary:
    """Summaries of ``block = I[:, start:start + b]`` ``(n_test, b)`` float32 (see :class:`BlockSummary`)."""
    n_test, b = block.shape
    positions = np.broadcast_to(np.arange(start, start + b, dtype=np.int64), block.shape)
    helpful = _top(block, positions, k)
    harmful_pos, harmful_neg = _top(-block, positions, k)
    order = np.argsort(test_labels, kind="stable")
    present, starts = np.unique(test_labels[order], return_index=True)
    sums = np.zeros((n_classes, b), np.float64)
    sums[present] = np.add.reduceat(block[order], starts, axis=0, dtype=np.float64)
    counts = np.bincount(test_labels, minlength=n_classes).astype(np.float64)
    label_mean = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return BlockSummary(
        start,
        start + b,
        *helpful,
        harmful_pos,
        -harmful_neg,
        block.mean(axis=0, dtype=np.float64),
        label_mean,
        np.asarray(self_influence, np.float32),
    )


class SummaryBuilder:
    """Merges :class:`BlockSummary` s (in any order) into the whole result's summaries and writes them."""

    def __init__(self, n_test: int, n_train: int, n_classes: int, k: int = TOP_K):
        self.n_train, self.k = n_train, k
        empty_pos, empty_val = np.zeros((n_test, 0), np.int64), np.zeros((n_test, 0), np.float32)
        self.helpful = (empty_pos, empty_val)
        self.harmful = (empty_pos, empty_val)
        self.column_mean = np.full(n_train, np.nan)
        self.label_mean = np.full((n_classes, n_train), np.nan)
        self.self_influence = np.full(n_train, np.nan, np.float32)

    def add(self, s: BlockSummary) -> None:
        self.helpful = _top(
            np.hstack([self.helpful[1], s.helpful_values]), np.hstack([self.helpful[0], s.helpful_positions]), self.k
        )
        neg_pos, neg_val = _top(
            np.hstack([-self.harmful[1], -s.harmful_values]), np.hstack([self.harmful[0], s.harmful_positions]), self.k
        )
        self.harmful = (neg_pos, -neg_val)
        self.column_mean[s.start : s.stop] = s.column_mean
        self.label_mean[:, s.start : s.stop] = s.label_mean
        self.self_influence[s.start : s.stop] = s.self_influence

    def write(self, paths: InfluencePaths) -> None:
        """Write the merged summaries (every block must have been added)."""
        if np.isnan(self.column_mean).any():
            missing = int(np.isnan(self.column_mean).sum())
            raise RuntimeError(f"{missing} training columns were never scored")
        np.save(paths.top_helpful_positions, self.helpful[0].astype(np.int32))
        np.save(paths.top_helpful_values, self.helpful[1])
        np.save(paths.top_harmful_positions, self.harmful[0].astype(np.int32))
        np.save(paths.top_harmful_values, self.harmful[1])
        np.save(paths.mean_influence, self.column_mean)
        np.save(paths.mean_influence_by_label, self.label_mean.astype(np.float32))
        np.save(paths.self_influence, self.self_influence)


def write_histograms(
    paths: InfluencePaths, train_labels: np.ndarray, n_classes: int, bins: int = HISTOGRAM_BINS
) -> None:
    """Per test row: ``bins`` equal bins from the row's minimum to its maximum (``histogram_edges`` ``(n_test,
    2)`` float32 lo/hi) and counts per training label (``histogram_counts`` ``(n_test, n_classes, bins)`` int32),
    in one pass over row chunks of the written matrix (memory: ``ROW_CHUNK × n_train`` float32 at a time)."""
    matrix = open_matrix(paths)
    n_test, _ = matrix.shape
    edges = np.lib.format.open_memmap(paths.histogram_edges, mode="w+", dtype=np.float32, shape=(n_test, 2))
    counts = np.lib.format.open_memmap(
        paths.histogram_counts, mode="w+", dtype=np.int32, shape=(n_test, n_classes, bins)
    )
    label_offset = train_labels.astype(np.int64) * bins
    for start in range(0, n_test, ROW_CHUNK):
        rows = np.asarray(matrix[start : start + ROW_CHUNK], dtype=np.float32)
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        width = np.where(hi > lo, hi - lo, 1.0)
        index = np.clip(((rows - lo[:, None]) / width[:, None] * bins).astype(np.int64), 0, bins - 1)
        for r in range(len(rows)):
            counts[start + r] = np.bincount(label_offset + index[r], minlength=n_classes * bins).reshape(
                n_classes, bins
            )
        edges[start : start + len(rows)] = np.stack([lo, hi], axis=1)
    counts.flush()
    edges.flush()


class InfluenceStore:
    """Lazy read access to a written result (everything memory-mapped or read by the row)."""

    def __init__(self, paths: InfluencePaths):
        self.paths = paths

    @cached_property
    def matrix(self):
        """The ``(n_test, n_train)`` float32 zarr array; index it (``matrix[t]``), never read it whole."""
        return open_matrix(self.paths)

    def row(self, test: int) -> np.ndarray:
        """``(n_train,)`` float32 influences of every training point on test point ``test``."""
        return np.asarray(self.matrix[int(test)], dtype=np.float32)

    def _npy(self, path) -> np.ndarray:
        return np.load(path, mmap_mode="r")

    def top_helpful(self, test: int, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most helpful training points for ``test``: positions ``(k,)`` int64, values ``(k,)``
        float32, most helpful first."""
        return (
            np.asarray(self._npy(self.paths.top_helpful_positions)[test, :k], np.int64),
            np.asarray(self._npy(self.paths.top_helpful_values)[test, :k], np.float32),
        )

    def top_harmful(self, test: int, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most harmful training points for ``test`` (most negative influence first)."""
        return (
            np.asarray(self._npy(self.paths.top_harmful_positions)[test, :k], np.int64),
            np.asarray(self._npy(self.paths.top_harmful_values)[test, :k], np.float32),
        )

    def histogram(self, test: int) -> tuple[np.ndarray, np.ndarray]:
        """Edges ``(bins + 1,)`` float64 shared by all labels and counts ``(n_classes, bins)`` int64 of the
        influences of each training label's points on ``test``."""
        lo, hi = self._npy(self.paths.histogram_edges)[test]
        counts = np.asarray(self._npy(self.paths.histogram_counts)[test], np.int64)
        return np.linspace(float(lo), float(hi), counts.shape[1] + 1), counts

    @cached_property
    def mean_influence(self) -> np.ndarray:
        return np.load(self.paths.mean_influence)

    @cached_property
    def mean_influence_by_label(self) -> np.ndarray:
        return np.load(self.paths.mean_influence_by_label, mmap_mode="r")

    @cached_property
    def self_influence(self) -> np.ndarray:
        return np.load(self.paths.self_influence)
