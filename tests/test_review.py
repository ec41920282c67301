"""The review store: decisions, undo, progress, exports, reopening, concurrent reviewers, data keys,
idempotent retries (with a killed writer), validation and SQLite failures as clear errors."""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

from influence_core.errors import InfluenceLensError
from influence_core.review import PAUSE_AFTER_COMMIT_ENV, ReviewedData, ReviewStore, focus_after

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
DATA = ReviewedData(("a", "b", "x", "y", "z", "w"), ("cat", "cat", "dog", "cat", "fox", "dog"), CLASSES)
TINY = ReviewedData(("n01443537/images/1.JPEG",), ("goldfish",), ("goldfish", "lemon"))


def key() -> str:
    return uuid.uuid4().hex


def shared(n: int) -> ReviewedData:
    """``n`` samples for each of the reviewers ann and bob."""
    ids = tuple(f"{name}-{i}" for name in ("ann", "bob") for i in range(n))
    return ReviewedData(ids, ("cat",) * len(ids), CLASSES)


def test_latest_decision_wins_and_undo_keeps_history(tmp_path):
    store = ReviewStore(tmp_path, DATA)
    store.record("a", "keep", "ann", idempotency_key=key())
    store.record("a", "mislabeled", "bob", corrected_label="dog", idempotency_key=key())
    store.record("b", "skip", "ann", idempotency_key=key())
    current = store.current().set_index("sample_id")
    assert current.loc["a", "decision"] == "mislabeled" and current.loc["a", "corrected_label"] == "dog"

    undone = store.undo("bob", idempotency_key=key())
    assert undone.sample_id == "a" and undone.decision == "mislabeled"
    assert store.current().set_index("sample_id").loc["a", "decision"] == "keep"  # ann's decision is back
    assert store.undo("bob", idempotency_key=key()) is None  # bob has nothing left to undo
    assert store.undo("ann", idempotency_key=key()).sample_id == "b"  # ann's latest action
    history = store.history()
    assert len(history) == 3 and history["undone_at"].notna().sum() == 2


def test_progress_and_exports(tmp_path):
    store = ReviewStore(tmp_path, DATA)
    store.record("x", "mislabeled", "ann", corrected_label="cat", idempotency_key=key())
    store.record("y", "keep", "ann", idempotency_key=key())
    store.record("z", "skip", "ann", idempotency_key=key())
    store.record("w", "exclude", "ann", idempotency_key=key())  # no corrected label needed
    assert store.progress(["x", "y", "z", "w", "a"]) == {
        "reviewed": 3,  # an excluded image is reviewed; a skipped one is not
        "skipped": 1,
        "mislabeled": 1,
        "excluded": 1,
        "total": 5,
    }

    corrections = pd.read_csv(io.StringIO(store.corrections_csv()))  # mislabeled only: exclude is not a label
    assert corrections.to_dict("records") == [{"id": "x", "given_label": "dog", "corrected_label": "cat"}]
    decisions = pd.read_csv(io.StringIO(store.decisions_csv()))
    assert list(decisions.columns) == ["id", "decision", "corrected_label", "reviewer", "created_at"]
    assert decisions["id"].tolist() == ["x", "y", "z", "w"]
    assert decisions.set_index("id").loc["w", "decision"] == "exclude"
    assert pd.isna(decisions.set_index("id").loc["w", "corrected_label"])


