"""K-FAC / EK-FAC against a brute-force Gauss-Newton matrix built with torch.func (no engine needed).

The module runs single-threaded: on a shared, oversubscribed CPU multi-threaded LAPACK (``eigh``) was
measured 10-40× slower than one thread.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from influence_core.errors import InfluenceLensError
from influence_core.influence import Curvature, Damping, InfluenceModel, Method
from influence_core.influence.base import weighted_squares
from influence_core.influence.kfac import factors, layers
from influence_core.influence.kfac import inverse as kfac_inverse
from influence_core.influence.ops import per_sample_grads

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------- helpers
def _fit(method: str, model, params, batches, n, progress=None, **options):
    """A fitted K-FAC / EK-FAC inverse (Gauss-Newton) for ``params``."""
    return Method.named(method, **options).inverse(Curvature.GAUSS_NEWTON).fit(model, params, batches, n, progress)


def _digits(channels: int = 0):
    """All 1797 digits: ``x (n, 64)`` (or ``(n, channels, 8, 8)``) float32 in [0, 1], ``y (n,)``."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    x = x.reshape(len(x), 64) if channels == 0 else x[:, None].repeat(1, channels, 1, 1)
    return x, y


def _batches(x, y, size):
    def batches():
        for s in range(0, len(x), size):
            yield x[s : s + size], y[s : s + size]

    return batches


