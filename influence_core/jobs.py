"""Long work (training, influence computations) in background threads owned by the server process.

A web page can be left at any moment; work started from it must not stop with it. A :class:`JobRegistry`
runs each piece of work in a daemon thread under a key naming what it produces (e.g. ``train:<run>``), so the
page that started it, another page or another browser session asking for the same key all see the same
:class:`Job`: its progress ``(stage, done, total)``, its status, and in the end its result or its error.
The registry knows nothing about the web app; the app keeps one per server process, with one compute slot: a
second job waits (its stage says for what) instead of competing for the same cores, so the first result comes
in about half the time and the last about as before (measured by ``benchmarks/job_slots.py``, README).

Errors a user can act on come back as :class:`InfluenceLensError`; file-system and SQLite failures are
turned into one by :func:`user_error`, naming neither the server's folders nor a traceback.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .display import stage_words
from .errors import InfluenceLensError
from .progress import Progress

log = logging.getLogger(__name__)

Status = Literal["running", "done", "failed"]


def user_error(e: BaseException) -> InfluenceLensError:
    """``e`` as the error shown to a user: an :class:`InfluenceLensError` as is; an ``OSError`` or SQLite
    error as a one-line problem without file names (the server log keeps the full exception)."""
    if isinstance(e, InfluenceLensError):
        return e
    if isinstance(e, OSError):
        reason = e.strerror or type(e).__name__
        return InfluenceLensError(
            f"The run's files could not be read or written ({reason}).",
            "check that the runs folder is on a writable disk with free space and belongs to "
            "the app's user, or open a run stored elsewhere",
        )
    if isinstance(e, sqlite3.Error):
        return InfluenceLensError(
            f"The run's review store could not be used ({type(e).__name__}).",
            "check that the run folder and its reviews.sqlite are writable by the app's user",
        )
    return InfluenceLensError(f"Unexpected failure: {type(e).__name__}.", "see the server log for details")


@dataclass
class Job:
    """One piece of work in its thread. ``stage``/``done``/``total`` are the latest progress report
    (``done`` of ``total`` steps of ``stage``); ``result`` is set when ``status`` is ``"done"``, ``error``
    when it is ``"failed"``. ``started``/``finished``: ``time.time()`` seconds."""

    key: str
    description: str
    status: Status = "running"
    stage: str = "starting"
    done: int = 0
    total: int = 0
    result: Any = None
    error: InfluenceLensError | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    _finished_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fraction(self) -> float:
        """Share of the current stage done, in [0, 1]."""
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    def describe_progress(self) -> str:
        """One line in words: ``stage — done of total`` (or only the stage before its first count)."""
        stage = stage_words(self.stage)
        return f"{stage} — {self.done:,} of {self.total:,}" if self.total else stage

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (done or failed) or ``timeout`` seconds passed; True if finished."""
        return self._finished_event.wait(timeout)

    def _report(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done, self.total = stage, done, total

    def _run(self, work: Callable[[Progress], Any], slots: _Slots | None) -> None:
        try:
            if slots is not None:
                slots.acquire(self)
            try:
                self.result = work(self._report)
            finally:
                if slots is not None:
                    slots.release(self)
            self.status = "done"
        except BaseException as e:  # noqa: BLE001 - the thread must record every failure, never die silently
            log.exception("job %s failed", self.key)
            self.error = user_error(e)
            self.status = "failed"
        finally:
            self.finished = time.time()
            self._finished_event.set()


class _Slots:
    """At most ``n`` jobs working at once, first come first served; a waiting job's stage names what it waits for."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._changed = threading.Condition()
        self._waiting: list[Job] = []
        self._working: list[Job] = []

    def enqueue(self, job: Job) -> None:
        """Take ``job``'s place in the queue (when it is submitted, so the order is the order of submission)."""
        with self._changed:
            self._waiting.append(job)

    def acquire(self, job: Job) -> None:
        """Block until ``job`` is first in the queue and a slot is free (``job`` was enqueued)."""
        with self._changed:
            while len(self._working) >= self._n or self._waiting[0] is not job:
                ahead = (self._working or self._waiting)[0].description
                job._report(f"waiting for: {ahead}", 0, 0)
                self._changed.wait()
            self._waiting.pop(0)
            self._working.append(job)
        job._report("starting", 0, 0)

    def release(self, job: Job) -> None:
        with self._changed:
            self._working.remove(job)
            self._changed.notify_all()


class JobRegistry:
    """Jobs of one server process by key: at most one running job per key, shared by every caller. ``slots``:
    how many jobs compute at once (None: no limit); the others wait in their threads, status ``"running"``."""

    def __init__(self, slots: int | None = None) -> None:
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be at least 1 or None, not {slots}")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._slots = _Slots(slots) if slots is not None else None

    def submit(self, key: str, work: Callable[[Progress], Any], description: str) -> Job:
        """The job under ``key``: the running or finished one if there is one, else ``work(progress)`` started
        in a new thread. A failed job is replaced by a fresh try."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.status != "failed":
                return job
            job = self._jobs[key] = Job(key, description)
            if self._slots is not None:
                self._slots.enqueue(job)
        threading.Thread(target=job._run, args=(work, self._slots), name=f"job {key}", daemon=True).start()
        log.info("job %s started: %s", key, description)
        return job

    def get(self, key: str) -> Job | None:
        """The job under ``key`` (running or finished), or None."""
        with self._lock:
            return self._jobs.get(key)

    def forget(self, key: str) -> None:
        """Drop a finished job (its result is no longer needed); a running one stays."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.status != "running":
                del self._jobs[key]

    def running(self) -> list[Job]:
        """Jobs still running, oldest first."""
        with self._lock:
            return sorted((j for j in self._jobs.values() if j.status == "running"), key=lambda j: j.started)