def test_decisions_survive_reopen_and_are_keyed_by_id(tmp_path):
    digits = ReviewedData(("digits:5", "digits:12"), ("5", "8"), tuple(map(str, range(10))))
    ReviewStore(tmp_path, digits).record("digits:12", "mislabeled", "ann", corrected_label="3", idempotency_key=key())
    reopened = ReviewStore(tmp_path, digits)
    found = reopened.decisions_for(["digits:5", "digits:12"])  # any ranking order: lookup is by id
    assert list(found) == ["digits:12"] and found["digits:12"].corrected_label == "3"
    with sqlite3.connect(reopened.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- reviews belong to the data they were made on -------------------------------------------------------------


def test_reviews_of_other_data_are_hidden_counted_and_kept(tmp_path):
    """A run folder reused for other data (digits → tiny-imagenet, or relabelled) never shows the old decisions."""
    digits = ReviewedData(("digits:1", "digits:2"), ("1", "2"), tuple(map(str, range(10))))
    old = ReviewStore(tmp_path, digits)
    old.record("digits:1", "mislabeled", "ann", corrected_label="7", idempotency_key=key())
    old.record("digits:2", "keep", "ann", idempotency_key=key())

    new = ReviewStore(tmp_path, TINY)
    assert new.current().empty and new.history().empty and new.decisions_for(digits.sample_ids) == {}
    assert new.hidden_count() == 2
    assert new.undo("ann", idempotency_key=key()) is None  # ann's digits decisions are not hers to undo here
    new.record(TINY.sample_ids[0], "keep", "ann", idempotency_key=key())

    relabelled = ReviewedData(digits.sample_ids, ("1", "3"), digits.classes)  # same images, other given labels
    assert ReviewStore(tmp_path, relabelled).current().empty
    assert ReviewStore(tmp_path, relabelled).hidden_count() == 3
    back = ReviewStore(tmp_path, digits)  # the original data again: everything is still there
    assert back.current()["sample_id"].tolist() == ["digits:1", "digits:2"] and back.hidden_count() == 1


OLD_SCHEMA = """
CREATE TABLE actions (id INTEGER PRIMARY KEY AUTOINCREMENT, sample_id TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('mislabeled', 'keep', 'skip')), corrected_label TEXT,
    reviewer TEXT NOT NULL, created_at TEXT NOT NULL, undone_at TEXT);
INSERT INTO actions (sample_id, decision, corrected_label, reviewer, created_at, undone_at) VALUES
    ('a', 'keep', NULL, 'ann', '2026-01-01', NULL),
    ('b', 'mislabeled', 'dog', 'ann', '2026-01-02', NULL),
    ('b', 'skip', NULL, 'ann', '2026-01-03', '2026-01-04');
"""


def test_a_file_from_before_data_keys_is_migrated_without_losing_rows(tmp_path):
    with closing_connection(tmp_path / "reviews.sqlite") as con:
        con.executescript(OLD_SCHEMA)
    store = ReviewStore(tmp_path, DATA)
    assert store.current().empty and store.hidden_count() == 2  # a and b's latest decision that is not undone
    store.record("a", "skip", "bob", idempotency_key=key())
    store.record("b", "exclude", "bob", idempotency_key=key())
    with closing_connection(store.path) as con:
        rows = con.execute("SELECT sample_id, decision, data_key FROM actions ORDER BY id").fetchall()
    assert rows[:3] == [("a", "keep", None), ("b", "mislabeled", None), ("b", "skip", None)]
    assert rows[3:] == [("a", "skip", DATA.key), ("b", "exclude", DATA.key)]


PREVIOUS_RELEASE = """
CREATE TABLE actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('mislabeled', 'keep', 'skip')),
    corrected_label TEXT,
    reviewer TEXT NOT NULL,
    created_at TEXT NOT NULL,
    undone_at TEXT
);
ALTER TABLE actions ADD COLUMN data_key TEXT;
ALTER TABLE actions ADD COLUMN idempotency_key TEXT;
ALTER TABLE actions ADD COLUMN undo_key TEXT;
CREATE INDEX actions_data_sample ON actions (data_key, sample_id, id);
CREATE INDEX actions_data_reviewer ON actions (data_key, reviewer, id);
CREATE UNIQUE INDEX actions_idempotency ON actions (idempotency_key);
CREATE UNIQUE INDEX actions_undo ON actions (undo_key);
"""


def test_a_store_from_before_exclude_is_migrated_keeping_every_row_id_and_key(tmp_path):
    """Guards the table rebuild: the previous release's CHECK rejects 'exclude' (IntegrityError without it)."""
    path = tmp_path / "reviews.sqlite"
    with closing_connection(path) as con:
        con.executescript(PREVIOUS_RELEASE)
        con.executemany(
            "INSERT INTO actions (id, sample_id, decision, corrected_label, reviewer, created_at, undone_at, "
            "data_key, idempotency_key, undo_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (1, "a", "keep", None, "ann", "t1", None, DATA.key, "click-1", None),
                (2, "b", "mislabeled", "dog", "ann", "t2", None, DATA.key, "click-2", None),
                (3, "x", "skip", None, "bob", "t3", "t4", DATA.key, "click-3", "undo-1"),
                (7, "y", "keep", None, "bob", "t5", None, "other-data", "click-7", None),  # ids need not be dense
            ],
        )
        con.commit()
        before = con.execute("SELECT * FROM actions ORDER BY id").fetchall()

    store = ReviewStore(tmp_path, DATA)
    excluded = store.record("z", "exclude", "ann", idempotency_key="click-8")
    assert excluded.id == 8  # the AUTOINCREMENT counter carried over: no id is reused
    with closing_connection(path) as con:
        after = con.execute("SELECT * FROM actions ORDER BY id").fetchall()
        (sql,) = con.execute("SELECT sql FROM sqlite_master WHERE name = 'actions'").fetchone()
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert after[:4] == before and len(after) == 5  # every row, with its id, data key and idempotency keys
    assert "'exclude'" in sql and "actions_rebuilt" not in tables
    assert {"actions_idempotency", "actions_undo", "actions_data_sample", "actions_data_reviewer"} <= indexes
    # the keys still work after the migration
    assert store.record("b", "mislabeled", "ann", corrected_label="dog", idempotency_key="click-2").id == 2
    assert store.undo("bob", idempotency_key="undo-1").id == 3  # a retried undo returns what it undid
    assert store.current()["decision"].tolist() == ["keep", "mislabeled", "exclude"] and store.hidden_count() == 1
    assert ReviewStore(tmp_path, DATA).current().equals(store.current())  # reopening migrates nothing again


