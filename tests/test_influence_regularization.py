"""``set_regularization`` reuses the fitted curvature and matches a refit; cached state round-trips."""

from __future__ import annotations

import pytest
import torch
from _influence_helpers import digits, rel_err, single_thread, trained_cnn  # noqa: F401  (autouse fixture)

from influence_core.errors import InfluenceLensError
from influence_core.influence import InfluenceModel


@pytest.fixture(scope="module")
def setup():
    x_train, y_train, x_test, y_test = digits(70, 8, classes=3)
    return trained_cnn(x_train, y_train, channels=1, classes=3), x_train, y_train, x_test, y_test


def scores(im, x_train, y_train, x_test, y_test):
    return im.influences(im.test_factors(x_test, y_test), x_train, y_train), im.self_influence(x_train, y_train)


@pytest.mark.parametrize("method,scope,options", [
    ("direct", "all", {}), ("direct", "head", {}), ("arnoldi", "all", dict(rank=30)), ("cg", "all", {}),
])
def test_set_regularization_matches_refit(setup, method, scope, options):
    model, x_train, y_train, x_test, y_test = setup
    make = lambda lam: InfluenceModel(model, scope=scope, method=method, regularization=lam, device="cpu",  # noqa: E731
                                      batch_size=32, **options)
    im = make(0.3).fit(x_train, y_train)
    stale = im.test_factors(x_test, y_test)
    im.set_regularization(0.03)
    with pytest.raises(InfluenceLensError, match="test_factors"):
        im.influences(stale, x_train, y_train)
    reused = scores(im, x_train, y_train, x_test, y_test)
    refit = scores(make(0.03).fit(x_train, y_train), x_train, y_train, x_test, y_test)
    tol = 1e-3 if method == "cg" else 1e-5
    assert rel_err(reused[0], refit[0]) <= tol and rel_err(reused[1], refit[1]) <= tol


@pytest.mark.parametrize("method", ["direct", "arnoldi"])
def test_state_dict_round_trip(setup, method):
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, scope="all", method=method, regularization=0.1, device="cpu").fit(x_train, y_train)
    state = {k: v.clone() for k, v in im.state_dict().items()}
    loaded = InfluenceModel(model, scope="all", method=method, regularization=0.1, device="cpu")
    loaded.load_state_dict(state)
    assert rel_err(scores(loaded, x_train, y_train, x_test, y_test)[0],
                   scores(im, x_train, y_train, x_test, y_test)[0]) <= 1e-6


def test_cg_has_no_state_to_load(setup):
    model, *_ = setup
    im = InfluenceModel(model, scope="all", method="cg", device="cpu")
    with pytest.raises(InfluenceLensError, match="fit"):
        im.load_state_dict({})
    assert torch.get_num_threads() == 1
