"""Small real-data fixtures shared by the influence-engine tests (scikit-learn's bundled digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread while a module runs: these tiny models are ~100× slower on contended threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits(n_train: int, n_test: int, classes: int = 5, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: 8×8 digits 0..classes-1 as ``(n, 1, 8, 8)`` float32 in [0, 1]."""
    data = load_digits()
    keep = data.target < classes
    x = torch.tensor(data.images[keep] / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target[keep], dtype=torch.int64)
    order = torch.tensor(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[:n_train], y[:n_train], x[n_train:n_train + n_test], y[n_train:n_train + n_test]


class TinyCNN(nn.Module):
    """conv(1→channels, 3×3) → ReLU → 2×2 max-pool → linear: 95 parameters for 1 channel, 5 classes."""

    def __init__(self, classes: int = 5, channels: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels * 16, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def trained_cnn(x, y, steps: int = 60, seed: int = 0, classes: int = 5, channels: int = 2) -> TinyCNN:
    """A :class:`TinyCNN` trained for ``steps`` full-batch Adam steps (deterministic)."""
    torch.manual_seed(seed)
    model = TinyCNN(classes, channels)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def rel_err(a, b) -> float:
    """``‖a − b‖_F / ‖b‖_F``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def train_head(features: torch.Tensor, y: torch.Tensor, lam: float, weights: torch.Tensor | None = None,
               init: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise ``(1/n) Σ_i w_i ℓ_i + (λ/2)‖θ‖²`` over ``θ = [W, b]`` ``(C, d+1)`` in float64 with L-BFGS.

    ``features (n, d)``, ``weights (n,)`` (default all ones); ``n`` is always ``len(y)``.
    """
    x = features.double()
    classes = int(y.max()) + 1 if init is None else init.shape[0]
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights.double()
    theta = (torch.zeros(classes, x.shape[1] + 1, dtype=torch.float64) if init is None else init.clone())
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        losses = nn.functional.cross_entropy(x @ theta[:, :-1].T + theta[:, -1], y, reduction="none")
        loss = (w * losses).sum() / len(y) + lam / 2 * theta.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def frozen_backbone_classifier(x: torch.Tensor, y: torch.Tensor, lam: float, channels: int = 8, seed: int = 0):
    """``(model, features)``: a random frozen conv backbone + a linear head trained by :func:`train_head`."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
    with torch.no_grad():
        features = backbone(x)
    theta = train_head(features, y, lam)
    head = nn.Linear(features.shape[1], theta.shape[0])
    with torch.no_grad():
        head.weight.copy_(theta[:, :-1])
        head.bias.copy_(theta[:, -1])
    return nn.Sequential(*backbone, head).eval(), features