def test_an_old_store_that_cannot_be_migrated_keeps_every_row(tmp_path, monkeypatch):
    """The rebuild is one transaction: a failure halfway leaves the old table as it was."""
    from influence_core import review

    path = tmp_path / "reviews.sqlite"
    with closing_connection(path) as con:
        con.executescript(OLD_SCHEMA)
    monkeypatch.setattr(review, "_ALL_COLUMNS", review._ALL_COLUMNS + ", no_such_column")  # the copy fails
    with pytest.raises(InfluenceLensError):
        ReviewStore(tmp_path, DATA)
    with closing_connection(path) as con:
        assert con.execute("SELECT COUNT(*) FROM actions").fetchone()[0] == 3
        assert "'exclude'" not in con.execute("SELECT sql FROM sqlite_master WHERE name = 'actions'").fetchone()[0]
    monkeypatch.undo()
    assert len(ReviewStore(tmp_path, DATA).history()) == 0 and ReviewStore(tmp_path, DATA).hidden_count() == 2


def closing_connection(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


# --- idempotent decisions -------------------------------------------------------------------------------------


def test_a_retried_decision_is_stored_once_and_undo_removes_it(tmp_path):
    store = ReviewStore(tmp_path, DATA)
    first = store.record("a", "mislabeled", "ann", corrected_label="fox", idempotency_key="click-1")
    again = store.record("a", "mislabeled", "ann", corrected_label="fox", idempotency_key="click-1")
    assert again == first and len(store.history()) == 1
    with pytest.raises(InfluenceLensError, match="already used for another decision"):
        store.record("a", "keep", "ann", idempotency_key="click-1")

    undo_key = key()
    assert store.undo("ann", idempotency_key=undo_key) == first
    store.record("b", "keep", "ann", idempotency_key=key())
    assert store.undo("ann", idempotency_key=undo_key) == first  # a retried undo does not undo b
    assert store.current()["sample_id"].tolist() == ["b"]


WRITER = """
import sys
from influence_core.review import ReviewedData, ReviewStore
store = ReviewStore(sys.argv[1], ReviewedData({ids!r}, {labels!r}, {classes!r}))
store.record("a", "mislabeled", "ann", corrected_label="dog", idempotency_key="click-1")
print("returned", flush=True)
"""


def test_a_writer_killed_after_commit_then_retried_leaves_one_decision(tmp_path):
    script = WRITER.format(ids=DATA.sample_ids, labels=DATA.given_labels, classes=DATA.classes)
    env = os.environ | {PAUSE_AFTER_COMMIT_ENV: "120"}
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _committed(tmp_path / "reviews.sqlite", "click-1"):
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline, "the writer never committed"
            time.sleep(0.05)
    finally:
        writer.kill()  # SIGKILL: between COMMIT and the return to the caller
        out, _ = writer.communicate()
    assert writer.returncode == -9 and "returned" not in out

    store = ReviewStore(tmp_path, DATA)
    retried = store.record("a", "mislabeled", "ann", corrected_label="dog", idempotency_key="click-1")
    history = store.history()
    assert len(history) == 1 and retried.id == history["id"].iloc[0]
    assert store.undo("ann", idempotency_key=key()) == retried
    assert store.current().empty and len(store.history()) == 1  # nothing left behind


def _committed(path: Path, idempotency_key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with closing_connection(path) as con:
            return (
                con.execute("SELECT COUNT(*) FROM actions WHERE idempotency_key = ?", (idempotency_key,)).fetchone()[0]
                == 1
            )
    except sqlite3.OperationalError:  # the table or column is still being created
        return False


# --- validation and failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_id": "a", "decision": "keep", "reviewer": "  "}, "reviewer"),
        ({"sample_id": "a", "decision": "maybe", "reviewer": "ann"}, "Unknown review decision"),
        ({"sample_id": "a", "decision": "mislabeled", "reviewer": "ann"}, "correct label"),
        ({"sample_id": "digits:3", "decision": "keep", "reviewer": "ann"}, "not a training sample"),
        ({"sample_id": "a", "decision": "mislabeled", "reviewer": "ann", "corrected_label": "7"}, "not a class"),
        ({"sample_id": "a", "decision": "mislabeled", "reviewer": "ann", "corrected_label": "cat"}, "already has"),
        ({"sample_id": "a", "decision": "keep", "reviewer": "ann", "idempotency_key": ""}, "idempotency key"),
    ],
)
def test_invalid_actions_are_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(InfluenceLensError, match=match):
        ReviewStore(tmp_path, DATA).record(**({"idempotency_key": key()} | kwargs))
    assert ReviewStore(tmp_path, DATA).history().empty


