"""The engine's estimator shape: parameters stored at construction, state built in ``fit``, clear errors for
unfitted use and misspelt options, lazy image sources streamed, and the head's training features computed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from influence_core.errors import InfluenceLensError
from influence_core.influence import CG, EKFAC, Direct, InfluenceModel, Method

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(digits, trained_cnn):
    x_train, y_train, x_test, y_test = digits(60, 6, classes=3)
    return trained_cnn(x_train, y_train, channels=1, classes=3), x_train, y_train, x_test, y_test


class CountingImages:
    """An image source that records which rows were read (and never hands out more than one chunk)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.reads = x, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        self.reads.append((rows.start, rows.stop))
        return self.x[rows]


def test_constructor_only_stores_parameters(setup):
    model, *_ = setup
    before = {n: p.clone() for n, p in model.state_dict().items()}
    model.train()
    im = InfluenceModel(model, method=EKFAC(), scope="all", damping=1e-2, device="cpu")
    assert model.training  # not put in eval mode, not moved: fit does that
    assert not any(name.endswith("_") and not name.startswith("_") for name in vars(im))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    model.eval()


@pytest.mark.parametrize("call", ["test_factors", "self_influence", "influences", "state_dict", "block_damping"])
def test_unfitted_use_is_a_clear_error(setup, call):
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, method=Direct(), device="cpu")
    args = {"test_factors": (x_test, y_test), "influences": (x_test, y_test)}.get(call, ())
    with pytest.raises(InfluenceLensError, match="not fitted"):
        getattr(im, call)(*args)


def test_misspelt_method_options_fail_at_construction():
    with pytest.raises(TypeError, match="maxiterr"):
        CG(maxiterr=10)
    with pytest.raises(InfluenceLensError, match="maxiterr"):
        Method.named("cg", maxiterr=10)
    with pytest.raises(InfluenceLensError, match="Unknown influence method"):
        Method.named("ekfca")
    with pytest.raises(InfluenceLensError, match="preconditioner"):
        CG(preconditioner="jakobi")
    with pytest.raises(InfluenceLensError, match="configured method"):
        InfluenceModel(nn.Linear(2, 2), method="ekfac")
    with pytest.raises(InfluenceLensError, match="curvature"):
        InfluenceModel(nn.Linear(2, 2), method=Direct(), curvature="fisher")


def test_image_source_is_streamed_and_head_features_are_computed_once(setup, rel_err):
    """``x`` may be any object with ``len`` and slicing; it is read a chunk at a time. The head scope runs the
    backbone over the training set once, in ``fit``; scoring the training set afterwards reads no image."""
    model, x_train, y_train, x_test, y_test = setup
    source = CountingImages(x_train)
    im = InfluenceModel(model, method=Direct(), scope="head", damping=0.1, device="cpu", batch_size=16)
    im.fit(source, y_train)
    assert max(b - a for a, b in source.reads) <= 16
    reads_after_fit = len(source.reads)
    lazy = im.influences(x_test, y_test), im.self_influence()
    assert len(source.reads) == reads_after_fit
    eager = InfluenceModel(model, method=Direct(), scope="head", damping=0.1, device="cpu").fit(x_train, y_train)
    assert rel_err(lazy[0], eager.influences(x_test, y_test, x_train, y_train)) <= 1e-6
    assert rel_err(lazy[1], eager.self_influence(x_train, y_train)) <= 1e-6


class NoLinearClassifier(nn.Module):
    """Conv → global average pool as logits: no ``nn.Linear`` anywhere."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_scope_all_needs_no_linear_layer(setup):
    """Only the head scope needs an nn.Linear; ``all`` takes every Conv2d/Linear there is."""
    _, x_train, y_train, x_test, y_test = setup
    torch.manual_seed(0)
    model = NoLinearClassifier().eval()
    for method in (Direct(), EKFAC()):
        infl = (
            InfluenceModel(model, method=method, scope="all", damping=0.1, device="cpu")
            .fit(x_train, y_train)
            .influences(x_test, y_test)
        )
        assert infl.shape == (6, 60) and np.isfinite(infl).all()
    with pytest.raises(InfluenceLensError, match="no nn.Linear"):
        InfluenceModel(model, method=Direct(), scope="head", device="cpu").fit(x_train, y_train)


def test_training_set_defaults_need_a_fit_not_a_loaded_state(setup):
    model, x_train, y_train, x_test, y_test = setup
    im = InfluenceModel(model, method=Direct(), scope="all", damping=0.1, device="cpu").fit(x_train, y_train)
    loaded = InfluenceModel(model, method=Direct(), scope="all", damping=0.1, device="cpu")
    loaded.load_state_dict(im.state_dict())
    with pytest.raises(InfluenceLensError, match="training images"):
        loaded.self_influence()
    with pytest.raises(InfluenceLensError, match="both"):
        im.self_influence(x_train)
