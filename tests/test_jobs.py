"""The background job registry: shared jobs per key, progress, results and errors without a web page."""

from __future__ import annotations

import sqlite3
import threading

from influence_core import InfluenceLensError
from influence_core.jobs import JobRegistry, user_error


def gated_work(gate: threading.Event, calls: list[int], result: str = "trained"):
    """Work that reports progress 1/3, then waits for ``gate``, then returns ``result``; ``calls`` counts runs."""

    def work(progress):
        calls.append(1)
        progress("epoch", 1, 3)
        assert gate.wait(30)
        progress("epoch", 3, 3)
        return result

    return work


def test_two_callers_share_one_running_job_and_see_its_progress():
    registry, gate, calls = JobRegistry(), threading.Event(), []
    first = registry.submit("train:runs/a", gated_work(gate, calls), "training a")
    second = registry.submit("train:runs/a", gated_work(gate, calls), "training a again")
    assert second is first
    for _ in range(300):  # the thread reports its first step
        if first.done == 1:
            break
        first.wait(0.01)
    assert (first.status, first.stage, first.done, first.total) == ("running", "epoch", 1, 3)
    assert first.describe_progress() == "epoch — 1 of 3" and abs(first.fraction - 1 / 3) < 1e-9
    assert registry.running() == [first]
    gate.set()
    assert first.wait(30)
    assert (first.status, first.result, first.error, calls) == ("done", "trained", None, [1])
    assert registry.running() == []
    assert registry.submit("train:runs/a", gated_work(gate, calls), "x") is first  # finished: not rerun
    registry.forget("train:runs/a")
    assert registry.get("train:runs/a") is None


def test_other_keys_run_separately():
    registry, gate, calls = JobRegistry(), threading.Event(), []
    a = registry.submit("train:runs/a", gated_work(gate, calls, "a"), "a")
    b = registry.submit("train:runs/b", gated_work(gate, calls, "b"), "b")
    gate.set()
    assert a.wait(30) and b.wait(30)
    assert (a.result, b.result, len(calls)) == ("a", "b", 2)


def test_a_running_job_is_not_forgotten():
    registry, gate = JobRegistry(), threading.Event()
    job = registry.submit("k", gated_work(gate, []), "k")
    registry.forget("k")
    assert registry.get("k") is job
    gate.set()
    assert job.wait(30)


def test_failures_become_clear_errors_and_a_new_submit_retries():
    registry = JobRegistry()

    def disk_full(progress):
        raise OSError(28, "No space left on device", "/srv/secret/runs/x/influence")

    failed = registry.submit("k", disk_full, "influence of x")
    assert failed.wait(30)
    assert failed.status == "failed" and isinstance(failed.error, InfluenceLensError)
    assert "No space left on device" in failed.error.problem and failed.error.fix
    assert "/srv/secret" not in str(failed.error)
    retried = registry.submit("k", lambda progress: 42, "influence of x")
    assert retried is not failed and retried.wait(30) and retried.result == 42


def test_user_error_keeps_project_errors_and_hides_paths():
    own = InfluenceLensError("bad", "fix it")
    assert user_error(own) is own
    db = user_error(sqlite3.OperationalError("unable to open database file /srv/secret/reviews.sqlite"))
    assert "review store" in db.problem and "/srv/secret" not in str(db)
    other = user_error(ValueError("/srv/secret"))
    assert "/srv/secret" not in str(other) and "server log" in other.fix


def test_one_slot_runs_jobs_one_at_a_time_in_order_and_says_what_they_wait_for():
    registry, calls = JobRegistry(slots=1), []
    gates = {k: threading.Event() for k in "abc"}
    jobs = {k: registry.submit(k, gated_work(gates[k], calls, k), f"training {k}") for k in "abc"}
    for _ in range(300):
        if jobs["a"].stage == "epoch" and all(jobs[k].stage.startswith("waiting") for k in "bc"):
            break
        threading.Event().wait(0.01)
    assert len(calls) == 1 and jobs["a"].describe_progress() == "epoch — 1 of 3"
    assert jobs["b"].describe_progress() == jobs["c"].describe_progress() == "waiting for: training a"
    assert [j.status for j in jobs.values()] == ["running"] * 3
    gates["c"].set()  # c may finish its work once it runs, but it waits for b, which waits for a
    gates["a"].set()
    assert jobs["a"].wait(30)
    for _ in range(300):
        if jobs["c"].stage == "waiting for: training b":
            break
        threading.Event().wait(0.01)
    assert jobs["c"].stage == "waiting for: training b" and not jobs["c"].wait(0.2)
    gates["b"].set()
    assert jobs["b"].wait(30) and jobs["c"].wait(30)
    assert [j.result for j in jobs.values()] == ["a", "b", "c"] and len(calls) == 3


def test_a_failed_job_frees_its_slot():
    registry = JobRegistry(slots=1)

    def fails(progress):
        raise InfluenceLensError("bad input", "fix it")

    failed = registry.submit("x", fails, "x")
    after = registry.submit("y", lambda progress: 7, "y")
    assert failed.wait(30) and after.wait(30)
    assert (failed.status, after.result) == ("failed", 7)
