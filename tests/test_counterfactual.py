"""The retraining check of a ranking (:mod:`influence_core.counterfactual`).

Ground truth on a convex head as in ``test_influence_head_loo.py``: a frozen random conv backbone on real digits
and an L2-regularised linear head trained to its optimum (L-BFGS, float64), whose leave-k-out retrains are cheap
and exact. The run-level tests use a synthetic run (no model) with a retrain given by the test, and one tiny real
run for the run's own recipe.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _synthetic_run import make_synthetic_run

from influence_core import counterfactual as cf
from influence_core.influence import Direct, InfluenceModel
from influence_core.pipeline import DEFAULT_SETTINGS, load_influence

LAMBDA = 1e-2


@pytest.fixture(scope="module")
def convex_head(digits, frozen_backbone_classifier, single_thread):
    """(influences (n_test, n_train), test logits (n_test, C), retrain(exclude) -> test logits, y_train, y_test).
    One thread while this module runs (restored after it: later tests compare trainings bit for bit)."""
    x_train, y_train, x_test, y_test = digits(200, 40, classes=5)
    model, feats_train = frozen_backbone_classifier(x_train, y_train, LAMBDA)
    im = InfluenceModel(model, method=Direct(), scope="head", damping=LAMBDA, device="cpu", batch_size=64)
    infl = im.fit(x_train, y_train).influences(x_test, y_test)
    feats_test = model[:-1](x_test).detach().double()
    theta = torch.cat([model[-1].weight.detach(), model[-1].bias.detach()[:, None]], 1).double()

    def logits(t):
        return (feats_test @ t[:, :-1].T + t[:, -1]).numpy()

    return infl, logits(theta), feats_train, theta, logits, y_train.numpy(), y_test.numpy()


def test_predicted_change_matches_retraining_on_a_convex_head(convex_head, train_head):
    """Guards the conventions of the prediction: removing the top-k helpful images raises the test loss by
    Σ I / n (sign and size), the margin moves as predicted, and a predicted flip is a measured one."""
    infl, logits0, feats, theta, logits, y_train, y_test = convex_head
    probs = torch.softmax(torch.as_tensor(logits0), 1).numpy()
    n = len(y_train)
    right = np.flatnonzero(probs.argmax(1) == y_test)
    # the three right predictions that the fewest removals are predicted to flip
    ks = {t: cf.smallest_flipping_k(infl[t], probs[t], int(y_test[t]), "helpful") for t in right}
    tests = sorted((k, t) for t, k in ks.items() if k is not None)[:3]
    assert len(tests) == 3, ks
    for k, t in tests:
        for direction, kk in (("helpful", k), ("harmful", 3)):
            removed = cf.ranked(infl[t], direction)[:kk]
            predicted = cf.predict(probs[t], int(y_test[t]), infl[t][removed].sum() / n)[0]
            keep = torch.ones(n, dtype=torch.float64)
            keep[removed] = 0
            after = logits(train_head(feats, torch.as_tensor(y_train), LAMBDA, weights=keep, init=theta))[t]
            log_p = torch.log_softmax(torch.as_tensor(after), 0).numpy()
            measured_loss = -log_p[y_test[t]] + np.log(probs[t][y_test[t]])
            assert np.sign(predicted.loss_change) == np.sign(measured_loss), (t, direction, predicted, measured_loss)
            assert 0.5 <= measured_loss / predicted.loss_change <= 2.0, (t, direction, predicted, measured_loss)
            before = cf.margin(np.log(probs[t]), int(y_test[t]))
            margin_ratio = (cf.margin(log_p, int(y_test[t])) - before) / (predicted.margin - before)
            assert 0.4 <= margin_ratio <= 2.5, (t, direction, margin_ratio)  # the other classes move unevenly
            if direction == "helpful":
                assert predicted.flips
                assert int(np.argmax(after)) != int(y_test[t])  # the measured prediction flipped too


def test_predict_flips_a_binary_prediction_exactly_at_half():
    """Guards the probability bookkeeping: with two classes the predicted margin is the exact logit difference."""
    probs = np.array([0.8, 0.2])
    at_half = np.log(0.8 / 0.5)  # the loss change that takes p_y from 0.8 to 0.5
    below, above = cf.predict(probs, 0, [at_half - 0.01, at_half + 0.01])
    assert not below.flips and above.flips
    assert below.margin == pytest.approx(np.log(0.5 * np.exp(0.01) / (1 - 0.5 * np.exp(0.01))), abs=1e-9)


# ------------------------------------------------------------------ run level: a synthetic run, a given retrain
@pytest.fixture
def synthetic(tmp_path):
    run = make_synthetic_run(tmp_path / "run", tmp_path / "data", n_classes=3, n_train=200, n_test=12)
    return run, load_influence(run, DEFAULT_SETTINGS)


class Retrains:
    """A retrain given by the test: counts its calls, returns fixed logits."""

    def __init__(self, logits):
        self.calls, self.logits = [], np.asarray(logits, np.float64)

    def __call__(self, exclude):
        self.calls.append(exclude.copy())
        return self.logits


def test_a_check_is_kept_and_a_second_call_does_not_retrain(synthetic):
    """Guards the cache: one file per (training, entry, test, direction, k), found again without retraining."""
    run, result = synthetic
    retrain = Retrains([0.0, 5.0, 0.0])
    first = cf.run_check(result, 0, k=4, direction="helpful", retrain=retrain)
    again = cf.run_check(result, 0, k=4, direction="helpful", retrain=retrain)
    assert len(retrain.calls) == 1 and again == first
    assert retrain.calls[0].sum() == 4 and set(np.flatnonzero(retrain.calls[0])) == set(first.removed)
    assert set(first.removed) == set(result.top_helpful(0, 4)[0].tolist())
    assert first.after_class == 1 and first.flipped == (first.before_class != 1)
    assert cf.checks(run) == [first]
    cf.run_check(result, 0, k=5, direction="helpful", retrain=retrain)  # another k is another check
    assert len(retrain.calls) == 2 and len(cf.checks(run)) == 2
    stored = json.loads(run.paths.check(result.path.name, 0, "helpful", 4).read_text())
    stored["run_key"] = "an earlier training"
    run.paths.check(result.path.name, 0, "helpful", 4).write_text(json.dumps(stored))
    assert [c.k for c in cf.checks(run)] == [5]  # a check of an earlier training of the folder is not listed


def test_random_control_removes_as_many_images_of_the_same_labels_and_none_of_the_ranked(synthetic):
    """Guards the control: same label counts as the image's own top-k, disjoint from it, repeatable."""
    run, result = synthetic
    test = 3
    own = cf.reference_direction(run.predictions["probs_test"][test], int(run.labels("test")[test]))
    ranked = cf.removal(result, test, own, 8)
    control = cf.removal(result, test, "random", 8)
    labels = run.labels("train")
    assert sorted(labels[control]) == sorted(labels[ranked])
    assert not set(control) & set(ranked)
    assert np.array_equal(control, cf.removal(result, test, "random", 8))
    check = cf.run_check(result, test, k=8, direction="random", retrain=Retrains([1.0, 0.0, 0.0]))
    assert check.removed == control.tolist() and check.direction == "random"


