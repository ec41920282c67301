"""Shared fixtures: real data locations and small cached runs trained once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from browsing import CHROMIUM_ARGS, need, serve
from sklearn.datasets import load_digits
from torch import nn

from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence

# The explorer's background whole-network computation (upgrade.ranking_upgrade) stays off unless a test turns it
# on: otherwise every app and browser test would start one on the demo run and share the CPU with it.
os.environ.setdefault("INFLUENCE_LENS_RANKING_UPGRADE", "0")

ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGENET = Path(os.environ.get("TINY_IMAGENET", ROOT.parent / "shared" / "data" / "tiny-imagenet-200"))
TINY_SPEC = f"tiny-imagenet:{TINY_IMAGENET}"


@pytest.fixture(scope="session")
def tiny_imagenet() -> Path:
    """The real tiny-imagenet folder from ../shared; missing data fails in CI and skips loudly elsewhere."""
    if not (TINY_IMAGENET / "wnids.txt").is_file():
        message = (
            f"real test data missing: {TINY_IMAGENET} (set TINY_IMAGENET=/path/to/tiny-imagenet-200 "
            "or lay out ../shared/data/tiny-imagenet-200 beside the checkout)"
        )
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

    config = TrainConfig(dataset="demo", downsample=0.4, image_size=16, epochs=3, corrupt_fraction=0.1, n_checkpoints=2)
    return train(config, runs_root / "demo")


@pytest.fixture(scope="session")
def tiny_run(runs_root, tiny_imagenet):
    """Two real tiny-imagenet classes, 30 % of the images at 32 px, 2 epochs, 10 % flipped labels."""
    from influence_core import TrainConfig, train

    config = TrainConfig(
        dataset=f"tiny-imagenet:{tiny_imagenet}",
        classes=["goldfish", "lemon"],
        downsample=0.3,
        image_size=32,
        epochs=2,
        corrupt_fraction=0.1,
        n_checkpoints=1,
    )
    return train(config, runs_root / "tiny")


# ------------------------------------------------------------------ influence engine: small real-data helpers
@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread while a module runs: tiny influence models are ~100× slower on contended threads (use
    with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """:func:`digits_split`: scikit-learn's bundled 8×8 digits as ``(x_train, y_train, x_test, y_test)``."""
    return digits_split


@pytest.fixture(scope="session")
def trained_cnn():
    """:func:`train_tiny_cnn`: a deterministically trained :class:`TinyCNN`."""
    return train_tiny_cnn


@pytest.fixture(scope="session")
def rel_err():
    """:func:`relative_error`: ``‖a − b‖_F / ‖b‖_F``."""
    return relative_error


@pytest.fixture(scope="session")
def train_head():
    """:func:`train_l2_head`: a float64 L-BFGS fit of an L2-regularised linear head."""
    return train_l2_head


@pytest.fixture(scope="session")
def frozen_backbone_classifier():
    """:func:`frozen_backbone_model`: a random frozen conv backbone with a trained linear head."""
    return frozen_backbone_model


def digits_split(n_train: int, n_test: int, classes: int = 5, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: 8×8 digits 0..classes-1 as ``(n, 1, 8, 8)`` float32 in [0, 1]."""
    data = load_digits()
    keep = data.target < classes
    x = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target[keep], dtype=torch.int64)
    order = torch.tensor(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


class TinyCNN(nn.Module):
    """conv(1→channels, 3×3) → ReLU → 2×2 max-pool → linear: 95 parameters for 1 channel, 5 classes."""

    def __init__(self, classes: int = 5, channels: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels * 16, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def train_tiny_cnn(x, y, steps: int = 60, seed: int = 0, classes: int = 5, channels: int = 2) -> TinyCNN:
    """A :class:`TinyCNN` trained for ``steps`` full-batch Adam steps (deterministic)."""
    torch.manual_seed(seed)
    model = TinyCNN(classes, channels)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def relative_error(a, b) -> float:
    """``‖a − b‖_F / ‖b‖_F``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def train_l2_head(
    features: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    weights: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise ``(1/n) Σ_i w_i ℓ_i + (λ/2)‖θ‖²`` over ``θ = [W, b]`` ``(C, d+1)`` in float64 with L-BFGS.

    ``features (n, d)``, ``weights (n,)`` (default all ones); ``n`` is always ``len(y)``.
    """
    x = features.double()
    classes = int(y.max()) + 1 if init is None else init.shape[0]
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights.double()
    theta = torch.zeros(classes, x.shape[1] + 1, dtype=torch.float64) if init is None else init.clone()
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        losses = nn.functional.cross_entropy(x @ theta[:, :-1].T + theta[:, -1], y, reduction="none")
        loss = (w * losses).sum() / len(y) + lam / 2 * theta.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def frozen_backbone_model(x: torch.Tensor, y: torch.Tensor, lam: float, channels: int = 8, seed: int = 0):
    """``(model, features)``: a random frozen conv backbone + a linear head trained by :func:`train_l2_head`."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
    with torch.no_grad():
        features = backbone(x)
    theta = train_l2_head(features, y, lam)
    head = nn.Linear(features.shape[1], theta.shape[0])
    with torch.no_grad():
        head.weight.copy_(theta[:, :-1])
        head.bias.copy_(theta[:, -1])
    return nn.Sequential(*backbone, head).eval(), features


# ------------------------------------------------------------------ browser tests (helpers: browsing.py)
@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        need("chromium", "install Debian's chromium package (playwright cannot download browsers here)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright", "pip install playwright")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(demo_run, runs_root):
    """``streamlit run app.py`` on a free port against the demo run with its influences: (base URL, run name)."""
    compute_influence(demo_run, DEFAULT_SETTINGS)
    with serve(runs_root) as base:
        yield base, demo_run.path.name
