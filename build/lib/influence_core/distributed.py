"""Score an influence matrix on a Dask cluster (the optional ``dask`` extra: ``pip install '.[dask]'``).

The client fits the curvature and solves the test factors once; :func:`score_on_cluster` then ships the fitted
model, its curvature state and the test factors to every worker once (``client.scatter(..., broadcast=True)``)
and maps one task per training column block over them. Each worker scores its blocks on its own device (CPU, or
the GPU matching its index when there are several) and writes them straight into the result's zarr matrix, so
the run directory must be on a file system every worker sees under the same path. A task whose worker dies is
retried on another (``retries``); blocks are whole shard files, so a retried block simply rewrites its file.
Only the blocks' small summaries travel back to the client.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from .errors import InfluenceLensError

if TYPE_CHECKING:
    from torch import nn

    from .pipeline import BlockScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSpec:
    """Where to score: the address of a running scheduler (``tcp://host:8786``), or ``workers`` local processes
    (a ``LocalCluster`` started and stopped around the computation). ``retries``: attempts per block after a
    failure."""

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


@dataclass
class WorkerPayload:
    """Everything a worker needs to score blocks, shipped once: the model (CPU), the engine settings, the fitted
    curvature state, the test factors (CPU) and a :class:`~.pipeline.BlockScorer` template without its model."""

    model: nn.Module
    engine_options: dict
    curvature_state: dict
    scorer: BlockScorer

    @cached_property
    def local_scorer(self):
        """The scorer rebuilt on this worker's device (once per worker process: the payload lives there)."""
        from .influence import InfluenceModel

        device = worker_device()
        im = InfluenceModel(self.model, device=device, **self.engine_options)
        im.load_state_dict(self.curvature_state)
        factors = self.scorer.factors
        moved = replace(
            factors,
            factors={k: v.to(device) for k, v in factors.factors.items()},
            scales=None if factors.scales is None else {k: v.to(device) for k, v in factors.scales.items()},
        )
        return replace(self.scorer, im=im, factors=moved)


def worker_device():
    """CPU, or on a machine with GPUs the one matching this worker's index (workers named 0, 1, … by
    ``LocalCluster``; others hash their name)."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    from distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else sum(map(ord, str(name)))
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def _score_block(payload: WorkerPayload, paths, start: int, stop: int):
    return payload.local_scorer.score(paths, start, stop)


@contextmanager
def connect(spec: ClusterSpec):
    """A ``distributed.Client`` for ``spec`` (a LocalCluster is started here and closed afterwards)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise InfluenceLensError(
            "Dask is not installed, so --scheduler / --workers cannot be used.", "pip install 'influence-core[dask]'"
        ) from e
    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout="20s")
        except OSError as e:
            raise InfluenceLensError(
                f"Cannot reach the Dask scheduler at {spec.scheduler}: {e}",
                "start it with `dask scheduler` and pass its tcp://HOST:PORT address",
            ) from e
        with client:
            yield client
        return
    threads = max(1, (os.cpu_count() or 1) // (spec.workers or 1))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (
        LocalCluster(
            n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def score_on_cluster(spec: ClusterSpec, scorer, paths, blocks: list[tuple[int, int]]) -> Iterator:
    """Score ``blocks`` (``(start, stop)`` training columns) of ``scorer`` on the cluster, writing them into
    ``paths``' matrix; yields each block's :class:`~.results.BlockSummary` as it completes."""
    from distributed import as_completed

    im = scorer.im
    state = im.state_dict()
    if not state:
        raise InfluenceLensError(
            f"Method {im.method!r} keeps no fitted curvature to ship to workers.",
            "use direct, arnoldi, kfac or ekfac with --scheduler / --workers",
        )
    model = im.model.to("cpu")
    factors = scorer.factors
    cpu_factors = replace(
        factors,
        factors={k: v.cpu() for k, v in factors.factors.items()},
        scales=None if factors.scales is None else {k: v.cpu() for k, v in factors.scales.items()},
    )
    payload = WorkerPayload(
        model,
        {
            "scope": im.scope,
            "method": im.method,
            "curvature": im.curvature,
            "regularization": im.regularization,
            "batch_size": im.batch_size,
        },
        {k: v.cpu() for k, v in state.items()},
        replace(scorer, im=None, factors=cpu_factors),
    )
    with connect(spec) as client:
        log.info("scoring %d blocks on %s", len(blocks), spec.describe())
        shipped = client.scatter(payload, broadcast=True)
        futures = [
            client.submit(_score_block, shipped, paths, a, b, retries=spec.retries, pure=False) for a, b in blocks
        ]
        for future in as_completed(futures):
            yield future.result()
    im.model.to(im.device_)
