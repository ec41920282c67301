"""Head-scope influence against actual leave-one-out retraining of the convex, L2-regularised linear head.

Features come from a frozen, randomly initialised conv backbone on real digits. The head is trained to
high precision (L-BFGS, float64) on ``(1/n) Σ_j ℓ_j + (λ/2)‖θ‖²`` (θ = weight and bias), whose Hessian is
exactly ``H + λI``. Removing ``z_i`` means dropping its term (weight 0, same ``1/n``), the perturbation the
influence function linearises: the test loss should change by ``I(z_i, z_test) / n``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core.influence import Direct, InfluenceModel

LAMBDA = 1e-2
pytestmark = pytest.mark.usefixtures("single_thread")


def test_head_influence_predicts_leave_one_out(digits, frozen_backbone_classifier, train_head):
    x_train, y_train, x_test, y_test = digits(200, 40, classes=10)
    model, feats_train = frozen_backbone_classifier(x_train, y_train, LAMBDA)
    im = InfluenceModel(model, method=Direct(), scope="head", damping=LAMBDA, device="cpu", batch_size=64).fit(
        x_train, y_train
    )
    infl = im.influences(x_test, y_test)
    n = len(y_train)

    feats_test = model[:-1](x_test).detach().double()
    theta = torch.cat([model[-1].weight.detach(), model[-1].bias.detach()[:, None]], 1).double()

    def test_loss(t, rows):
        logits = feats_test[rows] @ t[:, :-1].T + t[:, -1]
        return torch.nn.functional.cross_entropy(logits, y_test[rows], reduction="none")

    tests = np.argsort(-np.abs(infl).max(1))[:3]  # the three test points with the strongest influences
    predicted, actual = [], []
    for t in tests:
        for i in np.argsort(-np.abs(infl[t]))[:12]:
            keep = torch.ones(n, dtype=torch.bool)
            keep[i] = False
            retrained = train_head(feats_train, y_train, LAMBDA, weights=keep.double(), init=theta)
            actual.append(float(test_loss(retrained, [t]) - test_loss(theta, [t])))
            predicted.append(infl[t, i] / n)
    predicted, actual = np.array(predicted), np.array(actual)
    pearson = np.corrcoef(predicted, actual)[0, 1]
    slope = float(predicted @ actual / (predicted @ predicted))
    assert len(predicted) >= 30
    assert pearson >= 0.95, (pearson, slope)
    assert 0.8 <= slope <= 1.25, (pearson, slope)
