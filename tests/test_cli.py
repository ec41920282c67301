"""The CLI contract: train → influence → report --json, and clear errors instead of tracebacks."""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

CLI = [sys.executable, "-m", "influence_core.cli"]


def run_cli(*args, check=True):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_train_influence_report_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "--dataset",
        "demo",
        "--classes",
        "1",
        "7",
        "--run-dir",
        str(run_dir),
        "--epochs",
        "2",
        "--corrupt-fraction",
        "0.1",
        "--image-size",
        "16",
        "--downsample",
        "0.5",
    ]
    first = run_cli("train", *common)
    assert "from scratch" in first.stderr and "epoch 2/2" in first.stderr  # weights source and progress bars
    again = run_cli("train", *common)
    assert "cached" in again.stderr
    run_cli("influence", "--run-dir", str(run_dir))
    report = json.loads(run_cli("report", "--run-dir", str(run_dir), "--json").stdout)
    for key in (
        "classes",
        "n_train",
        "n_val",
        "n_test",
        "f1_test",
        "confusion_matrix",
        "n_corrupted",
        "weights",
        "timings_s",
        "detection",
    ):
        assert key in report, key
    assert report["classes"] == ["1", "7"] and report["weights"] == "scratch"
    assert report["n_corrupted"] == round(0.1 * report["n_train"])
    assert {"train", "influence_total"} <= set(report["timings_s"])
    best = report["detection"][report["influence"]["best_signal"]]
    assert set(best) == {"auroc", "recall_at_5pct", "recall_at_10pct", "recall_at_20pct"}


def cli_main(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``influence-core ARGS`` in-process: (exit code, stdout, stderr)."""
    from influence_core.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    """Exit code 2 and one ``error: … Fix: …`` line, the last on stderr (status lines may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and " Fix: " in lines[-1], err
    assert message in lines[-1] and "Traceback" not in err


TRAIN = [
    "train",
    "--dataset",
    "demo",
    "--classes",
    "1",
    "7",
    "--run-dir",
    "{tmp}/run",
    "--epochs",
    "1",
    "--downsample",
    "0.2",
    "--image-size",
    "16",
]  # tiny, so that a wrongly accepted case fails fast


def fill(args: list[str], tmp_path) -> list[str]:
    return [a.replace("{tmp}", str(tmp_path)) for a in args]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "tiny-imagenet:/no/such/folder", "--run-dir", "{tmp}/run"], "does not exist"),
        (["train", "--dataset", "demo", "--classes", "eleven", "1", "--run-dir", "{tmp}/run"], "Unknown class"),
        (["report", "--run-dir", "/no/such/run"], "not a finished run directory"),
        ([*TRAIN, "--device", "tpu"], "Unknown device"),
        ([*TRAIN, "--lr", "-1"], "learning rate must be a positive number"),
        ([*TRAIN, "--lr", "nan"], "learning rate must be a positive number"),
        ([*TRAIN, "--lr", "inf"], "learning rate must be a positive number"),
        ([*TRAIN, "--image-size", "-5"], "Image size -5 is too small"),
        ([*TRAIN, "--image-size", "0"], "Image size 0 is too small"),
        ([*TRAIN, "--corrupt-fraction", "-0.1"], "share of flipped labels must be in [0, 1)"),
        ([*TRAIN, "--corrupt-fraction", "1"], "share of flipped labels must be in [0, 1)"),
        ([*TRAIN, "--corrupt-fraction", "nan"], "share of flipped labels must be in [0, 1)"),
        ([*TRAIN, "--checkpoints", "-3"], "kept checkpoints must be ≥ 0"),
        ([*TRAIN, "--epochs", "0"], "epochs must be at least 1"),
        ([*TRAIN, "--batch-size", "1"], "batch_size must be at least 2"),
        ([*TRAIN, "--weight-decay", "nan"], "weight_decay must be a number"),
        ([*TRAIN, "--seed", "-1"], "seed must be ≥ 0"),
        ([*TRAIN, "--augment-shift", "0.5"], "augment_shift is a share of the image side in [0, 0.5)"),
        ([*TRAIN, "--augment-shift", "nan"], "augment_shift is a share of the image side in [0, 0.5)"),
        ([*TRAIN, "--downsample", "0"], "Downsampling ratio 0.0 must be in (0, 1]"),
        ([*TRAIN, "--downsample", "1.5"], "Downsampling ratio 1.5 must be in (0, 1]"),
        ([*TRAIN, "--split", "0.8", "0.1", "0.2"], "must be three positive numbers summing to 1"),
        ([*TRAIN, "--split", "0.9", "0.1", "0"], "must be three positive numbers summing to 1"),
        ([*TRAIN, "--split", "0.8", "0.1", "nan"], "must be three positive numbers summing to 1"),
        ([*TRAIN, "--weights", "{tmp}/missing.pth"], "missing.pth does not exist"),
        (["train", "--dataset", "demo", "--classes", "3", "--run-dir", "{tmp}/run"], "needs at least two classes"),
        (["train", "--dataset", "folder:{tmp}/one_class", "--run-dir", "{tmp}/run"], "single class (only)"),
        ([*TRAIN, "--corrupt-mode", "top-influence", "--corrupt-fraction", "0.1"], "needs influence scores"),
        ([*TRAIN, "--scores-from", "{tmp}/clean"], "only used by --corrupt-mode top-influence"),
        ([*TRAIN, "--corrupt-mode", "top-influence", "--scores-from", "{tmp}/none"], "not a finished run directory"),
        (["train", "--dataset", "demo", "--run-dir", "{tmp}/a_file"], "a_file is a file"),
        (["train", "--dataset", "demo", "--run-dir", "{tmp}/a_file/run"], "lies under the file"),
        (["influence", "--run-dir", "{tmp}/run", "--regularization", "inf"], "must be positive and finite"),
        (["influence", "--run-dir", "{tmp}/run", "--regularization", "nan"], "must be positive and finite"),
        (["influence", "--run-dir", "{tmp}/run", "--regularization", "0"], "must be positive and finite"),
        (["influence", "--run-dir", "{tmp}/run", "--damping", "-1"], "must be positive and finite"),
        (["influence", "--run-dir", "{tmp}/run", "--damping", "top:x"], "Cannot read damping 'top:x'"),
        (["influence", "--run-dir", "{tmp}/run", "--scope", ","], "Unknown scope"),
        (["second-pass", "--run-dir", "{tmp}/run", "--share", "0.6"], "must be in (0, 0.5]"),
        (["second-pass", "--run-dir", "{tmp}/run", "--share", "nan"], "must be in (0, 0.5]"),
        (["second-pass", "--run-dir", "{tmp}/none"], "not a finished run directory"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "one_class" / "only").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / "one_class" / "only" / f"{i}.png")
    code, _, err = cli_main(capsys, *fill(args, tmp_path))
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_full_or_read_only_disk_is_one_clear_line(tmp_path, capsys, monkeypatch, err_no):
    """Tests run as root (permissions never block), so the failing write is simulated at ``os.replace``."""

    def refuse(src, dst):
        raise OSError(err_no, os.strerror(err_no))

    monkeypatch.setattr("influence_core.storage.os.replace", refuse)
    code, _, err = cli_main(capsys, *fill(TRAIN, tmp_path))
    assert_one_line_error(code, err, f"cannot write {tmp_path}")  # the run is staged beside run/
    assert os.strerror(err_no) in err


