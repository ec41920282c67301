"""Shared fixtures: real data locations and small cached runs trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGENET = Path(os.environ.get("TINY_IMAGENET", ROOT.parent / "shared" / "data" / "tiny-imagenet-200"))
TINY_SPEC = f"tiny-imagenet:{TINY_IMAGENET}"


@pytest.fixture(scope="session")
def tiny_imagenet() -> Path:
    """The real tiny-imagenet folder from ../shared; missing data fails in CI and skips loudly elsewhere."""
    if not (TINY_IMAGENET / "wnids.txt").is_file():
        message = (f"real test data missing: {TINY_IMAGENET} (set TINY_IMAGENET=/path/to/tiny-imagenet-200 "
                   "or lay out ../shared/data/tiny-imagenet-200 beside the checkout)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return TINY_IMAGENET


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def demo_run(runs_root):
    """Digits demo: 10 classes, 40 % of the data, 16 px, 3 epochs, 10 % flipped labels (~20 s on 2 cores)."""
    from influence_core import TrainConfig, train

    config = TrainConfig(dataset="demo", downsample=0.4, image_size=16, epochs=3, corrupt_fraction=0.1,
                         n_checkpoints=2)
    return train(config, runs_root / "demo")


@pytest.fixture(scope="session")
def tiny_run(runs_root, tiny_imagenet):
    """Two real tiny-imagenet classes, 30 % of the images at 32 px, 2 epochs, 10 % flipped labels."""
    from influence_core import TrainConfig, train

    config = TrainConfig(dataset=f"tiny-imagenet:{tiny_imagenet}", classes=["goldfish", "lemon"],
                         downsample=0.3, image_size=32, epochs=2, corrupt_fraction=0.1, n_checkpoints=1)
    return train(config, runs_root / "tiny")
