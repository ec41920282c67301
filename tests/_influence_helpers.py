"""Small real-data fixtures shared by the influence-engine tests (scikit-learn's bundled digits)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


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
    """conv(1→2, 3×3) → ReLU → 2×2 max-pool → linear(32 → classes): 185 parameters for 5 classes."""

    def __init__(self, classes: int = 5, channels: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels * 16, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def trained_cnn(x, y, steps: int = 60, seed: int = 0, classes: int = 5) -> TinyCNN:
    """A :class:`TinyCNN` trained for ``steps`` full-batch Adam steps (deterministic)."""
    torch.manual_seed(seed)
    model = TinyCNN(classes)
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