def test_a_run_accepts_only_its_training_samples(demo_run):
    store = ReviewStore.for_run(demo_run)
    train_id, test_id = demo_run.ids("train")[0], demo_run.ids("test")[0]
    given = demo_run.classes[demo_run.labels("train")[0]]
    other = next(c for c in demo_run.classes if c != given)
    action = store.record(train_id, "mislabeled", "ann", corrected_label=other, idempotency_key=key())
    mine = [r for r in store.corrections().to_dict("records") if r["id"] == train_id]  # the demo run is shared
    assert mine == [{"id": train_id, "given_label": given, "corrected_label": other}]
    with pytest.raises(InfluenceLensError, match="not a training sample"):
        store.record(test_id, "keep", "ann", idempotency_key=key())
    assert store.undo("ann", idempotency_key=key()) == action


@pytest.mark.parametrize(
    "make_broken, match",
    [
        (
            lambda d: (d / "reviews.sqlite").write_bytes(b"these are not the reviews you are looking for" * 100),
            "not a readable SQLite database",
        ),
        (lambda d: (d / "reviews.sqlite").mkdir(), "cannot be opened for writing"),
    ],
)
def test_a_broken_store_file_is_a_clear_error(tmp_path, make_broken, match):
    make_broken(tmp_path)
    with pytest.raises(InfluenceLensError, match=match) as caught:
        ReviewStore(tmp_path, DATA)
    assert caught.value.fix and str(tmp_path.parent) not in str(caught.value)  # no server folders


def test_a_run_folder_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InfluenceLensError, match="cannot be opened for writing"):
        ReviewStore(tmp_path / "file" / "run", DATA)


UNPRIVILEGED_WRITER = """
import sys
from influence_core.errors import InfluenceLensError
from influence_core.review import ReviewedData, ReviewStore
try:
    ReviewStore(sys.argv[1], ReviewedData(("a",), ("cat",), ("cat", "dog"))).record("a", "keep", "ann",
                                                                                    idempotency_key="k")
except InfluenceLensError as e:
    print("error:", e.problem, "Fix:", e.fix)
"""


