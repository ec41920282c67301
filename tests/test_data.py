"""Datasets on real data, class selection, splitting and bad input."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from influence_core import InfluenceLensError, load_dataset, split_dataset
from influence_core.corruption import flip_random, flip_top_influence
from influence_core.data import available_classes


def test_tiny_imagenet_pools_train_and_val_by_name_wnid_and_index(tiny_imagenet):
    ds = load_dataset(f"tiny-imagenet:{tiny_imagenet}", ["goldfish", "n07749582"])
    assert ds.classes == ["goldfish", "lemon"] and ds.class_keys == ["n01443537", "n07749582"]
    assert np.bincount(ds.labels).tolist() == [550, 550]  # 500 train + 50 val each
    assert any(i.startswith("val/images/") for i in ds.ids) and len(set(ds.ids)) == len(ds.ids)
    assert ds.images.shape == (1100, 64, 64, 3) and ds.images.dtype == np.uint8
    x = ds.tensors(np.arange(4))
    assert x.shape == (4, 3, 64, 64) and abs(float(x.mean())) < 3
    by_index = load_dataset(f"tiny-imagenet:{tiny_imagenet}", ["0"])  # index in sorted wnids
    assert by_index.class_keys == ["n01443537"]


def test_grayscale_jpegs_become_rgb(tiny_imagenet):
    ds = load_dataset(f"tiny-imagenet:{tiny_imagenet}", ["Egyptian cat"])
    gray = [i for i, rel in enumerate(ds.ids) if Image.open(tiny_imagenet / rel).mode != "RGB"]
    assert gray, "the shared data is documented to hold grayscale JPEGs"
    img = ds.images[gray[0]]
    assert img.shape == (64, 64, 3) and np.array_equal(img[..., 0], img[..., 1])


@pytest.mark.parametrize(
    "name, message",
    [("go", "ambiguous"), ("zebra-ish", "Unknown class"), ("dining table", "no train/<wnid>/images folder")],
)
def test_class_errors_name_close_matches(tiny_imagenet, name, message):
    with pytest.raises(InfluenceLensError, match=message):
        load_dataset(f"tiny-imagenet:{tiny_imagenet}", [name])


def test_missing_and_wrong_folders(tmp_path):
    with pytest.raises(InfluenceLensError, match="does not exist"):
        load_dataset(f"tiny-imagenet:{tmp_path / 'nope'}")
    with pytest.raises(InfluenceLensError, match="does not look like tiny-imagenet"):
        load_dataset(f"tiny-imagenet:{tmp_path}")
    with pytest.raises(InfluenceLensError, match="no class sub-folders"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(InfluenceLensError, match="Unknown dataset spec"):
        load_dataset("imagenet:/data")


def _folder_with_bad_images(root, tiny_imagenet):
    src = sorted((tiny_imagenet / "train" / "n07749582" / "images").glob("*.JPEG"))[:6]
    for cls, files in (("lemon", src[:3]), ("other", src[3:])):
        (root / cls).mkdir(parents=True)
        for f in files:
            Image.open(f).resize((100, 80)).save(root / cls / (f.stem + ".png"))
    (root / "lemon" / "broken.jpg").write_bytes(b"not an image")
    data = (tiny_imagenet / "train" / "n07749582" / "images" / src[0].name).read_bytes()
    (root / "other" / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_folder_resizes_and_skips_or_stops_on_bad_images(tmp_path, tiny_imagenet):
    _folder_with_bad_images(tmp_path, tiny_imagenet)
    ds = load_dataset(f"folder:{tmp_path}", image_size=48)
    assert ds.images.shape == (6, 48, 48, 3) and ds.classes == ["lemon", "other"]
    assert sorted(rel for rel, _ in ds.skipped) == ["lemon/broken.jpg", "other/truncated.jpg"]
    with pytest.raises(InfluenceLensError, match="broken.jpg"):
        load_dataset(f"folder:{tmp_path}", on_bad_image="error")


def test_fashion_mnist_idx(tmp_path):
    def idx(path, arr):
        header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("t10k", 10)):
        idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = load_dataset(f"fashion-mnist:{tmp_path}", ["Sandal", "bag"])
    assert ds.classes == ["Sandal", "Bag"] and len(ds) == 8 and ds.ids[0] == "train:5"
    assert ds.images.shape[1:] == (32, 32, 3)


def test_real_fashion_mnist_if_installed():
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert available_classes("fashion-mnist:")[9] == ("9", "Ankle boot")
    ds = load_dataset("fashion-mnist:", ["Trouser", "Bag"])
    assert len(ds) == 14000


def test_demo_and_stratified_seeded_split():
    ds = load_dataset("demo")
    assert len(ds) == 1797 and len(ds.classes) == 10
    a = split_dataset(ds.labels, seed=1)
    b = split_dataset(ds.labels, seed=1)
    assert np.array_equal(a.train, b.train)
    assert len(set(a.train) | set(a.val) | set(a.test)) == len(ds)
    frac = np.bincount(ds.labels[a.test], minlength=10) / np.bincount(ds.labels)
    assert np.all(np.abs(frac - 0.1) < 0.03)
    small = split_dataset(ds.labels, downsample=0.2)
    assert abs(len(small.train) + len(small.val) + len(small.test) - 0.2 * len(ds)) < 10
    with pytest.raises(InfluenceLensError, match="has only"):
        split_dataset(np.array([0] * 20 + [1] * 5))


def test_label_flips_are_recorded_and_always_change_the_label():
    labels = np.repeat(np.arange(3), 40)
    new, flipped = flip_random(labels, 0.1, 3, seed=0)
    assert len(flipped) == 12 and np.all(new[flipped] != labels[flipped])
    assert np.array_equal(np.flatnonzero(new != labels), flipped)
    scores = np.arange(120, dtype=float)
    new, flipped = flip_top_influence(labels, scores, 0.25, 3)
    assert all(set(flipped[labels[flipped] == c]) == set(np.flatnonzero(labels == c)[-10:]) for c in range(3))


def test_a_single_class_and_bad_sizes_or_splits_are_refused():
    with pytest.raises(InfluenceLensError, match=r"single class \(3\); a classifier needs at least two"):
        split_dataset(np.full(30, 0), classes=["3"])
    for size in (0, -5, 7):
        with pytest.raises(InfluenceLensError, match=f"Image size {size} is too small"):
            load_dataset("demo", image_size=size)
    with pytest.raises(InfluenceLensError, match="three positive numbers"):
        split_dataset(np.repeat([0, 1], 20), (0.8, 0.1, float("nan")))
    with pytest.raises(InfluenceLensError, match="Downsampling ratio nan"):
        split_dataset(np.repeat([0, 1], 20), downsample=float("nan"))
