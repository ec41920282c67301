"""Flipped training labels should stand out by self-influence ``I(z, z)`` (real digits, head scope)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core.influence import CG, Direct, InfluenceModel

LAMBDA = 1e-2
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("method", [Direct(), CG()])
def test_flipped_labels_rank_top_by_self_influence(method, digits, frozen_backbone_classifier):
    x_train, y_train, _, _ = digits(300, 0, classes=10)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(y_train), size=6, replace=False)
    noisy = y_train.clone()
    noisy[flipped] = (noisy[flipped] + torch.as_tensor(rng.integers(1, 10, size=6))) % 10
    model, _ = frozen_backbone_classifier(x_train, noisy, LAMBDA)
    im = InfluenceModel(model, method=method, scope="head", damping=LAMBDA, device="cpu", batch_size=64).fit(
        x_train, noisy
    )
    scores = im.self_influence()
    assert scores.shape == (300,) and scores.dtype == np.float32 and (scores > 0).all()
    top = set(np.argsort(-scores)[:30].tolist())  # top 10%
    assert set(flipped.tolist()) <= top, sorted(np.argsort(np.argsort(-scores))[flipped].tolist())