def _flat(grads: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


def _unflat(v: torch.Tensor, params) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for n, p in params.items():
        out[n] = v[:, pos : pos + p.numel()].reshape(len(v), *p.shape).to(torch.float32)
        pos += p.numel()
    return out


def _exact_gn(model, params, x, chunk=256) -> torch.Tensor:
    """``(1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` over ``params`` (flattened in dict order), float64."""
    p64 = {n: p.detach().double() for n, p in params.items()}
    rest = {n: p.detach().double() for n, p in model.named_parameters() if n not in params}
    names = list(params)

    def logits(p, xi):
        return functional_call(model, {**rest, **p}, (xi[None].double(),))[0]

    total = sum(p.numel() for p in params.values())
    gn = torch.zeros(total, total, dtype=torch.float64)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        jac = vmap(jacrev(logits), in_dims=(None, 0))(p64, xs)  # name -> (b, C, *shape)
        j = torch.cat([jac[n].reshape(len(xs), jac[n].shape[1], -1) for n in names], dim=2)  # (b, C, P)
        prob = torch.softmax(vmap(logits, in_dims=(None, 0))(p64, xs), dim=1)
        m = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        gn += torch.einsum("bcp,bcd,bdq->pq", j, m, j)
    return gn / len(x)


def _per_sample_grads(model, params, x, y) -> torch.Tensor:
    """``∇ℓ_i`` flattened in ``params`` order: ``(n, P)`` float32."""
    frozen = {n: p.detach() for n, p in params.items()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(frozen, x, y)
    return _flat(g, list(params))


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


class _SmallCNN(nn.Module):
    """conv(3→4, 3×3, bias) → ReLU → 2×2 avg-pool → flatten → linear(64 → 10): 762 parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def cnn_setup():
    """A briefly trained :class:`_SmallCNN` (5 Adam steps, ~55 % train accuracy), 400 training / 40 test digits.

    K-FAC's block approximations degrade as the model becomes confident (the head's output curvature then
    varies with its inputs); "briefly trained" is the regime where they are expected to be good.
    """
    x, y = _digits(channels=3)
    order = torch.tensor(np.random.default_rng(0).permutation(len(y)))
    x, y = x[order], y[order]
    x_tr, y_tr, x_te, y_te = x[:400], y[:400], x[400:440], y[400:440]
    torch.manual_seed(0)
    model = _SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    model.eval()
    params = dict(model.named_parameters())
    return model, params, x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_exact_for_linear_layer_with_constant_predictions(method):
    """Zero weights ⇒ uniform p for every sample ⇒ GN = E[aaᵀ] ⊗ (diag p − ppᵀ) exactly; both methods exact."""
    x, y = _digits()  # 1797 samples: not divisible by 100 or 256
    model = nn.Linear(64, 10)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    model.eval()
    params = dict(model.named_parameters())
    lam = 1e-3
    gn = _exact_gn(model, params, x)
    assert torch.linalg.eigvalsh(gn)[-1] > 100 * lam  # the curvature, not λ, dominates the solve
    torch.manual_seed(1)
    v = torch.randn(3, gn.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(gn + lam * torch.eye(len(gn), dtype=torch.float64), v.T).T

    results = []
    for size in (100, 256):
        inv = _fit(method, model, params, _batches(x, y, size), len(x))
        out = _flat(inv.solve(_unflat(v, params), Damping.of(lam)), list(params)).double()
        print(f"{method} batch {size}: relative error {_rel(out, expected):.2e}")
        assert _rel(out, expected) <= 1e-4
        results.append(out)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


def test_sampled_labels_approximate_the_exact_output_curvature():
    """``labels="sampled"`` (Monte-Carlo Fisher) is close to, but not the same as, the exact GN; seeded."""
    x, y = _digits()
    model = nn.Linear(64, 10)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    params = dict(model.eval().named_parameters())
    torch.manual_seed(1)
    v = _unflat(torch.randn(3, 650), params)
    lam = Damping.of(1e-2)
    exact = _flat(_fit("kfac", model, params, _batches(x, y, 256), len(x)).solve(v, lam), list(params))
    runs = [
        _flat(
            _fit("kfac", model, params, _batches(x, y, 256), len(x), labels="sampled", label_samples=4, seed=5).solve(
                v, lam
            ),
            list(params),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert 1e-4 < _rel(runs[0], exact) < 0.1


def test_leading_label_columns_are_the_truncated_output_curvature():
    """``labels="leading"`` keeps each sample's ``label_columns`` largest eigen-directions of ``diag p − p pᵀ``:
    their outer products sum to that truncation exactly, to the whole matrix once ``label_columns ≥ C − 1`` (and
    then a fit equals the exact one); ``"auto"`` resolves to it above :data:`EXACT_MAX_CLASSES` classes."""
    torch.manual_seed(4)
    logits = 3 * torch.randn(6, 20, dtype=torch.float64)
    p = torch.softmax(logits, 1)
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    evals, vecs = torch.linalg.eigh(curvature)
    for k in (1, 4, 19, 30):
        inv = Method.named("ekfac", labels="leading", label_columns=k).inverse(Curvature.GAUSS_NEWTON)
        cols = inv._columns(logits)
        assert len(cols) == min(k, 19)
        got = sum(c[:, :, None] * c[:, None, :] for c in cols)
        top = vecs[:, :, -min(k, 19) :]
        want = top @ torch.diag_embed(evals[:, -min(k, 19) :]) @ top.transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, curvature, rtol=0, atol=1e-12)
    auto = Method.named("ekfac")
    above = kfac_inverse.AUTO_LABELS
    assert [auto.label_mode(c) for c in (2, 16, 17, 200)] == ["exact", "exact", above, above]
    assert [auto.backward_passes(c) for c in (2, 16, 200)] == [1, 15, 15 if above == "leading" else 1]

    x, y = _digits()
    model = nn.Linear(64, 10)
    params = dict(model.eval().named_parameters())
    exact = _fit("kfac", model, params, _batches(x, y, 256), len(x))
    leading = _fit("kfac", model, params, _batches(x, y, 256), len(x), labels="leading", label_columns=9)
    fewer = _fit("kfac", model, params, _batches(x, y, 256), len(x), labels="leading", label_columns=3)
    (e,), (lead,), (few,) = exact.layers, leading.layers, fewer.layers
    torch.testing.assert_close(lead.eigenvalues, e.eigenvalues, rtol=1e-6, atol=1e-12)
    assert few.eigenvalues.sum() < e.eigenvalues.sum()  # a truncation drops curvature


@pytest.mark.parametrize("method, threshold", [("ekfac", 0.9), ("kfac", 0.85)])
def test_influences_correlate_with_exact_gauss_newton(cnn_setup, method, threshold):
    """Influence matrices vs the exact (full, not block-diagonal) GN solve.

    Measured: EK-FAC 0.955-0.958, K-FAC 0.885-0.906 over three data/initialisation seeds; plain gradient dot
    products 0.81-0.84. K-FAC is held to 0.85: the 2×2 average pool gives four conv positions the same
    upstream gradient, against KFC's assumption of spatially uncorrelated derivatives (EK-FAC re-fits the
    eigenvalues from the true per-sample gradients and is unaffected).
    """
    model, params, x_tr, y_tr, x_te, y_te = cnn_setup
    lam = 1e-2
    gn = _exact_gn(model, params, x_tr)
    g_tr = _per_sample_grads(model, params, x_tr, y_tr).double()
    g_te = _per_sample_grads(model, params, x_te, y_te).double()
    exact = g_te @ torch.linalg.solve(gn + lam * torch.eye(len(gn), dtype=torch.float64), g_tr.T)  # (40, 400)

    inv = _fit(method, model, params, _batches(x_tr, y_tr, 64), len(x_tr))
    approx = g_te @ _flat(inv.solve(_unflat(g_tr, params), Damping.of(lam)), list(params)).double().T
    corr = float(np.corrcoef(approx.flatten().numpy(), exact.flatten().numpy())[0, 1])
    baseline = float(np.corrcoef((g_te @ g_tr.T).flatten().numpy(), exact.flatten().numpy())[0, 1])
    print(f"{method}: Pearson {corr:.4f} (plain gradient dot product: {baseline:.4f})")
    assert corr >= threshold
    assert baseline < corr - 0.05  # the curvature matters at this λ


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("rank", [None, 6])
def test_another_lambda_and_state_dict_round_trip(cnn_setup, method, rank):
    """One fit serves every λ (a solve at 0.1 after one at 1e-3 equals a fresh fit's); the state round-trips
    (with projected bases too)."""
    model, params, x_tr, y_tr, *_ = cnn_setup
    torch.manual_seed(2)
    v = _unflat(torch.randn(4, sum(p.numel() for p in params.values())), params)
    batches = _batches(x_tr, y_tr, 128)
    small, large = Damping.of(1e-3), Damping.of(0.1)

    inv = _fit(method, model, params, batches, len(x_tr), rank=rank)
    assert all(f.projected for f in inv.layers) == (rank is not None)
    before = inv.solve(v, small)
    refit = _fit(method, model, params, batches, len(x_tr), rank=rank)
    after, expected = inv.solve(v, large), refit.solve(v, large)
    for n in params:
        torch.testing.assert_close(after[n], expected[n], rtol=1e-6, atol=1e-9)
        assert not torch.allclose(after[n], before[n])

    loaded = Method.named(method, rank=rank).inverse(Curvature.GAUSS_NEWTON)
    loaded.load_state_dict({k: t.clone() for k, t in inv.state_dict().items()})
    assert [f.projected for f in loaded.layers] == [f.projected for f in inv.layers]
    again = loaded.solve(v, large)
    for n in params:
        assert torch.equal(again[n], after[n])


@pytest.mark.parametrize("rotate_first", [True, False])
@pytest.mark.parametrize("rank", [None, 8, 4])
def test_ekfac_eigenvalues_are_the_exact_curvature_in_the_kronecker_basis(monkeypatch, rotate_first, rank):
    """EK-FAC's Λ_jk must equal ((Q_G ⊗ Q_A)ᵀ GN (Q_G ⊗ Q_A))_jk,jk exactly: checks the conv per-sample gradients
    (stride, padding, dilation, bias column) through both ways of forming them. Only the conv is in ``params``.
    With a ``rank`` the input factor (19 columns) is cut, by a full eigendecomposition (8) or the randomized one
    (4): the kept directions must be the leading eigenvectors of the full factor and Λ exact in them."""
    monkeypatch.setattr(kfac_inverse, "_rotate_first", lambda *args: rotate_first)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).eval()
    x, y = torch.randn(37, 2, 9, 9), torch.randint(0, 4, (37,))
    params = {"0.weight": model[0].weight, "0.bias": model[0].bias}
    inv = _fit("ekfac", model, params, _batches(x, y, 10), len(x), rank=rank)
    (f,) = inv.layers
    if rank is not None:
        (full,) = _fit("kfac", model, params, _batches(x, y, 10), len(x)).layers
        kept = full.q_a[:, -rank:]  # ascending eigenvalues: the leading ones last
        assert f.projected and f.q_a.shape == (19, rank) and f.q_g.shape == (3, 3)
        torch.testing.assert_close(f.q_a @ f.q_a.T, kept @ kept.T, atol=1e-8, rtol=0)
    gn = _exact_gn(model, params, x)  # over [vec W (54), b (3)]
    cols = torch.arange(54).reshape(3, 18)
    order = torch.cat([cols, torch.arange(54, 57)[:, None]], dim=1).flatten()  # [W | b] row-major -> flat index
    h = gn[order][:, order].reshape(3, 19, 3, 19)
    expected = torch.einsum("aibj,ap,iq,bp,jq->pq", h, f.q_g, f.q_a, f.q_g, f.q_a)
    assert rank is not None or (f.q_a.shape == (19, 19) and f.q_g.shape == (3, 3))
    assert _rel(f.eigenvalues, expected) <= 1e-6


@pytest.mark.parametrize(
    "conv",
    [
        dict(stride=2, padding=2, dilation=2, bias=True),
        dict(padding="same", dilation=2, bias=False),
        dict(stride=(2, 1), padding=(0, 1), bias=True),
    ],
    ids=["strided-dilated-bias", "same", "uneven"],
)
def test_conv_patches_and_rotated_inputs_equal_unfold_and_its_product_with_the_basis(conv):
    """``TrackedConv2d.patches`` stacks shifted views instead of unfolding and ``rotated_inputs`` convolves with
    ``Q_A``'s columns as filters: they must equal ``F.unfold``'s patches and ``activations() @ Q_A`` (bias column
    included), also for a module called twice in one forward."""
    torch.manual_seed(0)
    module = nn.Conv2d(3, 5, (3, 2), **conv).double()
    (layer,) = layers.tracked_layers(module, dict(module.named_parameters(prefix="c")))
    q_a = torch.linalg.qr(torch.randn(layer.in_dim, layer.in_dim, dtype=torch.float64))[0][:, :7]
    with layers.hooked([layer]):
        module(torch.randn(4, 3, 9, 8, dtype=torch.float64))
        module(torch.randn(4, 3, 9, 8, dtype=torch.float64))
        x, padding = layer._padded(layer.inputs[1])  # "same" padding applied to x, as unfold cannot do it
        unfolded = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride).transpose(1, 2)
        torch.testing.assert_close(layer.patches(layer.inputs[1]), unfolded, atol=0, rtol=0)
        expected = layer.activations(torch.float64) @ q_a
        torch.testing.assert_close(layer.rotated_inputs(q_a), expected, atol=1e-12, rtol=0)
        # patches at chosen positions: gathered from the padded pixels (one call) or from every patch (two calls)
        t = unfolded.shape[1]
        positions = torch.rand(4, t, generator=torch.Generator().manual_seed(1)).argsort(1)[:, :5]
        chosen = torch.gather(unfolded, 1, positions[..., None].expand(-1, -1, unfolded.shape[2]))
        torch.testing.assert_close(layer.patches_at(layer.inputs[1], positions), chosen, atol=0, rtol=0)
        assert layer.n_positions() == 2 * t
        both = torch.rand(4, 2 * t, generator=torch.Generator().manual_seed(2)).argsort(1)[:, :6]
        every = layer.activations(torch.float64)
        torch.testing.assert_close(
            layer.activations(torch.float64, both),
            torch.gather(every, 1, both[..., None].expand(-1, -1, every.shape[2])),
        )


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1, bias=False),
        dict(kernel_size=(3, 2), padding="same", dilation=2, bias=True),
        dict(kernel_size=(2, 3), padding=(0, 2), bias=True),
        dict(kernel_size=1, bias=False),
    ],
    ids=["3x3", "same-dilated-bias", "uneven-bias", "1x1"],
)
def test_per_sample_sums_of_stride_one_convs_equal_the_sums_over_their_patches(conv):
    """``TrackedConv2d.per_sample_sums`` (one product per kernel offset on the flattened padded input, no patches)
    must equal ``Σ_t g_t a_tᵀ`` over ``activations()`` (bias column included) for any sub-range of samples; strided
    convs and modules called twice form their patches instead."""
    torch.manual_seed(3)
    module = nn.Conv2d(5, 4, **conv).double()
    (layer,) = layers.tracked_layers(module, dict(module.named_parameters(prefix="c")))
    with layers.hooked([layer]):
        module(torch.randn(6, 5, 9, 7, dtype=torch.float64))
        assert layer.sums_without_patches()
        g = torch.randn(6, layer.n_positions(), 4, dtype=torch.float64)
        expected = g.transpose(1, 2) @ layer.activations(torch.float64)
        torch.testing.assert_close(layer.per_sample_sums(g[2:5], slice(2, 5)), expected[2:5], atol=1e-12, rtol=0)
        module(torch.randn(6, 5, 9, 7, dtype=torch.float64))
        assert not layer.sums_without_patches()  # two calls in one forward
    strided = nn.Conv2d(5, 4, 3, stride=2)
    (layer,) = layers.tracked_layers(strided, dict(strided.named_parameters(prefix="s")))
    with layers.hooked([layer]):
        strided(torch.randn(2, 5, 9, 7))
        assert not layer.sums_without_patches()


@pytest.mark.parametrize("rotate_first", [True, False])
def test_self_influence_over_position_pairs_equals_the_coordinates_weighted_squares(monkeypatch, rotate_first):
    """``basis_self_influence`` sums layers of at most ``PAIR_POSITIONS`` positions over pairs of positions:
    a conv with 4 positions (pairs), one with 16 (coordinates, both ways of forming them) and the fc layer (1)
    must give the weighted squares of :meth:`basis_grads`' coordinates."""
    monkeypatch.setattr(kfac_inverse, "_rotate_first", lambda *args: rotate_first)
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()  # 8×8 inputs: 16 then 4 positions
    x, y = torch.randn(23, 2, 8, 8), torch.randint(0, 3, (23,))
    params = dict(model.named_parameters())
    inv = _fit("kfac", model, params, _batches(x, y, 10), len(x))
    d = inv.inverse_diagonal(Damping.absolute(1e-3))
    expected = sum(weighted_squares(r, d[key]) for key, r in inv.basis_grads(model, params, x, y))
    torch.testing.assert_close(inv.basis_self_influence(model, params, x, y, d), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize(
    "scope, rotate_first, rank", [("all", True, None), ("all", False, None), ("head", True, None), ("all", True, 5)]
)
def test_eigenbasis_scores_equal_parameter_space_solves(cnn_setup, monkeypatch, method, scope, rotate_first, rank):
    """The engine's eigenbasis path (coordinates straight from hooks, completed bases) must give the same
    influences and self-influences as per-sample gradients + ``solve`` in parameter space. 12 training points
    in uneven chunks of 5 leave the fc input factor rank-deficient (Gram path, basis completion); with a
    ``rank`` both paths drop the complement of the projected bases (the Gram path cut as well)."""
    monkeypatch.setattr(kfac_inverse, "_rotate_first", lambda *args: rotate_first)
    model, _, x_tr, y_tr, x_te, y_te = cnn_setup
    x_tr, y_tr = x_tr[:12], y_tr[:12]
    im = InfluenceModel(model, method=Method.named(method, rank=rank), scope=scope, damping=1e-2, batch_size=5)
    im.fit(x_tr, y_tr)
    if rank is not None:
        assert all(f.projected and f.q_a.shape[1] <= rank for f in im.inverse_.layers)
    elif scope == "all":
        assert not next(f for f in im.inverse_.layers if f.weight_name == "fc.weight").full_rank
    factors = im.test_factors(x_te, y_te)
    assert factors.in_basis
    # self-influence of points outside the fit set reaches the complement of the fitted bases (1/λ there)
    basis = im.influences_from_factors(factors), im.self_influence(), im.self_influence(x_te, y_te)
    one_pass = im.influences_and_self_influence(factors)  # the pipeline's: both from the same coordinates
    np.testing.assert_allclose(one_pass[0], basis[0], rtol=1e-5, atol=1e-7 * np.abs(basis[0]).max())
    np.testing.assert_allclose(one_pass[1], basis[1], rtol=1e-5)

    block_model = im.block_model_
    inputs = (lambda x: block_model_inputs(im, x)) if scope == "head" else (lambda x: x)
    g_tr = per_sample_grads(block_model, im.params_, inputs(x_tr), y_tr)
    g_te = per_sample_grads(block_model, im.params_, inputs(x_te), y_te)
    solved_te = im.inverse_.solve(g_te, im.damping)
    solved_tr = im.inverse_.solve(g_tr, im.damping)
    names = list(im.params_)
    reference = (
        _flat(solved_te, names) @ _flat(g_tr, names).T,
        (_flat(solved_tr, names) * _flat(g_tr, names)).sum(1),
        (_flat(solved_te, names) * _flat(g_te, names)).sum(1),
    )
    for got, want in zip(basis, reference, strict=True):
        assert _rel(torch.from_numpy(got), want) <= 2e-5
    assert (basis[1] > 0).all()


def block_model_inputs(im: InfluenceModel, x: torch.Tensor) -> torch.Tensor:
    """The head's inputs (backbone features) for images ``x``."""
    captured = []
    handle = im.block_model_.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            im.model(x)
    finally:
        handle.remove()
    return captured[0]


def test_refuses_hessian_and_unsupported_layers():
    with pytest.raises(InfluenceLensError, match="Gauss-Newton"):
        Method.named("ekfac").inverse(Curvature.HESSIAN)
    with pytest.raises(InfluenceLensError, match="Gauss-Newton"):
        InfluenceModel(nn.Linear(2, 2), method=Method.named("kfac"), curvature="hessian")
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.int64)
    with pytest.raises(InfluenceLensError, match="BatchNorm1d"):
        _fit("kfac", model, dict(model.named_parameters()), _batches(x, y, 5), 5)
    # a subset of the parameters: only the last layer is tracked
    params = {"2.weight": model[2].weight}
    inv = _fit("kfac", model, params, _batches(x, y, 2), 5)
    out = inv.solve({"2.weight": torch.randn(3, 2, 3)}, Damping.of(1e-3))
    assert out["2.weight"].shape == (3, 2, 3)


def test_resnet18_smoke():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    params = {
        n: p
        for m_name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for n, p in m.named_parameters(prefix=m_name, recurse=False)
    }
    x = torch.randn(24, 3, 64, 64)
    y = torch.randint(0, 2, (24,))
    stages = []
    start = time.perf_counter()
    inv = _fit(
        "ekfac",
        model,
        params,
        _batches(x, y, 10),
        len(x),
        progress=lambda s, d, t: stages.append((s, d, t)),
        dtype="float32",
    )
    fit_seconds = time.perf_counter() - start
    g = {n: torch.randn(2, *p.shape) for n, p in params.items()}
    out = inv.solve(g, Damping.of(1e-3))
    print(f"resnet18 ekfac fit (float32 factors): {fit_seconds:.2f} s for 24 samples")
    assert set(out) == set(params)
    assert all(out[n].shape == g[n].shape and torch.isfinite(out[n]).all() for n in params)
    assert ("ekfac: factors", 24, 24) in stages and ("ekfac: eigenvalue correction", 24, 24) in stages
    # positive definite: gᵀ (H + λI)⁻¹ g > 0
    assert (_flat(out, list(params)) * _flat(g, list(params))).sum(1).min() > 0


def test_eigh_that_does_not_converge_is_retried_shifted_and_in_float64(monkeypatch):
    """LAPACK's eigh failed on a rank-deficient whole-ResNet18 covariance at 16 px; the retry gives the same
    eigenpairs (shift removed) and an unrecoverable failure names the fix."""
    from influence_core.influence.kfac import factors

    x = torch.randn(40, 12, dtype=torch.float64)
    m = x.T @ x / 40
    m[:, -1] = m[-1, :] = 0  # rank-deficient, as the failing layer inputs were
    true_evals, _ = torch.linalg.eigh(m)
    real_eigh, calls = torch.linalg.eigh, []

    def failing(a, fail_first: int):
        calls.append(a)
        if len(calls) <= fail_first:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(a)

    for fail_first in (1, 4):  # the first shift works; every shift fails and float64 works
        calls.clear()
        monkeypatch.setattr(torch.linalg, "eigh", lambda a, n=fail_first: failing(a, n))
        evals, q = factors.robust_eigh(m)
        assert len(calls) == fail_first + 1
        torch.testing.assert_close(evals, true_evals, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(q @ torch.diag(evals) @ q.T, m, atol=1e-10, rtol=1e-8)
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: failing(a, 99))
    with pytest.raises(InfluenceLensError, match="did not converge"):
        factors.robust_eigh(m)


def test_leading_eigh_finds_the_leading_eigenpairs_of_a_decaying_spectrum():
    """The randomized eigensolver behind ``rank``: on a 600 × 600 covariance with a spectrum decaying like a
    layer's, its 40 leading eigenvalues and their subspace match ``eigh``'s."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 600, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, 600, dtype=torch.float64)
    m = x.T @ x / len(x)
    evals, q = factors.leading_eigh(m, 40)
    want_evals, want_q = torch.linalg.eigh(m)
    assert q.shape == (600, 40)
    torch.testing.assert_close(q.T @ q, torch.eye(40, dtype=torch.float64), atol=1e-10, rtol=0)
    assert _rel(evals, want_evals[-40:]) <= 1e-3
    assert torch.linalg.matrix_norm(q.T @ want_q[:, -40:]) ** 2 / 40 >= 0.999


@pytest.mark.parametrize("dim", [7, 700])  # one block; three blocks, the last narrower than the others
def test_covariance_accumulates_scaled_rows_into_the_full_symmetric_matrix(dim):
    """``Covariance`` keeps its first rows, then accumulates only the blocks on and below the diagonal: what it
    decomposes must be ``(1/n) Σ scale · x xᵀ`` of every batch, whole and symmetric."""
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(rows, dim, generator=gen, dtype=torch.float64), scale)
        for rows, scale in [(3, 0.5), (2 * dim, 0.25), (dim + 5, 1.0)]
    ]  # the first stays rows, the second makes it dense
    cov = factors.Covariance(dim)
    for x, scale in batches:
        cov.add(x, scale)
    q, evals, projected = cov.eig(10, torch.float64, torch.device("cpu"))
    expected = sum(scale * x.T @ x for x, scale in batches) / 10
    assert len(cov.blocks) == -(-dim // factors.SYMMETRIC_BLOCK) and not projected
    torch.testing.assert_close(q @ torch.diag(evals) @ q.T, expected, atol=1e-10 * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fit_positions_estimates_the_input_covariance_from_a_seeded_subset_of_positions(cnn_setup, method, monkeypatch):
    """``fit_positions=k`` averages the conv's input covariance over k random positions per example (of its 64):
    the same curvature at the same scale up to sampling noise (a 1/T instead of 1/k scale would be 4× off), exactly
    the plain fit when k ≥ T, reproducible by seed and different across seeds; ``"auto"`` is
    ``DEFAULT_FIT_POSITIONS`` above ``AUTO_FLOAT64_PARAMS`` parameters and every position below; 0 is refused."""
    model, params, x_tr, y_tr, *_ = cnn_setup
    fit = lambda **o: _fit(method, model, params, _batches(x_tr, y_tr, 64), len(x_tr), dtype="float64", **o)  # noqa: E731
    every = fit(fit_positions=None)
    sixteen, again, other_seed = fit(fit_positions=16), fit(fit_positions=16), fit(fit_positions=16, seed=1)
    conv, fc = 0, 1
    assert every.layers[conv].q_a.shape[0] == 28  # 3·3·3 + bias; 64 positions per example
    assert 1e-3 < _rel(sixteen.layers[conv].eigenvalues, every.layers[conv].eigenvalues) < 0.05
    ratio = float(sixteen.layers[conv].eigenvalues.sum() / every.layers[conv].eigenvalues.sum())
    assert abs(ratio - 1) < 0.02
    torch.testing.assert_close(sixteen.layers[conv].eigenvalues, again.layers[conv].eigenvalues, atol=0, rtol=0)
    assert not torch.equal(sixteen.layers[conv].eigenvalues, other_seed.layers[conv].eigenvalues)
    assert torch.equal(sixteen.layers[fc].q_a, every.layers[fc].q_a)  # one position: nothing to subsample
    assert torch.equal(fit(fit_positions=64).layers[conv].eigenvalues, every.layers[conv].eigenvalues)
    assert torch.equal(fit().layers[conv].eigenvalues, every.layers[conv].eigenvalues)  # "auto", 762 parameters
    monkeypatch.setattr(kfac_inverse, "AUTO_FLOAT64_PARAMS", 100)
    monkeypatch.setattr(kfac_inverse, "DEFAULT_FIT_POSITIONS", 16)
    auto_large = fit(fit_examples=None)  # (its "auto" would now also fit on a subset of examples)
    assert torch.equal(auto_large.layers[conv].eigenvalues, sixteen.layers[conv].eigenvalues)
    with pytest.raises(InfluenceLensError, match="fit_positions must be at least 1"):
        Method.named(method, fit_positions=0)


def test_rank_must_be_positive():
    with pytest.raises(InfluenceLensError, match="rank must be at least 1"):
        Method.named("ekfac", rank=0)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fit_examples_fits_on_a_seeded_subset(cnn_setup, method, monkeypatch):
    """``fit_examples=k`` over the whole training set equals a plain fit on the ``k`` rows it draws (eigenvalues
    divided by ``k``, not ``n``; regrouping into chunks of the original size across an uneven last chunk); another
    seed draws other rows; ``k ≥ n`` is the plain fit; ``"auto"`` is ``DEFAULT_FIT_EXAMPLES`` for blocks above
    ``AUTO_FLOAT64_PARAMS`` parameters and every example below; 0 is refused."""
    from influence_core.influence.ops import fit_subset

    model, params, x_tr, y_tr, *_ = cnn_setup
    rows = fit_subset(len(x_tr), 150, seed=4)
    assert len(rows) == len(set(rows.tolist())) == 150 and bool((rows[1:] > rows[:-1]).all())
    assert not torch.equal(rows, fit_subset(len(x_tr), 150, seed=5))
    sub = _fit(method, model, params, _batches(x_tr, y_tr, 64), len(x_tr), fit_examples=150, seed=4)
    plain = _fit(method, model, params, _batches(x_tr[rows], y_tr[rows], 64), 150)
    everything = _fit(method, model, params, _batches(x_tr, y_tr, 64), len(x_tr))
    capped_above = _fit(method, model, params, _batches(x_tr, y_tr, 64), len(x_tr), fit_examples=len(x_tr))
    for a, b, c, d in zip(sub.layers, plain.layers, everything.layers, capped_above.layers, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(a.q_a @ a.q_a.T, b.q_a @ b.q_a.T, rtol=0, atol=1e-5)
        assert _rel(a.eigenvalues, c.eigenvalues) > 1e-3  # a subset is not the whole set
        assert torch.equal(c.eigenvalues, d.eigenvalues)
    small_block = _fit(method, model, params, _batches(x_tr, y_tr, 64), len(x_tr))  # "auto", 2.6k parameters
    monkeypatch.setattr(kfac_inverse, "AUTO_FLOAT64_PARAMS", 100)
    monkeypatch.setattr(kfac_inverse, "DEFAULT_FIT_EXAMPLES", 150)
    large_block = _fit(
        method, model, params, _batches(x_tr, y_tr, 64), len(x_tr), dtype="float64", seed=4, fit_positions=None
    )
    layers = zip(sub.layers, everything.layers, small_block.layers, large_block.layers, strict=True)
    for a, c, auto_small, auto_large in layers:
        assert torch.equal(auto_small.eigenvalues, c.eigenvalues)
        torch.testing.assert_close(auto_large.eigenvalues, a.eigenvalues, rtol=1e-5, atol=1e-12)
    with pytest.raises(InfluenceLensError, match="fit_examples must be at least 1"):
        Method.named(method, fit_examples=0)
