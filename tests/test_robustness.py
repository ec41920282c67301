"""Damaged run folders, stale caches and inputs that once gave tracebacks: each is refused in one clear line or
repaired by computing again, never answered with a stale result (issue 29, items 6-15 and 17)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _synthetic_run import make_synthetic_run

from influence_core import InfluenceLensError, Run, TrainConfig, train
from influence_core.cli import main
from influence_core.paths import InfluencePaths, RunPaths
from influence_core.pipeline import DEFAULT_SETTINGS, cache_key, compute_influence, load_influence

SMALL = dict(dataset="demo", classes=["0", "1"], downsample=0.3, image_size=16, epochs=1, n_checkpoints=0)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``influence-core ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and " Fix: " in lines[-1], err
    assert "Traceback" not in err and all(w in lines[-1] for w in words), err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A small trained run (digits 0 and 1) with its default influence entry; tests copy it before damaging it."""
    run = train(TrainConfig(**SMALL), tmp_path_factory.mktemp("finished") / "run")
    compute_influence(run)
    return run.path


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def default_entry(run_dir: Path) -> InfluencePaths:
    return RunPaths(run_dir).influence_entry(cache_key(Run(run_dir), DEFAULT_SETTINGS))


def report_json(capsys, run_dir: Path) -> dict:
    code, out, err = cli(capsys, "report", "--run-dir", run_dir, "--json")
    assert code == 0, err
    return json.loads(out)


# --- 6. image sizes whose cache or batch cannot fit ----------------------------------------------------------
@pytest.mark.parametrize("size", ["100000", "2000"])
def test_an_image_size_that_cannot_fit_is_refused_with_the_memory_it_needs(tmp_path, capsys, size):
    # guards: --image-size 100000 raised OSError: Cannot allocate memory, 2000 an _ArrayMemoryError
    code, _, err = cli(capsys, "train", *("--dataset", "demo", "--run-dir", tmp_path / "run", "--image-size", size))
    assert_one_line_error(code, err, f"Training at {size} px", "needs at least", "are available")
    assert not (tmp_path / "run").exists()


def test_an_image_cache_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch):
    # guards: the cache was created as a memory map of any size (OSError: Cannot allocate memory)
    from influence_core import data

    monkeypatch.setenv("INFLUENCE_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InfluenceLensError, match=r"1,797 images at 16 px cannot be written: it needs 1\.4 MB of disk"):
        data.load_dataset("demo", image_size=16)
    assert not list((tmp_path / "cache").glob("*.npy"))


# --- 7. leave-group-out retraining never builds a one-image batch ---------------------------------------------
def test_one_image_batches_join_another_batch():
    from influence_core.training import _Batch, _merge_single_images

    def batch(*idx):
        return _Batch(np.array(idx, dtype=np.int64), torch.tensor([i % 2 == 0 for i in idx]), None)

    merged = _merge_single_images([batch(1), batch(2, 3), batch(), batch(4), batch(5, 6)])
    assert [b.idx.tolist() for b in merged] == [[], [1, 2, 3, 4], [], [], [5, 6]]
    assert merged[1].flip.tolist() == [False, True, False, True]  # each image keeps its own draw
    same = [batch(1, 2), batch(3, 4)]
    assert _merge_single_images(same) == same


def test_leave_group_out_with_batches_of_two_trains(finished):
    # guards: ValueError "Expected more than 1 value per channel when training" once suspects were left out
    from influence_core.training import fit_model

    run = Run(finished)
    x, y = run.tensors("train")
    x_val, y_val = run.tensors("val")
    config = TrainConfig(dataset="demo", epochs=1, batch_size=2, image_size=16, n_checkpoints=0)
    exclude = np.zeros(20, bool)
    exclude[::3] = True  # leaves batches of two with one image
    torch.manual_seed(0)
    from influence_core.model import build_resnet18

    model, _ = build_resnet18(run.n_classes, False)
    _, dynamics = fit_model(model, config, x[:20], y[:20], x_val[:4], y_val[:4], exclude=exclude)
    assert (dynamics["loss"][:, exclude] == 0).all() and (dynamics["loss"][:, ~exclude] > 0).all()


def test_second_pass_after_training_in_batches_of_two(tmp_path, capsys):
    # guards: the user's sequence `train --batch-size 2` then `second-pass` ended in a ValueError traceback
    args = ("--dataset", "demo", "--classes", "0", "1", "--downsample", "0.06", "--image-size", "16")
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", *args, "--epochs", "1", "--batch-size", "2", "--run-dir", run)
    assert code == 0, err
    code, _, err = cli(capsys, "second-pass", "--run-dir", run, "--share", "0.3")
    assert code == 0 and "second pass: left out" in err, err


# --- 9. config.json with fields of the wrong type ------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, words",
    [
        ("classes", 5, "classes must be a list of two or more class names, not 5"),
        ("image_size", "64", "image_size must be a whole number"),
        ("epochs", None, "epochs must be"),
        ("batch_size", "abc", "batch_size must be"),
    ],
)
def test_a_config_field_of_the_wrong_type_is_one_clear_line(run_dir, capsys, field, value, words):
    # guards: "classes": 5 gave a TypeError in report and influence
    path = RunPaths(run_dir).config
    path.write_text(json.dumps(json.loads(path.read_text()) | {field: value}))
    for command in ("report", "influence"):
        code, _, err = cli(capsys, command, "--run-dir", run_dir)
        assert_one_line_error(code, err, "config.json is malformed", words)


