"""Scoring an influence matrix by training column blocks, in this process or on a Dask cluster.

As pyDVL's ``SequentialInfluenceCalculator`` / ``DaskInfluenceCalculator``, a calculator takes a fitted engine
and maps the scoring of the matrix over blocks; here the blocks are columns of training points and each one is
written straight into the result's zarr matrix (:mod:`influence_core.results`), so only its small summaries come
back. :class:`SequentialCalculator` scores them one after the other; :class:`DaskCalculator` (the optional ``dask``
extra: ``pip install '.[dask]'``) ships the fitted model, its curvature state and the test factors to every
worker once (``client.scatter(..., broadcast=True)``) and maps one task per block over them. Each worker scores
its blocks on its own device (CPU, or the GPU matching its index when there are several), so the run directory
must be on a file system every worker sees under the same path. A task whose worker dies is retried on another
(``retries``); when every worker holding the shipped payload is lost, the payload is shipped again and the
cancelled blocks resubmitted. Blocks are whole shard files, so a block scored twice simply rewrites its file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..errors import InfluenceLensError
from ..paths import InfluencePaths
from ..results import BlockSummary, open_matrix, summarise_block
from .engine import Images, InfluenceFactors, InfluenceModel

log = logging.getLogger(__name__)

Blocks = Sequence[tuple[int, int]]
"""``(start, stop)`` column ranges of training points."""


@dataclass
class BlockScorer:
    """Scores training column blocks against fitted test factors and writes them into a result's matrix.

    Holds the fitted ``InfluenceModel`` ``im``, its ``factors`` for the test set, the training inputs (a lazy
    image source, ``x[a:b] -> (b - a, C, H, W)`` float32) and labels, the test labels ``(n_test,)`` int64 and the
    number of classes. Picklable, so :class:`DaskCalculator` ships one to each worker once.
    """

    im: InfluenceModel | None  # None in the template shipped to Dask workers, which rebuild their own
    factors: InfluenceFactors
    x_train: Images
    y_train: torch.Tensor
    test_labels: np.ndarray
    n_classes: int

    def score(self, paths: InfluencePaths, start: int, stop: int) -> BlockSummary:
        """Write ``I[:, start:stop]`` into ``paths``' matrix; return the block's summaries (incl. self-influence)."""
        assert self.im is not None, "a worker scores with its own rebuilt model (WorkerPayload.local_scorer)"
        x, y = self.x_train[start:stop], self.y_train[start:stop]
        block, self_inf = self.im.influences_and_self_influence(self.factors, x, y)
        open_matrix(paths, mode="r+")[:, start:stop] = block
        return summarise_block(block, start, self.test_labels, self.n_classes, self_inf)


class BlockCalculator(Protocol):
    def score(self, scorer: BlockScorer, paths: InfluencePaths, blocks: Blocks) -> Iterator[BlockSummary]:
        """Score ``blocks`` of ``scorer`` into ``paths``' matrix; yield each block's summaries as it completes
        (in any order)."""
        ...

    def describe(self) -> str | None:
        """Where the blocks are scored, for ``meta.json`` (None: in this process)."""
        ...


class SequentialCalculator:
    """Scores the blocks one after the other in this process (peak memory: one block, ``n_test × 4096``)."""

    def score(self, scorer: BlockScorer, paths: InfluencePaths, blocks: Blocks) -> Iterator[BlockSummary]:
        for start, stop in blocks:
            yield scorer.score(paths, start, stop)

    def describe(self) -> str | None:
        return None


@dataclass(frozen=True)
class DaskCalculator:
    """Scores the blocks on a Dask cluster: a running scheduler's address (``tcp://host:8786``), or ``workers``
    local processes (a ``LocalCluster`` started and stopped around the computation). ``retries``: attempts per
    block after a failure. Methods that keep no fitted curvature (cg, lissa) cannot be shipped."""

    scheduler: str | None = None
    workers: int | None = None
    retries: int = 2

    def __post_init__(self):
        if (self.scheduler is None) == (self.workers is None):
            raise InfluenceLensError(
                "Give either a scheduler address or a number of local workers, not both.",
                "use --scheduler tcp://HOST:8786 or --workers N",
            )
        if self.workers is not None and self.workers < 1:
            raise InfluenceLensError(f"--workers must be at least 1, not {self.workers}.", "for example --workers 2")

    def describe(self) -> str:
        return f"scheduler {self.scheduler}" if self.scheduler else f"LocalCluster with {self.workers} workers"

    def score(self, scorer: BlockScorer, paths: InfluencePaths, blocks: Blocks) -> Iterator[BlockSummary]:
        from distributed import as_completed

        im = scorer.im
        assert im is not None
        state = im.state_dict()
        if not state:
            raise InfluenceLensError(
                f"Method {im.method.name!r} keeps no fitted curvature to ship to workers.",
                "use direct, arnoldi, kfac or ekfac with --scheduler / --workers",
            )
        model = im.model.to("cpu")
        payload = WorkerPayload(
            model,
            {
                "scope": im.scope,
                "method": im.method,
                "curvature": im.curvature,
                "damping": im.damping,
                "batch_size": im.batch_size,
            },
            {k: v.cpu() for k, v in state.items()},
            replace(scorer, im=None, factors=_moved(scorer.factors, torch.device("cpu"))),
        )
        with self.connect() as client:
            log.info("scoring %d blocks on %s", len(blocks), self.describe())
            pending = list(blocks)
            for _ in range(self.retries + 1):
                shipped = client.scatter(payload, broadcast=True)
                futures = {
                    client.submit(_score_block, shipped, paths, a, b, retries=self.retries, pure=False): (a, b)
                    for a, b in pending
                }
                pending = []
                for future in as_completed(futures):
                    try:
                        yield future.result()
                    except CancelledError as e:  # the payload was lost with the workers holding it: ship it again
                        log.warning("block %s cancelled (%s): shipped again", futures[future], e)
                        pending.append(futures[future])
                if not pending:
                    break
            else:
                raise InfluenceLensError(
                    f"{len(pending)} blocks were cancelled on the cluster {self.retries + 1} times "
                    "(their workers were lost with the model shipped to them).",
                    "check the workers' memory and logs, then compute again",
                )
        im.model.to(im.device_)

    @contextmanager
    def connect(self):
        """A ``distributed.Client`` for this cluster (a LocalCluster is started here and closed afterwards)."""
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:
            raise InfluenceLensError(
                "Dask is not installed, so --scheduler / --workers cannot be used.",
                "pip install 'influence-core[dask]'",
            ) from e
        if self.scheduler:
            try:
                client = Client(self.scheduler, timeout="20s")
            except OSError as e:
                raise InfluenceLensError(
                    f"Cannot reach the Dask scheduler at {self.scheduler}: {e}",
                    "start it with `dask scheduler` and pass its tcp://HOST:PORT address",
                ) from e
            with client:
                yield client
            return
        threads = max(1, (os.cpu_count() or 1) // (self.workers or 1))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with (
            LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client


@dataclass
class WorkerPayload:
    """Everything a worker needs to score blocks, shipped once: the model (CPU), the engine settings, the fitted
    curvature state, the test factors (CPU) and a :class:`BlockScorer` template without its model."""

    model: nn.Module
    engine_options: dict
    curvature_state: dict
    scorer: BlockScorer

    @cached_property
    def local_scorer(self) -> BlockScorer:
        """The scorer rebuilt on this worker's device (once per worker process: the payload lives there)."""
        device = worker_device()
        im = InfluenceModel(self.model, device=device, **self.engine_options)
        im.load_state_dict(self.curvature_state)
        return replace(self.scorer, im=im, factors=_moved(self.scorer.factors, device))


def _moved(factors: InfluenceFactors, device: torch.device) -> InfluenceFactors:
    scales = factors.scales
    return replace(
        factors,
        factors={k: v.to(device) for k, v in factors.factors.items()},
        scales=None if scales is None else {k: v.to(device) for k, v in scales.items()},
    )


def worker_device() -> torch.device:
    """CPU, or on a machine with GPUs the one matching this worker's index (workers named 0, 1, … by
    ``LocalCluster``; others hash their name)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else sum(map(ord, str(name)))
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def _score_block(payload: WorkerPayload, paths: InfluencePaths, start: int, stop: int) -> BlockSummary:
    return payload.local_scorer.score(paths, start, stop)
