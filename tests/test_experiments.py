"""The corruption experiment as a library function, run names, and the notebook's claim checked per run."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from influence_core import InfluenceLensError, TrainConfig, train
from influence_core.analysis import mean_influence
from influence_core.experiments import (
    HELD,
    NOT_HELD,
    PARTLY,
    check_notebook_claim,
    notebook_claim,
    run_corruption_experiment,
    run_dir_name,
    run_title,
)
from influence_core.pipeline import DEFAULT_SETTINGS, InfluenceSettings, compute_influence


@pytest.mark.parametrize("config, names, title", [
    (TrainConfig(dataset="tiny-imagenet:data/tiny-imagenet-200", classes=["n01443537", "n07749582"],
                 corrupt_fraction=0.1), ["goldfish, Carassius auratus", "lemon"],
     "tiny-imagenet goldfish+lemon 10% flipped"),
    (TrainConfig(dataset="demo", corrupt_fraction=0.25, corrupt_mode="top-influence"), list("0123456789"),
     "digits 10 classes 25% flipped (top-influence)"),
    (TrainConfig(dataset="folder:/data/My Pets", classes=["cat"]), None, "My Pets cat no flips"),
    (TrainConfig(dataset="fashion-mnist:"), None, "fashion-mnist all classes no flips"),
])
def test_runs_get_human_readable_names(config, names, title):
    assert run_title(config, names) == title
    name = run_dir_name(config, names)
    assert name.startswith(title.replace("%", "pct").replace(" (", "-").replace(")", "").replace(" ", "-") + "-")
    assert len(name.rsplit("-", 1)[1]) == 8 and "/" not in name


def test_different_settings_never_share_a_run_folder():
    a, b = TrainConfig(dataset="demo", corrupt_fraction=0.1), TrainConfig(dataset="demo", corrupt_fraction=0.1, seed=1)
    assert run_title(a) == run_title(b) and run_dir_name(a) != run_dir_name(b)
    assert run_dir_name(a) == run_dir_name(TrainConfig(dataset="demo", corrupt_fraction=0.1))


CLASSES = ["cat", "dog"]
LABELS = np.array([0, 0, 0, 1, 1, 1])
FLIPPED = np.array([False, False, True, False, False, True])


@pytest.mark.parametrize("mean, verdict, held", [
    ([1.0, 2.0, -1.0, 1.0, 2.0, -3.0], HELD, [True, True]),
    ([1.0, 2.0, 5.0, 1.0, 2.0, -3.0], PARTLY, [False, True]),
    ([1.0, 2.0, 5.0, 1.0, 2.0, 3.0], NOT_HELD, [False, False]),
])
def test_the_notebook_claim_is_judged_per_label(mean, verdict, held):
    claim = check_notebook_claim(np.array(mean), LABELS, FLIPPED, CLASSES, "random", 1 / 3)
    n_held = sum(held)
    assert (claim.verdict, claim.n_labels_held, claim.n_labels_compared) == (verdict, n_held, 2)
    assert claim.table["held"].tolist() == held
    assert claim.auroc == pytest.approx(roc_auc_score(FLIPPED, -np.array(mean)))
    assert claim.summary.startswith(f"The claim {verdict}: in {n_held} of the 2 labels")
    assert "picked at random" in claim.implication


def test_the_claim_says_when_it_cannot_be_judged():
    claim = check_notebook_claim(np.array([1.0, 2.0, -1.0, 0.5, 0.7, 0.9]), LABELS, np.array([0, 0, 1, 0, 0, 0], bool),
                                 CLASSES, "top-influence", 0.2)
    assert claim.n_labels_compared == 1 and claim.table["held"].tolist() == [True, None]
    assert "harmful by construction" in claim.implication
    with pytest.raises(InfluenceLensError, match="no flipped labels"):
        check_notebook_claim(np.zeros(6), LABELS, np.zeros(6, bool), CLASSES, "random", 0.0)


def test_the_claim_on_the_real_digits_demo(demo_run):
    result = compute_influence(demo_run, DEFAULT_SETTINGS)
    claim = notebook_claim(result)
    mean, flipped, labels = mean_influence(result.influences), demo_run.flipped(), demo_run.labels("train")
    held = [mean[(labels == c) & flipped].mean() < mean[(labels == c) & ~flipped].mean()
            for c in range(demo_run.n_classes) if ((labels == c) & flipped).any()]
    assert (claim.n_labels_held, claim.n_labels_compared) == (sum(held), len(held))
    assert claim.auroc == pytest.approx(roc_auc_score(flipped, -mean))
    assert claim.mode == "random" and claim.fraction == pytest.approx(0.1)
    print(claim.summary)  # the measured numbers, for the report (pytest -s)


def test_a_bad_experiment_is_refused_before_training(demo_run, tmp_path):
    with pytest.raises(InfluenceLensError, match="between 0 and 1"):
        run_corruption_experiment(demo_run, 0.0, "random", tmp_path)
    with pytest.raises(InfluenceLensError, match="Unknown corruption mode"):
        run_corruption_experiment(demo_run, 0.1, "worst", tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_top_influence_experiment_flips_what_the_clean_run_found_most_helpful(tmp_path):
    """Clean run → influence → flip the most helpful per class → retrain → recompute → claim (digits, tiny)."""
    base = train(TrainConfig(dataset="demo", downsample=0.2, image_size=16, epochs=2, n_checkpoints=0),
                 tmp_path / "base")
    stages: set[str] = set()
    outcome = run_corruption_experiment(base, 0.1, "top-influence", tmp_path / "runs",
                                        InfluenceSettings(checkpoints=False),
                                        progress=lambda stage, done, total: stages.add(stage.split(":")[0]))
    assert stages == {"clean run", "flipped run"}  # the clean run's influence, then the flipped run
    assert outcome.clean is not None and outcome.clean.path == base.path  # a clean base is not trained again
    assert outcome.corrupted.path.name.startswith("digits-10-classes-10pct-flipped-top-influence-")
    assert outcome.corrupted.ids("train") == outcome.clean.ids("train")
    clean_mean = compute_influence(outcome.clean, InfluenceSettings(checkpoints=False)).mean_influence
    flipped, true = outcome.corrupted.flipped(), outcome.corrupted.true_labels("train")
    assert flipped.sum() > 0
    for c in np.unique(true[flipped]):  # per class, every flipped image was more helpful than every kept one
        assert clean_mean[(true == c) & flipped].min() >= clean_mean[(true == c) & ~flipped].max()
    assert outcome.claim.mode == "top-influence" and outcome.result.run.path == outcome.corrupted.path
