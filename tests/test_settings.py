"""Influence settings are objects, read from text in one place (``pipeline.parse_settings``), with typed method
options; their cache keys are those of the results computed before they were objects."""

from __future__ import annotations

import numpy as np
import pytest

from influence_core.analysis import SIGNALS, best_signal, suspicion_signals
from influence_core.errors import InfluenceLensError
from influence_core.influence import CG, EKFAC, KFAC, Damping, Direct, LiSSA, Method, Scope
from influence_core.pipeline import DEFAULT_SETTINGS, InfluenceSettings, cache_key, parse_settings


def test_records_keep_the_layout_of_existing_cache_keys():
    # guards the cache keys of existing results: cache_key hashes record(), which must stay what
    # dataclasses.asdict(settings) gave when the settings held text (method name, damping as "regularization")
    assert DEFAULT_SETTINGS.record() == {
        "method": "direct",
        "scope": Scope.HEAD,
        "regularization": {"value": 0.001, "relative_to": "top"},
        "curvature": "gauss-newton",
        "checkpoints": True,
    }
    absolute = parse_settings("kfac", ["rank=64"], "layer4.1.conv2,fc", "1e-3", checkpoints=False).record()
    assert absolute == {
        "method": "kfac",
        "scope": ("layer4.1.conv2", "fc"),
        "regularization": 0.001,  # an absolute λ as a bare number
        "curvature": "gauss-newton",
        "checkpoints": False,
    }


def test_text_is_read_once_into_objects():
    settings = parse_settings("kfac", ["rank=none", "fit_examples=128", "labels=exact"], "all", "rel:0.1")
    assert settings == InfluenceSettings(
        method=KFAC(rank=None, fit_examples=128, labels="exact"), scope=Scope.ALL, damping=Damping.relative(0.1)
    )
    assert settings.method.options() == {"labels": "exact", "rank": None, "fit_examples": 128}
    assert settings.describe().startswith("kfac, labels=exact, rank=None, fit_examples=128, scope all, λ=rel:0.1")
    assert parse_settings("lissa", ["scale=auto", "tol=1e-3"]).method == LiSSA(tol=1e-3)
    assert parse_settings("cg", ["preconditioner=none"]).method == CG()  # the word "none", not None
    assert parse_settings() == DEFAULT_SETTINGS and DEFAULT_SETTINGS.method == Direct()
    with pytest.raises(TypeError, match="parse_settings"):  # text belongs to parse_settings, not the settings
        InfluenceSettings(method="kfac")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Damping"):
        InfluenceSettings(damping="1e-3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("kfac", {"rank": 1.5}, "rank=1.5 of kfac is not an integer or none"),
        ("kfac", {"rank": True}, "rank=True of kfac is not an integer or none"),
        ("kfac", {"seed": "abc"}, "seed='abc' of kfac is not an integer"),
        ("lissa", {"depth": 2.0}, "depth=2.0 of lissa is not an integer"),
        ("cg", {"tol": float("nan")}, "tol=nan of cg is not a number"),
        ("cg", {"preconditioner": None}, "preconditioner=None of cg is not 'jacobi' or 'none'"),
    ],
)
def test_option_values_of_the_wrong_type_are_refused_by_name(name, options, message):
    # guards issue 29 item 5 from Python: Method.named checks each value against the option's declared type
    with pytest.raises(InfluenceLensError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Method.named(name, **options)


def test_lissas_own_shrink_is_not_the_damping():
    # guards the one name per concept: LiSSA's stabilising bias is `shrink`; `damping` is λ, given to the engine
    assert LiSSA(shrink=0.01).options() == {"shrink": 0.01}
    with pytest.raises(InfluenceLensError, match="Unknown option"):
        Method.named("lissa", damping=0.01)


def test_cache_keys_change_with_the_defaults_of_the_curvature(demo_run, monkeypatch):
    """A changed K-FAC default (what ``"auto"`` resolves to) is a cache miss for K-FAC results and leaves the keys
    of methods that do not use it alone."""
    from influence_core.influence.kfac import inverse

    settings = [InfluenceSettings(method=KFAC(), scope=Scope.ALL), InfluenceSettings(method=Direct())]
    before = [cache_key(demo_run, s) for s in settings]
    monkeypatch.setattr(inverse, "DEFAULT_FIT_POSITIONS", inverse.DEFAULT_FIT_POSITIONS + 1)
    after = [cache_key(demo_run, s) for s in settings]
    assert after[0] != before[0] and after[1] == before[1]
    assert cache_key(demo_run, InfluenceSettings(method=EKFAC(), scope=Scope.ALL)) != after[0]


def test_signals_are_a_pure_function_of_the_arrays():
    # guards the signals' move out of InfluenceResult: same keys, order and values from plain arrays
    n = 4
    probs = np.full((n, 2), 0.5, np.float32)
    dynamics = {"loss": np.arange(2 * n, dtype=np.float32).reshape(2, n), "margin": np.ones((2, n), np.float32)}
    args = dict(
        labels=np.zeros(n, np.int64),
        probs_train=probs,
        dynamics=dynamics,
        self_influence=np.arange(n, dtype=np.float32),
        mean_influence=np.ones(n),
        checkpoint_self_influence=np.ones((1, n), np.float32),
    )
    first = suspicion_signals(**args)
    assert list(first) == [k for k in SIGNALS if k in first] and "checkpoint_self_influence" not in first
    np.testing.assert_array_equal(first["mean_loss"], [2, 3, 4, 5])
    assert all(v.dtype == np.float64 for v in first.values()) and best_signal(first) == "mean_loss"
    second = suspicion_signals(**{**args, "checkpoint_self_influence": np.ones((3, n))}, second_pass_loss=np.ones(n))
    assert best_signal(second) == "loss_without_suspects"
    np.testing.assert_array_equal(second["checkpoint_self_influence"], np.full(n, 3.0))
    before_influences = suspicion_signals(labels=args["labels"], probs_train=probs, dynamics=dynamics)
    assert list(before_influences) == [k for k in SIGNALS if k in ("mean_loss", "mean_margin", "training_loss")]
    assert best_signal(before_influences) == "mean_loss"
