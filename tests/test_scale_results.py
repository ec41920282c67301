"""The on-disk influence result: chunked matrix, streaming summaries, lazy reads (issue 11, item 2)."""

import numpy as np
import pytest

from influence_core import results
from influence_core.paths import InfluencePaths
from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 training points, so that a small run spans several shards."""
    monkeypatch.setattr(results, "COLUMN_BLOCK", 64)


def _write(tmp_path, matrix, test_labels, train_labels, n_classes, k):
    paths = InfluencePaths(tmp_path)
    results.create_matrix(paths, *matrix.shape)
    builder = results.SummaryBuilder(*matrix.shape, n_classes, k=k)
    for a, b in reversed(results.column_blocks(matrix.shape[1])):  # any order
        results.open_matrix(paths, "r+")[:, a:b] = matrix[:, a:b]
        builder.add(results.summarise_block(matrix[:, a:b], a, test_labels, n_classes, -np.arange(a, b)))
    builder.write(paths)
    results.write_histograms(paths, train_labels, n_classes, bins=7)
    return results.InfluenceStore(paths)


def test_summaries_streamed_by_block_equal_the_whole_matrix(tmp_path, small_blocks):
    rng = np.random.default_rng(0)
    n_test, n_train, n_classes, k = 37, 300, 4, 10
    matrix = rng.normal(size=(n_test, n_train)).astype(np.float32)
    test_labels, train_labels = rng.integers(0, 3, n_test), rng.integers(0, n_classes, n_train)  # class 3: no test
    store = _write(tmp_path, matrix, test_labels, train_labels, n_classes, k)

    assert len(results.column_blocks(n_train)) == 5
    for t in (0, 17, 36):
        np.testing.assert_array_equal(store.row(t), matrix[t])
        pos, val = store.top_helpful(t, k)
        np.testing.assert_array_equal(pos, np.argsort(-matrix[t])[:k])
        np.testing.assert_array_equal(val, matrix[t, pos])
        pos, val = store.top_harmful(t, k)
        np.testing.assert_array_equal(pos, np.argsort(matrix[t])[:k])
        edges, counts = store.histogram(t)
        assert edges[0] == matrix[t].min() and np.isclose(edges[-1], matrix[t].max())
        for c in range(n_classes):
            expected, _ = np.histogram(matrix[t, train_labels == c], bins=edges)
            np.testing.assert_array_equal(counts[c], expected)
    np.testing.assert_allclose(store.mean_influence, matrix.mean(0, dtype=np.float64), rtol=1e-12)
    for c in range(3):
        np.testing.assert_allclose(
            store.mean_influence_by_label[c], matrix[test_labels == c].mean(0, dtype=np.float64), rtol=1e-6, atol=1e-9
        )
    np.testing.assert_array_equal(store.mean_influence_by_label[3], 0)
    np.testing.assert_array_equal(store.self_influence, -np.arange(n_train))


def test_a_missing_block_is_an_error(tmp_path, small_blocks):
    builder = results.SummaryBuilder(3, 100, 2)
    block = np.ones((3, 64), np.float32)
    builder.add(results.summarise_block(block, 0, np.array([0, 1, 1]), 2, np.zeros(64)))
    with pytest.raises(RuntimeError, match="36 training columns"):
        builder.write(InfluencePaths(tmp_path))


@pytest.mark.slow  # the pipeline in many small blocks
def test_pipeline_writes_the_engine_matrix_in_blocks_with_its_summaries(demo_run, small_blocks):
    from influence_core.influence import Direct, InfluenceModel

    result = compute_influence(demo_run, DEFAULT_SETTINGS, recompute=True)
    x_train, y_train = demo_run.tensors("train")
    x_test, y_test = demo_run.tensors("test")
    im = InfluenceModel(demo_run.load_model(), scope="head", method=Direct()).fit(x_train, y_train)
    expected = im.influences(x_test, y_test)
    assert result.influences.shape == expected.shape and len(results.column_blocks(len(y_train))) > 1
    np.testing.assert_allclose(result.row(3), expected[3], rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    pos, _ = result.top_helpful(3, 50)
    np.testing.assert_array_equal(np.sort(pos), np.sort(np.argsort(-expected[3])[:50]))
    np.testing.assert_allclose(result.mean_influence, expected.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.self_influence, im.self_influence(), rtol=1e-4)
    assert result.mean_influence_by_label.shape == (demo_run.n_classes, len(y_train))
    assert result.checkpoint_self_influence.shape == (2, len(y_train))