def test_a_failing_folder_creation_is_one_clear_line(tmp_path, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    code, _, err = cli_main(capsys, *fill(TRAIN, tmp_path))
    assert_one_line_error(code, err, "Read-only file system")


@pytest.mark.parametrize("command", [[], ["train"], ["influence"], ["second-pass"], ["report"], ["classes"]])
def test_help_shows_no_markup(capsys, command):
    from influence_core.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage: influence-core" in out
    assert "``" not in out


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A clean digits run (1 vs 7, half the data, 16 px, 2 epochs) trained through the CLI, influence cached."""
    from influence_core.cli import main

    run_dir = tmp_path_factory.mktemp("cli") / "clean"
    assert (
        main(
            [
                "train",
                "--dataset",
                "demo",
                "--classes",
                "1",
                "7",
                "--run-dir",
                str(run_dir),
                "--epochs",
                "2",
                "--image-size",
                "16",
                "--downsample",
                "0.5",
                "--checkpoints",
                "1",
            ]
        )
        == 0
    )
    assert main(["influence", "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.slow
def test_top_influence_flips_the_clean_runs_most_influential_points(clean_run, tmp_path, capsys):
    from influence_core import Run
    from influence_core.pipeline import load_influence

    flip_dir = tmp_path / "flip"
    code, _, err = cli_main(
        capsys,
        "train",
        "--run-dir",
        str(flip_dir),
        "--corrupt-mode",
        "top-influence",
        "--corrupt-fraction",
        "0.2",
        "--scores-from",
        str(clean_run),
        "--epochs",
        "1",
        "--image-size",
        "16",
        "--checkpoints",
        "0",
    )
    assert code == 0, err
    clean, flipped = Run(clean_run), Run(flip_dir)
    assert flipped.corruption["mode"] == "top-influence" and flipped.ids("train") == clean.ids("train")
    mean = np.asarray(load_influence(clean).influences[:]).mean(0)  # from the matrix, not the stored mean
    labels = clean.labels("train")
    expected = set()
    for c in (0, 1):
        members = np.flatnonzero(labels == c)
        expected |= set(members[np.argsort(-mean[members])[: round(0.2 * len(members))]].tolist())
    assert set(np.flatnonzero(flipped.flipped()).tolist()) == expected
    code, _, err = cli_main(
        capsys,
        "train",
        "--run-dir",
        str(tmp_path / "x"),
        "--corrupt-mode",
        "top-influence",
        "--corrupt-fraction",
        "0.2",
        "--scores-from",
        str(flip_dir),
    )
    assert_one_line_error(code, err, "is not a clean run")
    code, _, err = cli_main(
        capsys,
        "train",
        "--run-dir",
        str(tmp_path / "x"),
        "--corrupt-mode",
        "top-influence",
        "--corrupt-fraction",
        "0.2",
        "--scores-from",
        str(clean_run),
        "--classes",
        "1",
        "3",
    )
    assert_one_line_error(code, err, "--classes ['1', '3'] differs from the clean run")


@pytest.mark.slow
def test_report_json_is_strict_json_when_metrics_are_not_finite(clean_run, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    shutil.copytree(clean_run, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["f1_test"], metrics["epoch_seconds"] = float("inf"), float("nan")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = cli_main(capsys, "report", "--run-dir", str(run_dir), "--json")
    assert code == 0, err

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(out, parse_constant=refuse)
    assert report["f1_test"] is None and report["epoch_seconds"] is None and report["influence_vs_epoch"] is None


@pytest.mark.slow
def test_method_options_reach_the_engine_and_the_cache_key(demo_run, tmp_path, capsys):
    """``--option KEY=VALUE`` sets a method option: the result is computed with it (meta.json's fingerprint), is
    cached apart from the defaults, and the app's accuracy note says it was measured at the defaults."""
    import shutil

    from influence_core import Run
    from influence_core.influence import Arnoldi
    from influence_core.pipeline import InfluenceSettings, cache_key, load_influence, parse_settings

    run = Run(shutil.copytree(demo_run.path, tmp_path / "demo"))
    code, _, err = cli_main(
        capsys, "influence", "--run-dir", str(run.path), "--method", "arnoldi", "--option", "rank=5"
    )
    assert code == 0, err
    five = parse_settings("arnoldi", ["rank=5"])
    assert five == InfluenceSettings(method=Arnoldi(rank=5))
    result = load_influence(run, five)
    assert result is not None and result.meta["method"]["rank"] == 5
    default = InfluenceSettings(method=Arnoldi())
    assert load_influence(run, default) is None and cache_key(run, default) != cache_key(run, five)
    assert cache_key(run, default) == cache_key(run, parse_settings("arnoldi", []))
    assert "rank=5" in five.describe() and "not with rank=5" in five.accuracy_note()


@pytest.mark.parametrize(
    "method, option, message",
    [
        ("arnoldi", "rank", "is not KEY=VALUE"),
        ("arnoldi", "depth=3", "Unknown option(s) for method 'arnoldi': depth"),
        # issue 29 item 5: each of these was a ValueError / TypeError / RuntimeError from inside the engine
        ("kfac", "rank=abc", "Method option rank='abc' of kfac is not an integer or none"),
        ("kfac", "rank=1.5", "Method option rank='1.5' of kfac is not an integer or none"),
        ("kfac", "seed=abc", "Method option seed='abc' of kfac is not an integer"),
        ("kfac", "seed=-1", "kfac option seed must be in [0, 2^63)"),
        ("cg", "tol=abc", "Method option tol='abc' of cg is not a number"),
        ("lissa", "depth=1.5", "Method option depth='1.5' of lissa is not an integer"),
        ("lissa", "scale=big", "Method option scale='big' of lissa is not a number or 'auto'"),
        ("cg", "preconditioner=x", "Method option preconditioner='x' of cg is not 'jacobi' or 'none'"),
    ],
)
def test_a_bad_method_option_is_one_clear_line(tmp_path, capsys, method, option, message):
    code, _, err = cli_main(capsys, "influence", "--run-dir", str(tmp_path), "--method", method, "--option", option)
    assert_one_line_error(code, err, message)
    assert "Fix: write e.g." in err or "Fix: use" in err
