"""Run directories never lose or mix data: atomic retrain, one writer at a time, no half-written results read."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from influence_core import InfluenceLensError, Run, TrainConfig, train
from influence_core.paths import RunPaths
from influence_core.review import ReviewStore
from influence_core.rundir import finished_runs, run_lock

CLI = [sys.executable, "-m", "influence_core.cli"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="demo", classes=["0", "1"], downsample=0.3, image_size=16, epochs=1, n_checkpoints=0)
SMALL_ARGS = [
    "--dataset",
    "demo",
    "--classes",
    "0",
    "1",
    "--downsample",
    "0.3",
    "--image-size",
    "16",
    "--checkpoints",
    "0",
]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(run_dir: Path) -> list[str]:
    """Hidden entries beside ``run_dir`` that belong to it, except its lock file."""
    return sorted(
        p.name
        for p in run_dir.parent.iterdir()
        if p.name.startswith(f".{run_dir.name}.") and p != RunPaths(run_dir).lock
    )


def kept_decisions(run: Run) -> int:
    """Decisions in the run's review store, shown (same training data) or hidden (made on other data)."""
    store = ReviewStore.for_run(run)
    return len(store.current()) + store.hidden_count()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished small run (seed 0) with a review decision and a cached influence entry; copy before changing."""
    from influence_core.pipeline import compute_influence

    run = train(TrainConfig(**SMALL), tmp_path_factory.mktemp("finished") / "run")
    ReviewStore.for_run(run).record(run.ids("train")[0], "mislabeled", "ann", corrected_label="1", idempotency_key="k1")
    compute_influence(run)
    return run.path


@pytest.fixture
def old_run(finished, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def start_cli(*args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start the CLI with ``args``; its stderr is collected into the returned list as it arrives."""
    proc = subprocess.Popen([*CLI, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT)
    chunks: list[str] = []

    def read():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            chunks.append(chunk.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    return proc, chunks


def wait_for(chunks: list[str], pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, "".join(chunks)):
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}:\n{''.join(chunks)[-2000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s"
        time.sleep(0.05)


# --- 1. atomic retrain -------------------------------------------------------------------------------------
@pytest.mark.slow  # trains or runs the CLI in subprocesses
def test_kill_9_during_a_retrain_keeps_the_old_run(old_run):
    before = snapshot(old_run)
    proc, err = start_cli("train", *SMALL_ARGS, "--run-dir", str(old_run), "--seed", "1", "--epochs", "300")
    try:
        wait_for(err, r"epoch 2/300", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(old_run) == before  # checkpoints, influence cache, train_key and reviews untouched
    run = Run(old_run)
    assert run.config["seed"] == 0 and run.load_model().fc.out_features == 2
    assert siblings(old_run), "the killed process left its staging folder (cleaned by the next call)"
    new = train(TrainConfig(**SMALL, seed=1), old_run)
    assert siblings(old_run) == []  # the dead process's staging folder is removed
    assert new.config["seed"] == 1
    assert kept_decisions(new) == 1  # carried over (hidden: made on the seed-0 run's training samples)


def interrupt(*_):
    raise KeyboardInterrupt


def disk_full(*_, **__):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["bad lr", "ctrl-c", "disk full"])
def test_a_failed_retrain_keeps_the_old_run(old_run, failure, monkeypatch):
    before = snapshot(old_run)
    config = TrainConfig(**SMALL, seed=1, lr=1e30 if failure == "bad lr" else 1e-3)
    if failure == "disk full":
        monkeypatch.setattr("influence_core.training.atomic_save_npz", disk_full)
    expected = {"bad lr": InfluenceLensError, "ctrl-c": KeyboardInterrupt, "disk full": OSError}[failure]
    with pytest.raises(expected):
        train(config, old_run, progress=interrupt if failure == "ctrl-c" else None)
    assert snapshot(old_run) == before and Run(old_run).config["seed"] == 0
    assert siblings(old_run) == []  # nothing half-built is left beside it


def test_retrain_carries_the_review_store_and_drops_the_old_influence_cache(old_run):
    assert any(p.name == "reviews.sqlite" for p in old_run.iterdir())
    run = train(TrainConfig(**SMALL, seed=1), old_run)
    assert run.config["seed"] == 1 and not RunPaths(old_run).influence.exists()
    assert kept_decisions(run) == 1
    assert siblings(old_run) == []


def test_training_into_the_current_folder_is_refused_before_anything_changes(old_run, monkeypatch):
    before = snapshot(old_run)
    monkeypatch.chdir(old_run)
    with pytest.raises(InfluenceLensError, match="current folder"):
        train(TrainConfig(**SMALL, seed=1), ".")
    assert snapshot(old_run) == before


def test_a_crash_in_the_middle_of_the_swap_is_repaired(old_run, tmp_path):
    paths = RunPaths(old_run)
    before = snapshot(old_run)
    os.replace(old_run, paths.previous)  # killed after moving the old run aside, before the new one arrived
    assert Run(old_run).config["seed"] == 0 and snapshot(old_run) == before and siblings(old_run) == []

    shutil.copytree(old_run, paths.previous)  # killed after installing the new run, before carrying over
    paths.reviews.unlink()
    Run(old_run)
    assert paths.reviews.is_file() and ReviewStore.for_run(Run(old_run)).current()["reviewer"].tolist() == ["ann"]
    assert siblings(old_run) == []


def test_run_listing_never_shows_a_run_being_built_or_swapped(old_run):
    paths = RunPaths(old_run)
    for hidden in (paths.staging(1), paths.previous):
        shutil.copytree(old_run, hidden)
    assert finished_runs(old_run.parent) == [old_run]


# --- 2. one writer per run directory --------------------------------------------------------------------------
@pytest.mark.slow  # trains or runs the CLI in subprocesses
def test_two_train_processes_into_one_directory_never_mix(tmp_path):
    run_dir = tmp_path / "run"
    procs = [
        start_cli("train", *SMALL_ARGS, "--run-dir", str(run_dir), "--seed", str(seed), "--epochs", "3")
        for seed in (0, 1)
    ]
    for proc, err in procs:
        assert proc.wait(timeout=600) == 0, "".join(err)[-2000:]
    run = Run(run_dir)
    paths = RunPaths(run_dir)
    assert run.config["train_key"] == paths.train_key.read_text().strip()
    stamp = paths.final_checkpoint.stat().st_mtime_ns
    train(TrainConfig.from_run(run), run_dir)  # the config on disk is the one that trained the checkpoint
    assert paths.final_checkpoint.stat().st_mtime_ns == stamp
    x, _ = run.tensors("test")
    with torch.no_grad():
        probs = run.load_model()(x[:]).softmax(1).numpy()
    np.testing.assert_allclose(probs, run.predictions["probs_test"], atol=1e-5)
    assert siblings(run_dir) == []


@pytest.mark.slow  # trains or runs the CLI in subprocesses
def test_second_writer_waits_with_a_message_or_fails_at_once(old_run):
    with run_lock(RunPaths(old_run)):
        refused = subprocess.run(
            [*CLI, "influence", "--run-dir", str(old_run), "--recompute", "--no-wait"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert refused.returncode == 2 and "Another process is writing" in refused.stderr
        assert "Fix:" in refused.stderr and "Traceback" not in refused.stderr
        proc, err = start_cli("influence", "--run-dir", str(old_run), "--recompute")
        wait_for(err, "waiting for another process that is writing", proc)
        time.sleep(1)
        assert proc.poll() is None  # still waiting while the lock is held
    assert proc.wait(timeout=300) == 0, "".join(err)


def test_influence_refuses_a_run_retrained_since_it_was_opened(old_run):
    from influence_core.pipeline import compute_influence

    stale = Run(old_run)
    train(TrainConfig(**SMALL, seed=1), old_run)
    with pytest.raises(InfluenceLensError, match="retrained by another process"):
        compute_influence(stale, recompute=True)
    assert not RunPaths(old_run).influence.exists()  # nothing computed from the old run's tables


@pytest.mark.slow  # trains or runs the CLI in subprocesses
@pytest.mark.parametrize("damage", ["config from another run", "final.pt deleted"])
def test_cache_check_compares_against_the_files_on_disk(old_run, tmp_path, damage):
    paths = RunPaths(old_run)
    if damage == "final.pt deleted":
        paths.final_checkpoint.unlink()
    else:
        other = train(TrainConfig(**SMALL, seed=1), tmp_path / "other")
        shutil.copy(other.paths.config, paths.config)
    run = train(TrainConfig(**SMALL), old_run)
    assert run.config["seed"] == 0 and paths.final_checkpoint.is_file()
    assert run.config["train_key"] == paths.train_key.read_text().strip()


# --- 3. leftover influence temp folders -------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftover_influence_temp_folders_are_never_read_and_removed_when_their_process_is_gone(old_run):
    from influence_core.pipeline import DEFAULT_SETTINGS, cache_key, cached_results, compute_influence, load_influence
    from influence_core.report import run_report

    run = Run(old_run)
    paths = RunPaths(old_run)
    key = cache_key(run, DEFAULT_SETTINGS)
    shutil.rmtree(paths.influence_entry(key).root)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        leftovers = [paths.influence_temp(key, pid) for pid in (dead_pid(), alive.pid)]
        for tmp in leftovers:
            tmp.mkdir(parents=True)
            (tmp / "meta.json").write_text(json.dumps({"settings": {}, "timings_s": {"total": 1}, "created": 0}))
        assert cached_results(run) == [] and load_influence(run) is None
        assert "influence" not in run_report(run)
        compute_influence(run)
        assert not leftovers[0].exists() and leftovers[1].exists()  # a live process's folder is left alone
    finally:
        alive.kill()
        alive.wait()
    assert [r.path.name for r in cached_results(run)] == [key]


# --- 4. run reader errors ---------------------------------------------------------------------------------------
def empty_config(p: RunPaths):
    p.config.write_text("")


def malformed_config(p: RunPaths):
    p.config.write_text('{"classes": ["0", "1"')


def malformed_samples(p: RunPaths):
    p.samples.write_bytes(b'\x00\x01garbage,\n"unterminated')


def samples_without_label(p: RunPaths):
    text = p.samples.read_text().splitlines()
    p.samples.write_text("\n".join(line.rsplit(",", 3)[0] for line in text) + "\n")


def deleted_rows(p: RunPaths):
    lines = p.samples.read_text().splitlines()
    p.samples.write_text("\n".join(lines[:1] + lines[4:]) + "\n")


def deleted_final(p: RunPaths):
    p.final_checkpoint.unlink()


READER_CASES = {
    "empty config.json": (empty_config, "config.json"),
    "malformed config.json": (malformed_config, "config.json"),
    "malformed samples.csv": (malformed_samples, "samples.csv"),
    "samples.csv without a column": (samples_without_label, "samples.csv"),
    "rows deleted from samples.csv": (deleted_rows, "no longer match"),
    "final.pt deleted": (deleted_final, "final.pt"),
}


@pytest.mark.parametrize("case", READER_CASES)
def test_a_damaged_run_is_a_clear_error(old_run, case):
    damage, message = READER_CASES[case]
    damage(RunPaths(old_run))
    with pytest.raises(InfluenceLensError, match=re.escape(message)) as caught:
        run = Run(old_run)
        run.dynamics, run.predictions, run.samples  # noqa: B018  (reading is what must fail)
    assert caught.value.fix


@pytest.mark.slow  # trains or runs the CLI in subprocesses
@pytest.mark.parametrize("case", ["malformed config.json", "rows deleted from samples.csv", "final.pt deleted"])
def test_cli_reports_a_damaged_run_in_one_line(old_run, case):
    READER_CASES[case][0](RunPaths(old_run))
    for command in ("report", "influence"):
        proc = subprocess.run(
            [*CLI, command, "--run-dir", str(old_run)], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Fix:" in proc.stderr and "Traceback" not in proc.stderr


# --- 5. one description of a run directory ----------------------------------------------------------------------
def test_run_file_names_are_spelled_only_in_paths_py():
    names = {
        "config.json",
        "samples.csv",
        "corruption.json",
        "history.json",
        "dynamics.npz",
        "predictions.npz",
        "metrics.json",
        "final.pt",
        "train_key",
        "meta.json",
        "influences.npy",
        "self_influence.npy",
        "checkpoint_self_influence.npy",
        "curvature.pt",
        "reviews.sqlite",
    }
    for module in ("training", "run", "pipeline", "report", "cli", "rundir"):
        text = (ROOT / "influence_core" / f"{module}.py").read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "```")))
        found = sorted(n for n in names if re.search(rf"[\"']{re.escape(n)}[\"']", code))
        assert found == [], f"{module}.py spells {found}; use influence_core.paths"
