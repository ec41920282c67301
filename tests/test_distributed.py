"""Scoring on a Dask cluster equals scoring in one process (issue 11, item 3)."""

import numpy as np
import pytest

from influence_core import results
from influence_core.distributed import ClusterSpec
from influence_core.errors import InfluenceLensError
from influence_core.pipeline import InfluenceSettings, compute_influence

pytest.importorskip("distributed")


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

    spread = compute_influence(tiny_run, settings, recompute=True, cluster=ClusterSpec(workers=2))
    assert spread.meta["workers"] == "LocalCluster with 2 workers"
    rows = np.stack([spread.row(t) for t in range(n_test)])
    scale = np.abs(expected["rows"]).max()
    np.testing.assert_allclose(rows, expected["rows"], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(spread.mean_influence, expected["mean"], rtol=1e-5, atol=1e-7 * scale)
    np.testing.assert_allclose(spread.self_influence, expected["self"], rtol=1e-5)
    np.testing.assert_array_equal(spread.top_harmful(5, 20)[0], expected["top"])


def test_cluster_spec_needs_exactly_one_target():
    with pytest.raises(InfluenceLensError, match="either"):
        ClusterSpec()
    with pytest.raises(InfluenceLensError, match="either"):
        ClusterSpec(scheduler="tcp://localhost:8786", workers=2)
    with pytest.raises(InfluenceLensError, match="at least 1"):
        ClusterSpec(workers=0)
