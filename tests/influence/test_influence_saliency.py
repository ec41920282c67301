"""Saliency (perturbation influence) equals a finite-difference directional derivative of ``I(z, z_test)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from influence_core.influence import Direct, InfluenceModel

pytestmark = pytest.mark.usefixtures("single_thread")


def smooth_cnn(classes: int = 3) -> nn.Module:
    """3-channel input, tanh and average pooling, so that ``I`` is smooth in the pixels."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, classes)
    ).eval()


@pytest.mark.parametrize("scope", ["head", "all"])
def test_saliency_is_the_pixel_gradient_of_influence(scope, digits):
    x_train, y_train, x_test, y_test = digits(60, 1, classes=3)
    x_train, x_test = x_train.repeat(1, 3, 1, 1), x_test.repeat(1, 3, 1, 1)
    im = InfluenceModel(smooth_cnn(), method=Direct(), scope=scope, damping=0.1, device="cpu", batch_size=16).fit(
        x_train, y_train
    )
    chosen = torch.arange(5)
    sal = im.saliency(x_test, y_test, x_train[chosen], y_train[chosen])
    assert sal.shape == (5, 8, 8) and sal.dtype == np.float32 and np.isfinite(sal).all()
    np.testing.assert_allclose(im.saliency(x_test[0], y_test[0], x_train[chosen], y_train[chosen]), sal, rtol=1e-5)

    factors = im.test_factors(x_test, y_test)
    u = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0))
    step = 1e-2 * u[:, None].expand(-1, 3, -1, -1)  # the same direction in every channel
    plus = im.influences_from_factors(factors, x_train[chosen] + step, y_train[chosen])[0].astype(np.float64)
    minus = im.influences_from_factors(factors, x_train[chosen] - step, y_train[chosen])[0].astype(np.float64)
    finite_difference = (plus - minus) / 2e-2
    predicted = (sal.astype(np.float64) * u.numpy()).sum((1, 2))
    assert np.linalg.norm(predicted - finite_difference) <= 1e-2 * np.linalg.norm(finite_difference)