@pytest.mark.parametrize("folder_mode, file_mode", [(0o777, 0o444), (0o555, 0o666)], ids=["file", "folder"])
def test_a_read_only_store_is_a_clear_error(tmp_path, folder_mode, file_mode):
    """Read-only file or folder; as root the writer runs without the capability to override permissions."""
    run_dir = tmp_path / "run"
    ReviewStore(run_dir, ReviewedData(("a",), ("cat",), ("cat", "dog")))
    os.chmod(run_dir / "reviews.sqlite", file_mode)
    os.chmod(run_dir, folder_mode)
    unprivileged = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): cannot make a file read-only for root")
        unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    try:
        done = subprocess.run(
            [*unprivileged, sys.executable, "-c", UNPRIVILEGED_WRITER, str(run_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        os.chmod(run_dir, 0o755)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("error: The review store run/reviews.sqlite cannot be opened for writing")
    assert "Fix: make the run folder" in done.stdout


# --- concurrent reviewers ------------------------------------------------------------------------------------


def _review_many(run_dir: str, reviewer: str, n: int) -> None:
    store = ReviewStore(run_dir, shared(n))
    for i in range(n):
        store.record(
            f"{reviewer}-{i}",
            "mislabeled" if i % 2 else "keep",
            reviewer,
            corrected_label="dog" if i % 2 else None,
            idempotency_key=key(),
        )
        if i % 10 == 9:  # undo and redo: the undo must hit this reviewer's own latest action
            assert store.undo(reviewer, idempotency_key=key()).sample_id == f"{reviewer}-{i}"
            store.record(f"{reviewer}-{i}", "mislabeled", reviewer, corrected_label="dog", idempotency_key=key())


def test_two_reviewer_threads_lose_nothing(tmp_path):
    threads = [threading.Thread(target=_review_many, args=(str(tmp_path), name, 60)) for name in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = ReviewStore(tmp_path, shared(60))
    assert len(store.current()) == 120
    assert len(store.history()) == 120 + 2 * 6


def test_two_reviewer_processes_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_review_many, args=(str(tmp_path), name, 40)) for name in ("ann", "bob")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    current = ReviewStore(tmp_path, shared(40)).current()
    assert len(current) == 80 and set(current["reviewer"]) == {"ann", "bob"}


# --- what the review page shows -------------------------------------------------------------------------------


def test_focus_moves_on_to_the_next_undecided_suspect_never_back():
    """Issue 29: after a decision the focus went back to the first undecided image, so `k n m n s` skipped #3."""
    shown = [10, 11, 12, 13, 14, 15]
    assert focus_after(shown, 10, [10, 11, 12, 13, 14, 15]) == 11
    assert focus_after(shown, 12, [11, 12, 13, 14, 15]) == 13  # #2 is open but behind: never back up
    assert focus_after(shown, 12, [11, 12, 14]) == 14  # over decided ones
    assert focus_after(shown, 13, [11]) == 14  # nothing open ahead: the next one
    assert focus_after(shown, 15, [11, 12]) == 15  # the last one stays


def test_each_reviewers_latest_decision_is_shown_newest_first_and_changes_the_version(tmp_path):
    store = ReviewStore(tmp_path, DATA)
    assert store.opinions(["a"]) == {} and store.version() == (0, 0)
    store.record("a", "keep", "ann", idempotency_key=key())
    store.record("a", "skip", "ann", idempotency_key=key())  # ann changed her mind: only her latest counts
    seen = store.version()
    other_tab = ReviewStore(tmp_path, DATA)  # another reviewer's session
    other_tab.record("a", "mislabeled", "bob", corrected_label="dog", idempotency_key=key())
    assert store.version() != seen  # the first tab notices on its next look
    found = store.opinions(["a", "b"])
    assert [(x.reviewer, x.decision) for x in found["a"]] == [("bob", "mislabeled"), ("ann", "skip")]
    assert found["a"][0] == store.decisions_for(["a"])["a"]  # the newest is the current decision
    seen = store.version()
    other_tab.undo("bob", idempotency_key=key())
    assert store.version() != seen and [x.reviewer for x in store.opinions(["a"])["a"]] == ["ann"]


def test_csv_exports_cannot_run_formulas_in_a_spreadsheet(tmp_path):
    """Issue 29: a reviewer name or label starting with = + - @ was written as is (a formula in a spreadsheet)."""
    data = ReviewedData(("=cmd|' /C calc'!A0", "b"), ("+cat", "cat"), ("+cat", "cat", "@dog"))
    store = ReviewStore(tmp_path, data)
    store.record("=cmd|' /C calc'!A0", "mislabeled", "-ann", corrected_label="@dog", idempotency_key=key())
    store.record("b", "keep", "\tbob", idempotency_key=key())
    for text in (store.decisions_csv(), store.corrections_csv()):
        cells = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False).to_numpy().ravel()
        assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], text
    assert pd.read_csv(io.StringIO(store.corrections_csv()))["given_label"].tolist() == ["'+cat"]
