"""Streaming data: the memory-mapped image cache, lazy image sources and the official split (issue 11, item 1)."""

import pickle

import numpy as np
import pytest
import torch

from influence_core import InfluenceLensError
from influence_core.data import DEFAULT_FASHION_MNIST, ModelInputs, load_dataset, split_dataset
from influence_core.errors import InfluenceLensError as Error


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_LENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_images_are_cached_once_and_memory_mapped(tiny_imagenet, cache_dir):
    first = load_dataset(f"tiny-imagenet:{tiny_imagenet}", ["goldfish"], image_size=24)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and isinstance(first.images, np.memmap)
    stamp = (cache_dir / files[1]).stat().st_mtime_ns
    again = load_dataset(f"tiny-imagenet:{tiny_imagenet}", ["goldfish"], image_size=24)
    assert (cache_dir / files[1]).stat().st_mtime_ns == stamp and again.ids == first.ids
    np.testing.assert_array_equal(again.images[:5], first.images[:5])


def test_model_inputs_read_only_the_rows_asked_for_and_pickle_without_pixels(tiny_imagenet, cache_dir):
    ds = load_dataset(f"tiny-imagenet:{tiny_imagenet}", ["goldfish", "lemon"], image_size=24)
    positions = np.array([7, 3, 500, 3])
    x = ModelInputs(ds.images, positions)
    assert len(x) == 4 and x.shape == (4, 3, 24, 24)
    torch.testing.assert_close(x[1:3], ds.tensors(positions[1:3]))
    torch.testing.assert_close(x[np.array([3, 0])], ds.tensors(positions[[3, 0]]))
    shipped = pickle.dumps(x)
    assert len(shipped) < 10_000  # the file name, not 4 × 24 × 24 × 3 pixels of a 1,100-image memory map
    torch.testing.assert_close(pickle.loads(shipped)[:], x[:])


def test_official_split_keeps_the_datasets_own_parts():
    ids = [f"train:{i}" for i in range(60)] + [f"t10k:{i}" for i in range(20)]
    labels = np.arange(80) % 2
    split = split_dataset(labels, "official", ids=ids)
    assert len(split.train) == 60 and len(split.test) == 20 and len(split.val) == 0
    half = split_dataset(labels, "official", downsample=0.5, ids=ids)
    assert len(half.train) == 30 and len(half.test) == 10 and set(half.test) <= set(range(60, 80))
    assert np.bincount(labels[half.train]).tolist() == [15, 15]
    with pytest.raises(Error, match="no official"):
        split_dataset(labels, "official", ids=[f"digits:{i}" for i in range(80)])


def test_fashion_mnist_official_split_is_60k_and_10k(cache_dir):
    from pathlib import Path

    if not Path(DEFAULT_FASHION_MNIST).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {DEFAULT_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist:", image_size=8)
    split = split_dataset(ds.labels, "official", ids=ds.ids)
    assert (len(split.train), len(split.val), len(split.test)) == (60_000, 0, 10_000)
    with pytest.raises(InfluenceLensError, match="official"):
        split_dataset(ds.labels, "officious", ids=ds.ids)