def test_summary_counts_flips_of_ranked_and_random_checks(synthetic):
    """Guards the line listed on Overview and in the explorer."""
    run, result = synthetic
    wrong = int((run.labels("test")[0] + 1) % 3)
    flip = np.eye(3)[wrong] * 9  # a retrained model that predicts another class than the run's
    keep = np.eye(3)[int(run.predictions["probs_test"][0].argmax())] * 9
    cf.run_check(result, 0, k=6, direction="helpful", retrain=Retrains(flip))
    cf.run_check(result, 0, k=6, direction="harmful", retrain=Retrains(keep))
    cf.run_check(result, 0, k=6, direction="random", retrain=Retrains(keep))
    assert cf.summary(cf.checks(run)) == (
        "k = 6 removed → prediction flipped in 1 of 2 checks, random removal flipped it in 0 of 1"
    )
    assert cf.summary([]) is None


def test_default_k_is_the_smallest_predicted_flip_or_says_that_none_flips(synthetic):
    """Guards the default k: the smallest k predicted to flip, capped at 5 % of the training set with a message."""
    run, result = synthetic
    probs, labels = run.predictions["probs_test"], run.labels("test")
    test = int(np.flatnonzero(probs.argmax(1) == labels)[0])  # a right prediction: removing helpful ones flips it
    row = result.row(test)
    n = len(row)
    k, reason = cf.choose_k(result, test, "helpful")
    changes = np.cumsum(np.sort(row)[::-1][:k]) / n
    flips = [p.flips for p in cf.predict(probs[test], int(labels[test]), changes)]
    assert "smallest k" in reason and flips[-1] and not any(flips[:-1])
    # the synthetic influences are huge: scale the run's row down until nothing can flip it
    small = row * 1e-6
    assert cf.smallest_flipping_k(small, probs[test], int(labels[test]), "helpful") is None
    result.row = lambda t: small  # type: ignore[method-assign]
    k, reason = cf.choose_k(result, test, "helpful")
    assert k == cf.max_k(n) == 10
    assert reason.startswith("no k up to 5 % of the training set (10 of 200 images) is predicted to flip")


