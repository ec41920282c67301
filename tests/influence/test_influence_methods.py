"""Every inverse-curvature method against ``direct``, and ``direct`` against a brute-force computation.

Real data (scikit-learn digits 0-2, 103 training points in chunks of 40, so the last chunk is uneven), a
tiny CNN (61 parameters) trained briefly, scope ``all`` (conv + linear), both curvatures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from influence_core.errors import InfluenceLensError
from influence_core.influence import Direct, InfluenceModel, Method

pytestmark = pytest.mark.usefixtures("single_thread")

LAMBDA = 0.1  # H + λI is positive definite for both curvatures here, and lissa converges in ~20 steps
BATCH = 40
CURVATURES = ["gauss-newton", "hessian"]


@pytest.fixture(scope="module")
def setup(digits, trained_cnn):
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits(103, 12, classes=3)
    model = trained_cnn(x_train, y_train, channels=1, classes=3)
    return model, x_train, y_train, x_test, y_test


def matrix(setup, method, curvature, batch_size=BATCH, **options):
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(
        model,
        scope="all",
        method=Method.named(method, **options),
        curvature=curvature,
        damping=LAMBDA,
        device="cpu",
        batch_size=batch_size,
    ).fit(x_train, y_train)
    return im.influences(x_test, y_test)


@pytest.fixture(scope="module")
def direct(setup):
    return {c: matrix(setup, "direct", c) for c in CURVATURES}


def brute_force(model, x_train, y_train, x_test, y_test, curvature, lam=LAMBDA):
    """``G_test (H + λI)⁻¹ G_trainᵀ`` in float64 with plain autograd, independent of the engine's code."""
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def as_dict(t):
        out, start = {}, 0
        for n, s in zip(names, sizes, strict=True):
            out[n] = t[start : start + s.numel()].view(s)
            start += s.numel()
        return out

    def logits(t, x):
        return torch.func.functional_call(model, as_dict(t), (x.double(),))

    if curvature == "hessian":
        h = torch.autograd.functional.hessian(lambda t: nn.functional.cross_entropy(logits(t, x_train), y_train), theta)
    else:
        jac = torch.autograd.functional.jacobian(lambda t: logits(t, x_train), theta)  # (n, C, p)
        probs = torch.softmax(logits(theta, x_train), -1)
        a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        h = torch.einsum("icp,icd,idq->pq", jac, a, jac) / len(y_train)

    def grads(x, y):
        rows = []
        for xi, yi in zip(x, y, strict=True):
            t = theta.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(logits(t, xi[None]), yi[None])
            rows.append(torch.autograd.grad(loss, t)[0])
        return torch.stack(rows)

    solved = torch.linalg.solve(h + lam * torch.eye(len(theta), dtype=h.dtype), grads(x_test, y_test).T)
    model.float()
    return (grads(x_train, y_train) @ solved).T.numpy()


@pytest.mark.parametrize("curvature", CURVATURES)
def test_direct_equals_brute_force(setup, direct, curvature, rel_err):
    expected = brute_force(*setup, curvature)
    assert rel_err(direct[curvature], expected) <= 1e-4


def test_direct_at_the_default_damping_matches_float64_truth(setup, rel_err):
    """At the product's default damping for this scope (``top:1e-5``: condition number 1e5, where float32
    gradients start to matter) ``direct`` stays within 1e-3 of the float64 solve at the λ it resolved, and that λ
    is 1e-5 × the largest eigenvalue of the Gauss-Newton matrix."""
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, scope="all", method=Direct(), device="cpu", batch_size=BATCH).fit(x_train, y_train)
    assert str(im.damping) == "top:1e-05"
    (lam,) = im.block_damping().values()
    h = im.inverse_.matrix.double()
    assert lam == pytest.approx(1e-5 * float(torch.linalg.eigvalsh(h).max()), rel=1e-4)
    expected = brute_force(*setup, "gauss-newton", lam=lam)
    assert rel_err(im.influences(x_test, y_test), expected) <= 1e-3


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize(
    "method,options,tol",
    [
        ("cg", dict(tol=1e-6, maxiter=200), 1e-3),
        ("arnoldi", dict(rank=10_000), 1e-3),  # full rank: exact up to round-off
        ("lissa", dict(depth=200, tol=1e-4), 5e-2),
    ],
)
def test_method_matches_direct(setup, direct, curvature, method, options, tol, rel_err):
    assert rel_err(matrix(setup, method, curvature, **options), direct[curvature]) <= tol


@pytest.mark.parametrize("curvature", CURVATURES)
def test_independent_of_batch_size(setup, direct, curvature, rel_err):
    """Chunking must not change the curvature (an uneven last chunk weighs by its size)."""
    for batch_size in (16, 103):
        assert rel_err(matrix(setup, "direct", curvature, batch_size=batch_size), direct[curvature]) <= 1e-4


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_family_runs_through_engine(setup, direct, method):
    """Approximate methods (tested against exact curvature in test_influence_kfac): they plug in and agree in
    direction with ``direct``."""
    result = matrix(setup, method, "gauss-newton")
    assert result.shape == direct["gauss-newton"].shape and np.isfinite(result).all()
    assert np.corrcoef(result.ravel(), direct["gauss-newton"].ravel())[0, 1] > 0.5


def test_direct_refuses_large_blocks(setup):
    model, x_train, y_train, *_ = setup
    im = InfluenceModel(model, scope="all", method=Direct(max_params=50), device="cpu")
    with pytest.raises(InfluenceLensError, match="cg"):
        im.fit(x_train, y_train)


def test_scope_list_and_head_agree(setup, rel_err):
    """The head scope (closed form on cached features) equals naming the head module on the full model."""
    model, x_train, y_train, x_test, y_test = setup
    out = []
    for scope in ("head", ["fc"]):
        im = InfluenceModel(model, scope=scope, method=Direct(), damping=LAMBDA, device="cpu", batch_size=BATCH).fit(
            x_train, y_train
        )
        out.append(im.influences(x_test, y_test, x_train, y_train))
    assert rel_err(out[0], out[1]) <= 1e-4


def test_large_factors_are_stored_compressed(setup, direct, monkeypatch, rel_err):
    """Blocks whose test factors exceed the memory budget keep them as scaled float16: same influences."""
    from influence_core.influence import engine

    assert engine.factor_budget(torch.device("cpu")) >= engine.FACTOR_BYTES
    monkeypatch.setattr(engine, "factor_budget", lambda device: 0)
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, scope="all", method=Direct(), damping=LAMBDA, device="cpu", batch_size=BATCH).fit(
        x_train, y_train
    )
    factors = im.test_factors(x_test, y_test)
    assert factors.scales is not None and all(f.dtype == torch.float16 for f in factors.factors.values())
    assert rel_err(im.influences_from_factors(factors), direct["gauss-newton"]) <= 2e-3
