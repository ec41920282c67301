"""The corruption experiment as a library function, run names, and the notebook's claim checked per run."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from influence_core import InfluenceLensError, TrainConfig, train
from influence_core.experiments import (
    notebook_claim,
    run_corruption_experiment,
    run_dir_name,
    run_title,
)
from influence_core.pipeline import DEFAULT_SETTINGS, InfluenceSettings, compute_influence


@pytest.mark.parametrize(
    "config, names, title",
    [
        (
            TrainConfig(
                dataset="tiny-imagenet:data/tiny-imagenet-200", classes=["n01443537", "n07749582"], corrupt_fraction=0.1
            ),
            ["goldfish, Carassius auratus", "lemon"],
            "tiny-imagenet goldfish+lemon 10% flipped",
        ),
        (
            TrainConfig(dataset="demo", corrupt_fraction=0.25, corrupt_mode="top-influence"),
            list("0123456789"),
            "digits 10 classes 25% flipped (top-influence)",
        ),
        (TrainConfig(dataset="folder:/data/My Pets", classes=["cat"]), None, "My Pets cat no flips"),
        (TrainConfig(dataset="fashion-mnist:"), None, "fashion-mnist all classes no flips"),
    ],
)
def test_runs_get_human_readable_names(config, names, title):
    assert run_title(config, names) == title
    name = run_dir_name(config, names)
    assert name.startswith(title.replace("%", "pct").replace(" (", "-").replace(")", "").replace(" ", "-") + "-")
    assert len(name.rsplit("-", 1)[1]) == 8 and "/" not in name


def test_different_settings_never_share_a_run_folder():
    a, b = TrainConfig(dataset="demo", corrupt_fraction=0.1), TrainConfig(dataset="demo", corrupt_fraction=0.1, seed=1)
    assert run_title(a) == run_title(b) and run_dir_name(a) != run_dir_name(b)
    assert run_dir_name(a) == run_dir_name(TrainConfig(dataset="demo", corrupt_fraction=0.1))


def test_the_claim_on_the_real_digits_demo(demo_run):
    """The verdict rests on the run's own numbers: its per-label table and the mean-influence signal's AUROC."""
    result = compute_influence(demo_run, DEFAULT_SETTINGS)
    claim = notebook_claim(result)
    mean, flipped, labels = result.mean_influence, demo_run.flipped(), demo_run.labels("train")
    held = [
        mean[(labels == c) & flipped].mean() < mean[(labels == c) & ~flipped].mean()
        for c in range(demo_run.n_classes)
        if ((labels == c) & flipped).any() and ((labels == c) & ~flipped).any()
    ]
    assert (claim.check.labels_held, claim.check.labels_tested) == (sum(held), len(held))
    assert claim.check.auroc == pytest.approx(roc_auc_score(flipped, -mean))
    assert claim.check.mode == "random" and "chosen at random" in claim.check.implication()
    assert claim.table["n_corrupted"].sum() == flipped.sum()
    print(claim.check.summary())  # the measured numbers, for the report (pytest -s)


FAST = InfluenceSettings(checkpoints=False)


@pytest.fixture(scope="module")
def clean_base(tmp_path_factory):
    """A tiny digits run without flipped labels (20 % of the data at 16 px, 2 epochs)."""
    return train(
        TrainConfig(dataset="demo", downsample=0.2, image_size=16, epochs=2, n_checkpoints=0),
        tmp_path_factory.mktemp("base") / "run",
    )


@pytest.mark.slow  # trains extra runs
def test_a_run_without_flips_has_no_claim_to_check(clean_base):
    with pytest.raises(InfluenceLensError, match="no flipped labels"):
        notebook_claim(compute_influence(clean_base, FAST))


def test_a_bad_experiment_is_refused_before_training(demo_run, tmp_path):
    with pytest.raises(InfluenceLensError, match="between 0 and 1"):
        run_corruption_experiment(demo_run, 0.0, "random", tmp_path)
    with pytest.raises(InfluenceLensError, match="Unknown corruption mode"):
        run_corruption_experiment(demo_run, 0.1, "worst", tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # trains extra runs
def test_the_top_influence_experiment_flips_what_the_clean_run_found_most_helpful(clean_base, tmp_path):
    """Clean run → influence → flip the most helpful per class → retrain → recompute → claim (digits, tiny)."""
    stages: set[str] = set()
    outcome = run_corruption_experiment(
        clean_base,
        0.1,
        "top-influence",
        tmp_path / "runs",
        FAST,
        progress=lambda stage, done, total: stages.add(stage.split(":")[0]),
    )
    assert "flipped run" in stages and stages <= {"clean run", "flipped run"}  # tagged stages only
    assert outcome.clean is not None and outcome.clean.path == clean_base.path  # a clean base is not trained again
    assert outcome.corrupted.path.name.startswith("digits-10-classes-10pct-flipped-top-influence-")
    assert outcome.corrupted.ids("train") == outcome.clean.ids("train")
    clean_mean = compute_influence(outcome.clean, FAST).mean_influence
    flipped, true = outcome.corrupted.flipped(), outcome.corrupted.true_labels("train")
    assert flipped.sum() > 0
    for c in np.unique(true[flipped]):  # per class, every flipped image was more helpful than every kept one
        assert clean_mean[(true == c) & flipped].min() >= clean_mean[(true == c) & ~flipped].max()
    assert outcome.claim.check.mode == "top-influence" and outcome.result.run.path == outcome.corrupted.path