# --- 10. non-finite training dynamics ------------------------------------------------------------------------
def test_nan_losses_are_refused_not_ranked(run_dir, capsys):
    # guards: report raised sklearn's "Input contains NaN"; the review queue ranked by "Score nan"
    paths = RunPaths(run_dir)
    with np.load(paths.dynamics) as f:
        dynamics = {k: f[k] for k in f.files}
    dynamics["loss"][0, :3] = np.nan
    np.savez(paths.dynamics, **dynamics)
    code, _, err = cli(capsys, "report", "--run-dir", run_dir)
    assert_one_line_error(code, err, "dynamics.npz is damaged", "3 values that are not finite")


def test_non_finite_scores_are_never_ranked():
    from influence_core.analysis import rank_suspects

    with pytest.raises(InfluenceLensError, match="1 of 3 scores are not finite"):
        rank_suspects(np.array([0.5, np.nan, 0.1]))


# --- 11, 12. incomplete or damaged influence entries ---------------------------------------------------------
def truncate_a_shard(entry: InfluencePaths) -> None:
    shard = next(p for p in sorted(entry.influences.rglob("*")) if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


DAMAGES = {
    "mean_influence.npy deleted": lambda e: e.mean_influence.unlink(),
    "self_influence.npy truncated": lambda e: e.self_influence.write_bytes(e.self_influence.read_bytes()[:-8]),
    "a matrix shard truncated": truncate_a_shard,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_influence_entry_is_named_by_report_and_computed_again(run_dir, capsys, damage):
    # guards: a missing file gave FileNotFoundError in report; a truncated shard went unnoticed until the explorer
    entry = default_entry(run_dir)
    DAMAGES[damage](entry)
    assert load_influence(Run(run_dir)) is None
    report = report_json(capsys, run_dir)
    assert "influence" not in report and "detection" not in report
    assert report["ignored_influence"][entry.root.name].startswith("damaged: ")
    code, _, err = cli(capsys, "influence", "--run-dir", run_dir)
    assert code == 0 and "is damaged" in err, err
    result = load_influence(Run(run_dir))
    assert result is not None and result.row(0).shape == (len(result.run.labels("train")),)
    assert "influence" in report_json(capsys, run_dir)


def test_a_matrix_damaged_after_opening_is_a_clear_error(run_dir):
    result = load_influence(Run(run_dir))
    truncate_a_shard(result.files)
    with pytest.raises(InfluenceLensError, match="influence matrix is damaged") as caught:
        result.row(0)
    assert "--recompute" in caught.value.fix


# --- 13. damaged checkpoints -------------------------------------------------------------------------------
def test_a_truncated_final_checkpoint_is_one_clear_line(run_dir, capsys):
    # guards: report exited 0 without a word on a truncated final.pt
    final = RunPaths(run_dir).final_checkpoint
    final.write_bytes(final.read_bytes()[:1000])
    code, _, err = cli(capsys, "report", "--run-dir", run_dir)
    assert_one_line_error(code, err, "final.pt is damaged", "--retrain")


# --- 14. results of other labels are never shown -----------------------------------------------------------
def test_report_ignores_an_influence_entry_of_other_labels(run_dir, capsys):
    # guards: after a label was changed in samples.csv, report --json showed the old labels' entry and detection
    assert "influence" in report_json(capsys, run_dir)
    samples = pd.read_csv(RunPaths(run_dir).samples, dtype={"id": str})
    first = samples.index[samples["split"] == "train"][0]
    samples.loc[first, "label"] = 1 - samples.loc[first, "label"]
    samples.to_csv(RunPaths(run_dir).samples, index=False)
    report = report_json(capsys, run_dir)
    assert "influence" not in report and "detection" not in report
    assert list(report["ignored_influence"].values()) == [
        "computed on other labels, samples or checkpoints than the run holds now"
    ]
    _, _, err = cli(capsys, "report", "--run-dir", run_dir)
    assert "note: the cached influence result" in err


# --- 17. dataset paths: resolved when trained, re-pointed when moved -----------------------------------------
@pytest.fixture
def folder_data(tmp_path) -> Path:
    """An image folder of 2 classes × 30 small images (no run: only its data is used)."""
    make_synthetic_run(tmp_path / "unused-run", tmp_path / "data", n_classes=2, n_train=40, n_test=10)
    return tmp_path / "data"


FOLDER_RUN = dict(image_size=8, epochs=1, n_checkpoints=0, augment_flip=False)


def test_a_relative_dataset_path_is_stored_absolute_and_old_runs_hit_the_cache(folder_data, tmp_path, monkeypatch):
    # guards: "folder:../data" was stored as given, so the run could not be opened from another folder
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    relative = "folder:../data"
    run = train(TrainConfig(dataset=relative, **FOLDER_RUN), tmp_path / "run")
    assert run.config["dataset"] == f"folder:{folder_data}"
    monkeypatch.chdir(tmp_path)
    assert len(Run(tmp_path / "run").images("train")) == len(run.ids("train"))

    # a run trained before specs were resolved holds the key of the spec as typed: still a cache hit
    from influence_core.training import load_data, split_data, training_key

    config = TrainConfig(dataset=relative, **FOLDER_RUN)
    monkeypatch.chdir(tmp_path / "work")
    legacy = training_key(split_data(load_data(config), config), relative)
    paths = RunPaths(tmp_path / "run")
    paths.config.write_text(
        json.dumps(json.loads(paths.config.read_text()) | {"dataset": relative, "train_key": legacy})
    )
    paths.train_key.write_text(legacy)
    stamp = paths.final_checkpoint.stat().st_mtime_ns
    again = train(config, tmp_path / "run")
    assert paths.final_checkpoint.stat().st_mtime_ns == stamp  # not trained again
    assert again.config["dataset"] == f"folder:{folder_data}"


def test_a_run_whose_data_moved_is_repointed(tmp_path, capsys, monkeypatch):
    # guards: the only fix offered was "copy the data to the same path"
    run = make_synthetic_run(tmp_path / "run", tmp_path / "data", n_classes=3, n_train=30, n_test=9)
    key = cache_key(run, DEFAULT_SETTINGS)
    (tmp_path / "moved").mkdir()
    (tmp_path / "data").rename(tmp_path / "moved" / "data")
    with pytest.raises(InfluenceLensError, match="cannot be opened here") as caught:
        Run(tmp_path / "run").images("train")
    assert "influence-core repoint --run-dir RUN --dataset SPEC" in caught.value.fix

    # a folder without the run's images is refused, and nothing changes
    shutil.copytree(tmp_path / "moved" / "data", tmp_path / "partial")
    next((tmp_path / "partial" / "class-001").iterdir()).unlink()
    code, _, err = cli(capsys, "repoint", "--run-dir", tmp_path / "run", "--dataset", f"folder:{tmp_path}/partial")
    assert_one_line_error(code, err, "lacks 1 of the run's")
    assert Run(tmp_path / "run").config["dataset"] == f"folder:{tmp_path / 'data'}"

    monkeypatch.chdir(tmp_path)  # a relative spec is stored resolved
    code, _, err = cli(capsys, "repoint", "--run-dir", tmp_path / "run", "--dataset", "folder:moved/../moved/data")
    assert code == 0, err
    repointed = Run(tmp_path / "run")
    assert repointed.config["dataset"] == f"folder:{tmp_path / 'moved' / 'data'}"
    assert len(repointed.images("train")) == 30
    assert cache_key(repointed, DEFAULT_SETTINGS) == key  # the influence cache still fits
