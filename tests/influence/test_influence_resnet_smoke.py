"""Smoke test: a torchvision ResNet18, scope ``all``, method ``cg`` (2 iterations), end to end on CPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from influence_core.influence import CG, InfluenceModel

torchvision = pytest.importorskip("torchvision")
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # a whole ResNet18 through CG


def test_resnet18_all_scope_cg_runs_end_to_end():
    torch.manual_seed(0)
    x, y = torch.randn(14, 3, 64, 64), torch.randint(0, 2, (14,))
    stages = set()
    im = InfluenceModel(
        torchvision.models.resnet18(num_classes=2),
        method=CG(maxiter=2, preconditioner="jacobi"),
        scope="all",
        batch_size=8,
        device="cpu",
        progress=lambda stage, done, total: stages.add(stage),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cg stops at maxiter on purpose
        im.fit(x[:12], y[:12])
        infl = im.influences(x[12:], y[12:])
    assert len(im.params_) == 22  # 20 Conv2d weights (no biases), fc weight and bias; BatchNorm excluded
    assert infl.shape == (2, 12) and infl.dtype == np.float32 and np.isfinite(infl).all()
    assert {"preconditioner", "test factors", "influences"} <= stages
