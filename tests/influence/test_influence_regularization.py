"""λ: ``set_damping`` reuses the fitted curvature and matches a refit; cached state round-trips; relative
damping (to the mean or the largest eigenvalue) equals an exact solve with the same effective λ; the defaults are
relative to the largest eigenvalue per scope; λ below float32 resolution is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core.errors import InfluenceLensError
from influence_core.influence import (
    CG,
    EKFAC,
    KFAC,
    Arnoldi,
    Damping,
    Direct,
    InfluenceModel,
    LiSSA,
    Method,
    Scope,
    default_damping,
)
from influence_core.pipeline import InfluenceSettings, parse_settings

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(digits, trained_cnn):
    x_train, y_train, x_test, y_test = digits(70, 8, classes=3)
    return trained_cnn(x_train, y_train, channels=1, classes=3), x_train, y_train, x_test, y_test


def scores(im, x_test, y_test):
    return im.influences(x_test, y_test), im.self_influence()


@pytest.mark.parametrize(
    "method,scope",
    [
        (Direct(), "all"),
        (Direct(), "head"),
        (Arnoldi(rank=30), "all"),
        (CG(), "all"),
    ],
)
def test_set_damping_matches_refit(setup, method, scope, rel_err):
    model, x_train, y_train, x_test, y_test = setup

    def make(lam):
        return InfluenceModel(model, method=method, scope=scope, damping=lam, device="cpu", batch_size=32)

    im = make(0.3).fit(x_train, y_train)
    stale = im.test_factors(x_test, y_test)
    im.set_damping(0.03)
    with pytest.raises(InfluenceLensError, match="test_factors"):
        im.influences_from_factors(stale)
    reused = scores(im, x_test, y_test)
    refit = scores(make(0.03).fit(x_train, y_train), x_test, y_test)
    tol = 1e-3 if isinstance(method, CG) else 1e-5
    assert rel_err(reused[0], refit[0]) <= tol and rel_err(reused[1], refit[1]) <= tol


@pytest.mark.parametrize("method", [Direct(), Arnoldi()])
def test_state_dict_round_trip(setup, method, rel_err):
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, method=method, scope="all", damping=0.1, device="cpu").fit(x_train, y_train)
    state = {k: v.clone() for k, v in im.state_dict().items()}
    loaded = InfluenceModel(model, method=method, scope="all", damping=0.1, device="cpu")
    loaded.load_state_dict(state)
    assert rel_err(loaded.influences(x_test, y_test, x_train, y_train), im.influences(x_test, y_test)) <= 1e-6


def test_cg_has_no_state_to_load(setup):
    model, *_ = setup
    im = InfluenceModel(model, method=CG(), scope="all", device="cpu")
    with pytest.raises(InfluenceLensError, match="fit"):
        im.load_state_dict({})
    assert torch.get_num_threads() == 1


def exact_influences(im: InfluenceModel, setup, lambdas: dict[str, float]) -> np.ndarray:
    """``G_test (H_b + λ_b I)⁻¹ G_trainᵀ`` summed over the method's blocks, with the exact float64 curvature of
    each block (``direct`` on the block's parameters) and the given λ per block."""
    model, x_train, y_train, x_test, y_test = setup
    total = 0
    for key, lam in lambdas.items():
        names = [n for n in key.split("|") if n] if key else list(im.params_)
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        block = InfluenceModel(model, method=Direct(), scope=modules, damping=lam, device="cpu").fit(x_train, y_train)
        assert set(block.params_) == set(names)
        total = total + block.influences(x_test, y_test).astype(np.float64)
    return total


@pytest.mark.parametrize(
    "method,tol",
    [
        (Direct(), 1e-5),
        (CG(tol=1e-7, maxiter=300), 1e-3),
        (Arnoldi(rank=10_000), 1e-3),
        (LiSSA(depth=400, tol=1e-5), 5e-2),
        (EKFAC(), None),
        (KFAC(), None),
    ],
)
def test_relative_damping_is_an_exact_solve_with_the_effective_lambda(setup, method, tol, rel_err):
    """``Damping.relative(0.1)``: λ_b = 0.1 × mean eigenvalue of block b. For the whole-block methods that is
    one λ (trace(H)/p: exact for direct, a Hutchinson estimate for the matrix-free ones); the solve must equal the
    exact solve with that λ. K-FAC/EK-FAC take one λ per layer, from their own eigenvalues (checked below)."""
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(
        model, method=method, scope="all", damping=Damping.relative(0.1), device="cpu", batch_size=32
    ).fit(x_train, y_train)
    lambdas = im.block_damping()
    if tol is None:  # per layer: 0.1 × the mean of that layer's fitted eigenvalues
        assert set(lambdas) == {"conv.weight|conv.bias", "fc.weight|fc.bias"}
        for f in im.inverse_.layers:
            assert lambdas[f.key] == pytest.approx(0.1 * float(f.eigenvalues.sum()) / f.eigenvalues.numel())
        assert len(set(lambdas.values())) == 2
        return
    exact_direct = InfluenceModel(model, method=Direct(), scope="all", damping=Damping.relative(0.1), device="cpu").fit(
        x_train, y_train
    )
    (lam,) = lambdas.values()
    (true_lam,) = exact_direct.block_damping().values()
    assert lam == pytest.approx(true_lam, rel=0.35)  # Hutchinson, 16 probes (exact for direct itself)
    assert rel_err(im.influences(x_test, y_test), exact_influences(im, setup, lambdas)) <= tol


@pytest.mark.parametrize(
    "method,tol",
    [
        (Direct(), 1e-5),
        (CG(tol=1e-7, maxiter=300), 1e-3),
        (LiSSA(depth=400, tol=1e-5), 5e-2),
        (Arnoldi(rank=10_000), 1e-3),
        (EKFAC(), None),
        (KFAC(), None),
    ],
)
def test_damping_relative_to_top_is_an_exact_solve_with_the_effective_lambda(setup, method, tol, rel_err):
    """``Damping.relative_to_top(0.01)``: λ_b = 0.01 × the largest eigenvalue of block b, which for the whole-block
    methods is the exact curvature's (power iteration for cg / lissa: a lower bound within 5 % here), and for
    K-FAC/EK-FAC each layer's largest fitted eigenvalue; the solve equals the exact solve with that λ."""
    model, x_train, y_train, x_test, y_test = setup
    damping = Damping.relative_to_top(0.01)
    im = InfluenceModel(model, method=method, scope="all", damping=damping, device="cpu", batch_size=32)
    im.fit(x_train, y_train)
    lambdas = im.block_damping()
    if tol is None:
        assert set(lambdas) == {"conv.weight|conv.bias", "fc.weight|fc.bias"}
        for f in im.inverse_.layers:
            assert lambdas[f.key] == pytest.approx(0.01 * float(f.eigenvalues.max()))
        return
    exact = InfluenceModel(model, method=Direct(), scope="all", device="cpu").fit(x_train, y_train)
    top = float(torch.linalg.eigvalsh(exact.inverse_.matrix.double()).max())
    (lam,) = lambdas.values()
    assert 0.95 * 0.01 * top <= lam <= 1.0001 * 0.01 * top
    assert rel_err(im.influences(x_test, y_test), exact_influences(im, setup, lambdas)) <= tol


def test_default_damping_follows_the_scope(setup):
    """No damping given: ``top:1e-3`` on the head and ``top:1e-5`` beyond it (engine and settings alike),
    resolved per block, and never refused where a tiny absolute λ is."""
    model, x_train, y_train, *_ = setup
    assert default_damping(Scope.HEAD) == Damping.relative_to_top(1e-3)
    assert default_damping("all") == default_damping(("conv", "fc")) == Damping.relative_to_top(1e-5)
    assert InfluenceModel(model, scope="head").damping == default_damping(Scope.HEAD)
    assert InfluenceSettings(scope=Scope.ALL).damping == default_damping(Scope.ALL)
    assert parse_settings(scope="all", damping="top:1e-5") == InfluenceSettings(scope=Scope.ALL)
    im = InfluenceModel(model, method=EKFAC(), scope="all", device="cpu").fit(x_train, y_train)
    for f in im.inverse_.layers:
        assert im.block_damping()[f.key] == pytest.approx(1e-5 * float(f.eigenvalues.max()))


def test_kfac_relative_damping_matches_absolute_per_layer(setup, rel_err):
    """K-FAC with relative damping = K-FAC with each layer's resolved λ given absolutely (blocks are independent)."""
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, method=KFAC(), scope="all", damping=Damping.relative(0.1), device="cpu")
    im.fit(x_train, y_train)
    lambdas = im.block_damping()
    per_layer = 0
    for key, lam in lambdas.items():
        module = key.split("|")[0].rsplit(".", 1)[0]
        one = InfluenceModel(model, method=KFAC(), scope=[module], damping=lam, device="cpu")
        per_layer = per_layer + one.fit(x_train, y_train).influences(x_test, y_test).astype(np.float64)
    assert rel_err(im.influences(x_test, y_test), per_layer) <= 1e-5


def test_damping_text_round_trips():
    for text in ("0.001", "rel:0.1", "top:1e-05"):
        assert str(Damping.parse(text)) == text
    assert Damping.parse("rel:0.1") == Damping.relative(0.1)
    assert Damping.parse(" top:1e-5") == Damping.relative_to_top(1e-5)
    assert Damping.parse("1e-3") == Damping.of(1e-3)
    with pytest.raises(InfluenceLensError, match="rel:"):
        Damping.parse("relative 0.1")
    with pytest.raises(InfluenceLensError, match="positive"):
        Damping.relative(0)
    with pytest.raises(InfluenceLensError, match="positive and finite"):  # an infinite λ: all-zero influences
        Damping.parse("inf")


@pytest.mark.parametrize("method", ["direct", "ekfac"])
def test_lambda_below_float32_resolution_is_refused(setup, method):
    """λ so small that float32 gradients cannot resolve it (condition number > 1e6) is refused, not silent."""
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, method=Method.named(method), scope="all", damping=1e-9, device="cpu")
    with pytest.raises(InfluenceLensError, match="float32"):
        im.fit(x_train, y_train).influences(x_test, y_test)
