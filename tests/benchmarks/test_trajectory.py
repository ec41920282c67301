"""Trajectory influence (TracInCP, SOURCE; ``benchmarks/trajectory.py``) against autograd through a short plain-SGD
training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load
from torch import nn

trajectory = load("trajectory")
KroneckerEigen, TrajectoryInfluence = trajectory.KroneckerEigen, trajectory.TrajectoryInfluence
decay, learning_rates, unrolled_gain = trajectory.decay, trajectory.learning_rates, trajectory.unrolled_gain

N_TRAIN, N_TEST, STEPS, CHECKPOINT_EVERY, LR = 16, 5, 150, 5, 0.1


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, 1, 2, 3, generator=g)
    w = torch.randn(6, generator=g)
    y = ((x.flatten(1) @ w + 0.5 * torch.randn(len(x), generator=g)) > 0).long()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].weight.mul_(0.1)
        model[1].bias.zero_()
    return model


def _softmax_terms(m: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """For a linear softmax classifier ``M = [W | b]`` (K, d+1): per-sample gradients ``(n, K·(d+1))`` of the
    cross-entropy (flattened like ``M``) and the Hessian ``(K(d+1), K(d+1))`` of the mean loss, in closed form."""
    a = torch.cat([x.flatten(1), torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    p = torch.softmax(a @ m.T, dim=1)
    r = p - F.one_hot(y, m.shape[0]).to(x.dtype)
    grads = (r[:, :, None] * a[:, None, :]).flatten(1)
    out_curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    hessian = torch.einsum("nkl,ni,nj->kilj", out_curv, a, a).reshape(grads.shape[1], -1) / len(x)
    return grads, hessian


@pytest.fixture(scope="module")
def trained():
    """Full-batch gradient descent (cosine schedule) on the mean training loss of a linear classifier, in
    float64, checkpoints every 5 steps, and the exact unrolled influence: with ``J_s = ∂θ_s/∂w`` (``w_i``: weight
    of training point i in the mean loss, all 1), ``J_{s+1} = (I − η_s H_s) J_s − η_s G_sᵀ / n`` (``H_s`` the
    Hessian of the mean loss, ``G_s`` the per-sample gradients at ``θ_s``), and removing ``i`` raises the test loss
    by about ``−∇ℓ_t(θ_T)ᵀ J_T e_i``, which is ``I[t, i] / n`` in the product's convention."""
    x, y, x_test, y_test = (t.double() if t.is_floating_point() else t for t in _data())
    start = _model()
    m = torch.cat([start[1].weight, start[1].bias[:, None]], dim=1).detach().double()
    rates = learning_rates(LR, "cosine", STEPS)
    jac = torch.zeros(m.numel(), N_TRAIN, dtype=torch.float64)
    models = []
    for s in range(STEPS):
        grads, hessian = _softmax_terms(m, x, y)
        jac = jac - rates[s] * (hessian @ jac + grads.T / N_TRAIN)
        m = m - rates[s] * grads.mean(0).reshape(m.shape)
        if (s + 1) % CHECKPOINT_EVERY == 0:
            model = _model()
            model.load_state_dict({"1.weight": m[:, :-1].float(), "1.bias": m[:, -1].float()})
            models.append(model)
    exact = -N_TRAIN * _softmax_terms(m, x_test, y_test)[0] @ jac  # (n_test, n_train)
    lr_sums = [float(rates[k : k + CHECKPOINT_EVERY].sum()) for k in range(0, STEPS, CHECKPOINT_EVERY)]
    return models, lr_sums, exact.float().numpy(), (x.float(), y, x_test.float(), y_test)


class ExactCurvature:
    """The exact Hessian of the linear classifier's mean training loss, as :class:`KroneckerEigen` is used."""

    def __init__(self, model, scope, x, y, batch_size, device):
        m = torch.cat([model[1].weight, model[1].bias[:, None]], dim=1).detach().double()
        self.shape = m.shape
        self.evals, self.vecs = torch.linalg.eigh(_softmax_terms(m, x.double(), y)[1])
        self.evals = self.evals.clamp_min(0)

    def apply(self, vectors, functions):
        flat = torch.cat([vectors["1.weight"], vectors["1.bias"][..., None]], dim=2).flatten(1).double()
        outs = []
        for f in functions:
            res = ((flat @ self.vecs) * f(self.evals)) @ self.vecs.T
            res = res.reshape(-1, *self.shape).float()
            outs.append({"1.weight": res[..., :-1], "1.bias": res[..., -1]})
        return outs


def _slope(pred: np.ndarray, exact: np.ndarray) -> float:
    return float((pred * exact).sum() / (pred * pred).sum())


def _rel(pred: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(pred - exact) / np.linalg.norm(exact))


def test_source_with_exact_curvature_matches_unrolled_training(trained):
    """SOURCE's closed form with the exact Hessian: only the stationarity within 5-step segments and exp(−ΣηH)
    for Π(I − ηH) separate it from the unrolled answer."""
    models, lr_sums, exact, (x, y, x_test, y_test) = trained
    ti = TrajectoryInfluence(models, lr_sums, "source", scope="all", device="cpu", curvature_fit=ExactCurvature)
    pred = ti.fit(x, y).influences(x_test, y_test, x, y)
    assert _rel(pred, exact) < 0.08, _rel(pred, exact)
    assert 0.95 < _slope(pred, exact) < 1.05


