"""Writing a run directory safely: one writer at a time, a new training built beside the old one and swapped in.

``train`` and ``influence`` hold an exclusive lock on ``.<name>.lock`` beside the run directory (``fcntl.flock``,
released when the process ends, however it ends). A second caller waits and says so ("waiting for another
process that is writing RUN_DIR…"), or with ``wait=False`` (the CLI's ``--no-wait``) fails at once.

A training is built in ``.<name>.new-<pid>`` and swapped in when complete:

1. rename ``<name>`` → ``.<name>.old``;
2. rename ``.<name>.new-<pid>`` → ``<name>``;
3. move what is not a training output from ``.<name>.old`` into ``<name>`` (the review store, files of the user);
4. delete ``.<name>.old``.

Until step 1 the old run is untouched, so a ``kill -9``, Ctrl-C, bad setting or full disk during training leaves
it as it was. A crash between the steps is repaired by :func:`recover` on the next call: ``.<name>.old`` without
``<name>`` is renamed back (the old run returns), ``.<name>.old`` beside ``<name>`` gets steps 3 and 4. Staging
folders of processes that are gone are deleted then too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InfluenceLensError
from .paths import RunPaths

log = logging.getLogger(__name__)


@contextmanager
def run_lock(paths: RunPaths, wait: bool = True) -> Iterator[None]:
    """Hold the run directory's exclusive lock; wait for another writer (with a message) or, if not ``wait``,
    raise :class:`InfluenceLensError` at once."""
    try:
        paths.lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise InfluenceLensError(
            f"Cannot create the lock file beside {paths.root}: {e.strerror}.",
            "choose a run directory in a folder you can write to",
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise InfluenceLensError(
                    f"Another process is writing {paths.root}.",
                    "wait until it has finished, or leave out --no-wait to wait for it",
                ) from None
            log.info("waiting for another process that is writing %s…", paths.root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def try_recover(paths: RunPaths) -> None:
    """Repair an interrupted swap if one is visible and no other process is writing (readers call this)."""
    if not paths.previous.exists():
        return
    try:
        with run_lock(paths, wait=False):
            recover(paths)
    except InfluenceLensError:
        log.debug("%s is being written by another process; not repairing it now", paths.root)


def recover(paths: RunPaths) -> None:
    """Finish or undo a swap interrupted by a crash, and delete staging folders of dead processes.
    Call with the lock held."""
    if paths.previous.exists():
        if paths.root.exists():
            _finish_swap(paths)
        else:
            os.replace(paths.previous, paths.root)
            log.warning("restored the previous run of %s (a retrain was interrupted while swapping)", paths.root)
    remove_orphans(paths.previous.parent, paths.staging_prefix)


@contextmanager
def staged_run(paths: RunPaths) -> Iterator[RunPaths]:
    """Yield a fresh staging folder beside ``paths.root``; swap it in when the block completes, delete it when
    the block raises (including ``KeyboardInterrupt``). Call with the lock held."""
    if paths.root.exists() and not paths.root.is_dir():
        raise InfluenceLensError(f"The run directory {paths.root} is a file.", "choose a folder for --run-dir")
    root, cwd = os.path.abspath(paths.root), os.getcwd()
    if os.path.commonpath([root, cwd]) == root:
        raise InfluenceLensError(
            f"The run directory {paths.root} holds the current folder, which the new run replaces.",
            "run the command from another folder (e.g. cd ..)",
        )
    stage = paths.staging(os.getpid())
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield RunPaths(stage)
        _swap_in(stage, paths)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone after the swap; what a failed training or swap left


def _swap_in(stage: Path, paths: RunPaths) -> None:
    """Steps 1-4 (a failure between them is repaired by :func:`recover`)."""
    if paths.root.exists():
        os.replace(paths.root, paths.previous)
        os.replace(stage, paths.root)
        _finish_swap(paths)
    else:
        os.replace(stage, paths.root)


def _finish_swap(paths: RunPaths) -> None:
    """Steps 3 and 4: carry over what the old run holds besides training outputs, then delete it."""
    old = RunPaths(paths.previous)
    outputs = {p.name for p in old.training_outputs()}
    for entry in sorted(old.root.iterdir()):
        if entry.name in outputs:
            continue
        target = paths.root / entry.name
        if target.exists():  # written into the new run during the swap: keep both
            target = paths.root / f"{entry.name}.previous-{os.getpid()}"
            log.warning("%s already exists in the new run; the old one is kept as %s", entry.name, target.name)
        os.replace(entry, target)
    shutil.rmtree(old.root)


def finished_runs(root: Path) -> list[Path]:
    """Finished run directories directly under ``root``, newest training first. Hidden folders (a training being
    built, a run waiting in a swap) never count."""
    if not root.is_dir():
        return []
    found = [RunPaths(p) for p in root.iterdir() if not p.name.startswith(".") and RunPaths(p).train_key.is_file()]
    return [p.root for p in sorted(found, key=lambda p: p.train_key.stat().st_mtime, reverse=True)]


def remove_orphans(folder: Path, prefix: str) -> None:
    """Delete ``folder/<prefix>…-<pid>`` entries whose process ``pid`` is gone (left by a killed process)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        pid = owner_pid(entry.name, prefix)
        if pid is not None and not process_alive(pid):
            log.info("removing %s, left by process %d which is gone", entry, pid)
            shutil.rmtree(entry, ignore_errors=True)


def owner_pid(name: str, prefix: str) -> int | None:
    """The ``pid`` of a name ``<prefix>…-<pid>``, or None for other names."""
    if not name.startswith(prefix):
        return None
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
