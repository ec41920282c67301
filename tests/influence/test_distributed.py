"""Scoring on a Dask cluster equals scoring in one process (issue 11, item 3)."""

import numpy as np
import pytest

from influence_core import results
from influence_core.errors import InfluenceLensError
from influence_core.influence.calculator import DaskCalculator
from influence_core.pipeline import InfluenceSettings, compute_influence

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # starts Dask worker processes and trains on tiny-imagenet


def test_two_local_workers_equal_one_process(tiny_run, monkeypatch):
    monkeypatch.setattr(results, "COLUMN_BLOCK", 64)  # several blocks per worker (the client decides the blocks)
    settings = InfluenceSettings(checkpoints=False)
    single = compute_influence(tiny_run, settings, recompute=True)
    n_test, n_train = single.influences.shape
    assert len(results.column_blocks(n_train)) >= 4
    expected = {
        "rows": np.stack([single.row(t) for t in range(n_test)]),
        "mean": single.mean_influence.copy(),
        "self": single.self_influence.copy(),
        "top": single.top_harmful(5, 20)[0],
    }

    spread = compute_influence(tiny_run, settings, recompute=True, calculator=DaskCalculator(workers=2))
    assert spread.meta["workers"] == "LocalCluster with 2 workers"
    rows = np.stack([spread.row(t) for t in range(n_test)])
    scale = np.abs(expected["rows"]).max()
    np.testing.assert_allclose(rows, expected["rows"], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(spread.mean_influence, expected["mean"], rtol=1e-5, atol=1e-7 * scale)
    np.testing.assert_allclose(spread.self_influence, expected["self"], rtol=1e-5)
    np.testing.assert_array_equal(spread.top_harmful(5, 20)[0], expected["top"])


def test_cluster_spec_needs_exactly_one_target():
    with pytest.raises(InfluenceLensError, match="either"):
        DaskCalculator()
    with pytest.raises(InfluenceLensError, match="either"):
        DaskCalculator(scheduler="tcp://localhost:8786", workers=2)
    with pytest.raises(InfluenceLensError, match="at least 1"):
        DaskCalculator(workers=0)


def kill_mid_block(run, settings, cluster, watcher, victims) -> tuple[list[int], object]:
    """Score ``run`` on ``cluster`` in a thread and, once a worker holds a block, SIGKILL the worker processes
    ``victims(busy addresses, {address: pid})`` names. Returns the killed pids and the finished result."""
    import os
    import signal
    import threading
    import time

    pids = watcher.run(os.getpid)  # worker address -> pid
    outcome: dict = {}

    def spread():
        try:
            spec = DaskCalculator(scheduler=cluster.scheduler_address)
            outcome["result"] = compute_influence(run, settings, recompute=True, calculator=spec)
        except BaseException as e:  # re-raised in the test thread below
            outcome["error"] = e

    thread = threading.Thread(target=spread)
    thread.start()
    killed: list[int] = []
    deadline = time.monotonic() + 300
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        busy = [w for w, keys in watcher.processing().items() if any("_score_block" in str(k) for k in keys)]
        if busy:
            killed = victims(busy, pids)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        else:
            time.sleep(0.02)
    thread.join(900)
    assert not thread.is_alive(), "the cluster run did not finish after the kill"
    assert killed, "no block was ever in flight on a worker"
    assert "error" not in outcome, str(outcome.get("error"))
    return killed, outcome["result"]


def test_a_worker_killed_mid_block_is_replaced_and_its_blocks_rescored(tiny_run, monkeypatch):
    """Issue 11, item 3: a worker process killed (SIGKILL) while it holds blocks; the scheduler hands its blocks to
    the surviving or restarted worker, and the result equals the single-process one."""
    import os

    from distributed import Client, LocalCluster

    monkeypatch.setattr(results, "COLUMN_BLOCK", 8)  # many short blocks: the kill lands while blocks are in flight
    settings = InfluenceSettings(checkpoints=False)
    single = compute_influence(tiny_run, settings, recompute=True)
    n_test = single.influences.shape[0]
    expected_rows = np.stack([single.row(t) for t in range(n_test)])
    expected_self = single.self_influence.copy()

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as watcher,
    ):
        killed, spread_result = kill_mid_block(tiny_run, settings, cluster, watcher, lambda busy, pids: [pids[busy[0]]])
        watcher.wait_for_workers(2, timeout=120)  # the nanny restarts the killed worker
        assert killed[0] not in watcher.run(os.getpid).values()  # the process that held blocks is gone

    rows = np.stack([spread_result.row(t) for t in range(n_test)])
    scale = np.abs(expected_rows).max()
    np.testing.assert_allclose(rows, expected_rows, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(spread_result.self_influence, expected_self, rtol=1e-5)


def test_every_worker_killed_mid_block_gets_the_model_shipped_again(tiny_run, monkeypatch):
    """Both workers killed at once while they hold blocks: the shipped model is lost with them, so the blocks are
    cancelled; they are resubmitted with the model shipped again to the restarted workers, and the result equals
    the single-process one."""
    from distributed import Client, LocalCluster

    monkeypatch.setattr(results, "COLUMN_BLOCK", 8)
    settings = InfluenceSettings(checkpoints=False)
    single = compute_influence(tiny_run, settings, recompute=True)
    expected_rows = np.stack([single.row(t) for t in range(single.influences.shape[0])])

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as watcher,
    ):
        _, spread_result = kill_mid_block(tiny_run, settings, cluster, watcher, lambda busy, pids: list(pids.values()))

    rows = np.stack([spread_result.row(t) for t in range(len(expected_rows))])
    np.testing.assert_allclose(rows, expected_rows, rtol=1e-5, atol=1e-6 * np.abs(expected_rows).max())