def test_source_with_ekfac_is_close_in_scale(trained):
    """The default (EK-FAC) curvature: its Kronecker basis is not the Hessian's here (predictions differ per
    sample), which costs accuracy, not scale."""
    models, lr_sums, exact, (x, y, x_test, y_test) = trained
    ti = TrajectoryInfluence(models, lr_sums, "source", scope="all", device="cpu").fit(x, y)
    pred = ti.influences(x_test, y_test, x, y)
    assert _rel(pred, exact) < 0.5, _rel(pred, exact)
    assert 0.7 < _slope(pred, exact) < 1.3
    assert np.corrcoef(pred.ravel(), exact.ravel())[0, 1] > 0.9


def test_tracin_is_first_order_and_misses_the_decay(trained):
    """TracInCP has the right sign and order of magnitude but ignores how later steps damp an early change, so
    SOURCE is closer to the unrolled answer."""
    models, lr_sums, exact, (x, y, x_test, y_test) = trained
    tracin = TrajectoryInfluence(models, lr_sums, "tracin", scope="all", device="cpu").influences(x_test, y_test, x, y)
    source = (
        TrajectoryInfluence(models, lr_sums, "source", scope="all", device="cpu")
        .fit(x, y)
        .influences(x_test, y_test, x, y)
    )
    assert np.corrcoef(tracin.ravel(), exact.ravel())[0, 1] > 0.5
    assert _rel(source, exact) < 0.5 * _rel(tracin, exact)


def test_tracin_equals_weighted_gradient_products():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3))
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    ti = TrajectoryInfluence(
        [model, other], [0.3, 0.2], "tracin", scope="all", batch_size=3, test_chunk=2, device="cpu"
    )

    def flat_grads(m):
        out = []
        for i in range(len(x)):
            m.zero_grad()
            F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
            out.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        return torch.stack(out)

    g0, g1 = flat_grads(model), flat_grads(other)
    expected = 0.3 * g0[:3] @ g0.T + 0.2 * g1[:3] @ g1.T
    np.testing.assert_allclose(ti.influences(x[:3], y[:3], x, y), expected.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ti.self_influence(x, y), np.diag((0.3 * g0 @ g0.T + 0.2 * g1 @ g1.T).numpy()), rtol=1e-4)


def test_kronecker_functions_match_dense_operator():
    """f(H) v through the per-layer Kronecker eigenbases (conv weights and biases) equals the dense matrix."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    x, y = torch.randn(20, 2, 4, 4), torch.randint(0, 2, (20,))
    eig = KroneckerEigen.fit(model, "all", x, y, batch_size=8, device=torch.device("cpu"))
    v = {n: torch.randn(2, *p.shape) for n, p in model.named_parameters()}
    horizon = 3.0
    gain, keep = eig.apply(v, [unrolled_gain(horizon), decay(horizon)])
    for w, b, q_a, q_g, evals in eig.layers:
        q_a, q_g = _complete(q_a), _complete(q_g)
        lam = torch.zeros(q_g.shape[1], q_a.shape[1])
        lam[: evals.shape[0], : evals.shape[1]] = evals
        basis = torch.kron(q_g.contiguous(), q_a.contiguous())  # rows: (out, d) flattened
        h = basis @ torch.diag(lam.flatten()) @ basis.T
        m = torch.cat([v[w].flatten(2), v[b][..., None]], dim=2).flatten(1)  # (2, out·d)
        evals_h, vecs = torch.linalg.eigh(h.double())
        evals_h = evals_h.clamp_min(0)
        dense_gain = (
            vecs
            @ torch.diag(
                -torch.expm1(-horizon * evals_h) / evals_h.clamp_min(1e-12) * (evals_h > 1e-9)
                + horizon * (evals_h <= 1e-9)
            )
            @ vecs.T
        )
        dense_keep = vecs @ torch.diag(torch.exp(-horizon * evals_h)) @ vecs.T
        for out, dense in ((gain, dense_gain), (keep, dense_keep)):
            got = torch.cat([out[w].flatten(2), out[b][..., None]], dim=2).flatten(1)
            np.testing.assert_allclose(got.double().numpy(), (m.double() @ dense.T).numpy(), rtol=2e-4, atol=2e-5)


def _complete(q: torch.Tensor) -> torch.Tensor:
    """Square orthonormal basis whose first columns are ``q``'s."""
    if q.shape[0] == q.shape[1]:
        return q
    full, _ = torch.linalg.qr(torch.cat([q, torch.randn(q.shape[0], q.shape[0])], dim=1))
    return torch.cat([q, full[:, q.shape[1] :]], dim=1)


def test_source_head_scope_uses_the_models_parameter_names():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    x, y = torch.randn(12, 2, 4, 4), torch.randint(0, 2, (12,))
    head = TrajectoryInfluence([model], [0.5], "source", scope="head", device="cpu").fit(x, y)
    named = TrajectoryInfluence([model], [0.5], "source", scope=["3"], device="cpu").fit(x, y)
    np.testing.assert_allclose(head.self_influence(x, y), named.self_influence(x, y), rtol=1e-5)
    np.testing.assert_allclose(head.influences(x[:3], y[:3], x, y), named.influences(x[:3], y[:3], x, y), rtol=1e-5)


def test_unrolled_gain_limits():
    lam = torch.tensor([0.0, 1e-12, 1.0, 1e4])
    g = unrolled_gain(2.0)(lam)
    np.testing.assert_allclose(g.numpy(), [2.0, 2.0, (1 - np.exp(-2.0)), 1e-4], rtol=1e-6)