def test_values_not_in_loss_units_show_the_measured_change_only(synthetic):
    """Guards the K-FAC case: whole-network values order images but are no loss changes."""
    run, result = synthetic
    result.meta["settings"] = {"method": "kfac", "scope": "all"}
    note = cf.loss_units_note(result)
    assert note is not None and "not loss changes" in note
    check = cf.run_check(result, 1, direction="helpful", retrain=Retrains([0.0, 0.0, 3.0]))
    assert (
        check.k == min(cf.RANKING_K, cf.max_k(200)) and check.predicted_loss_change is None and check.units_note == note
    )
    result.meta["settings"] = {"method": "direct", "scope": "head"}
    assert cf.loss_units_note(result) is None


def test_bad_test_index_direction_or_k_is_a_clear_error(synthetic):
    _, result = synthetic
    from influence_core import InfluenceLensError

    for kwargs in ({"test": 99}, {"test": 0, "direction": "sideways"}, {"test": 0, "k": 0}):
        with pytest.raises(InfluenceLensError):
            cf.run_check(result, retrain=Retrains([1.0, 0, 0]), **kwargs)


# ------------------------------------------------------------------ the run's own recipe, on a tiny real run
@pytest.fixture(scope="module")
def real_result(tmp_path_factory):
    """The default influence entry of a 1-epoch digits run (about 130 training images at 16 px)."""
    from influence_core import TrainConfig, train
    from influence_core.pipeline import compute_influence

    config = TrainConfig(dataset="demo", downsample=0.15, image_size=16, epochs=1, n_checkpoints=0)
    return compute_influence(train(config, tmp_path_factory.mktemp("cf") / "run"), DEFAULT_SETTINGS)


def test_check_retrains_with_the_runs_recipe(real_result):
    """Guards the wiring to training.retrain_without: the retrained model's logits move the test loss."""
    check = cf.run_check(real_result, 0, k=3, direction="helpful")
    assert check.seconds > 0 and len(check.removed) == 3 and check.predicted_loss_change is not None
    assert np.isfinite(check.after_loss) and check.after_loss != pytest.approx(check.before_loss, abs=1e-9)
    assert check in cf.checks(real_result.run)


def test_cli_check_runs_the_images_direction_and_the_random_control(real_result, capsys, monkeypatch):
    """Guards ``influence-core check``: by default the image's own direction then as many random images; a second
    call reads both from the run directory; a bad index is one line."""
    from influence_core.cli import main

    run_dir = str(real_result.run.path)
    assert main(["check", "--run-dir", run_dir, "--test-index", "1", "--json"]) == 0
    own, control = json.loads(capsys.readouterr().out)
    assert control["direction"] == "random" and control["k"] == own["k"] and own["direction"] != "random"
    monkeypatch.setattr(cf, "_recipe", lambda *a: pytest.fail("retrained although the checks were kept"))
    assert main(["check", "--run-dir", run_dir, "--test-index", "1"]) == 0
    out = capsys.readouterr().out
    assert "training images removed (random, same labels)" in out and "checks kept for this run: k =" in out
    assert main(["check", "--run-dir", run_dir, "--test-index", "9999"]) == 2
    assert capsys.readouterr().err.startswith("error: Test image 9999 does not exist")
