"""The mislabel review store: who decided what about which training sample, shared by several reviewers.

One SQLite file per run (``RunPaths.reviews``) in WAL mode with a busy timeout, so two reviewers (threads,
processes or browser sessions) can write at once; every action is one short transaction.

* **Append-only.** ``undo`` marks a reviewer's latest action as undone instead of deleting it; no row is ever
  deleted, not even by a schema upgrade.
* **Keyed by the data it was made on.** Every action carries the :attr:`ReviewedData.key` of the training
  samples (ids and given labels) it was made on. A store only shows actions of its own key, so a run folder
  reused for other data never shows old decisions against new samples; those stay in the file, hidden, and
  :meth:`ReviewStore.hidden_count` says how many there are. Rows written before keys existed have no key and
  count as hidden.
* **Idempotent.** Each ``record`` and ``undo`` carries an idempotency key made once per click (e.g. a uuid4);
  a retry with the same key (after a crash between commit and return, a double click, a resent request)
  stores nothing new and returns the original action.
* Decisions are keyed by sample id (never by rank), so they survive a recomputed ranking.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .errors import InfluenceLensError
from .paths import RunPaths
from .storage import stable_hash

if TYPE_CHECKING:
    from .run import Run

DECISIONS = ("mislabeled", "keep", "skip")
BUSY_TIMEOUT_MS = 30_000
PAUSE_AFTER_COMMIT_ENV = "INFLUENCE_LENS_PAUSE_AFTER_COMMIT_S"
"""Fault injection for tests: seconds ``record`` sleeps between its COMMIT and its return (a test kills it there)."""

_TABLE = """
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('mislabeled', 'keep', 'skip')),
    corrected_label TEXT,
    reviewer TEXT NOT NULL,
    created_at TEXT NOT NULL,
    undone_at TEXT
)"""
# columns added after the first release: a file written before them gets them with NULL values
_ADDED_COLUMNS = {"data_key": "TEXT", "idempotency_key": "TEXT", "undo_key": "TEXT"}
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS actions_data_sample ON actions (data_key, sample_id, id)",
    "CREATE INDEX IF NOT EXISTS actions_data_reviewer ON actions (data_key, reviewer, id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS actions_idempotency ON actions (idempotency_key)",
    "CREATE UNIQUE INDEX IF NOT EXISTS actions_undo ON actions (undo_key)",
)
_ACTION_COLUMNS = "id, sample_id, decision, corrected_label, reviewer, created_at"

# latest action that is not undone, per sample of one data key
_CURRENT = f"""
SELECT {", ".join("a." + c for c in _ACTION_COLUMNS.split(", "))}
FROM actions a
JOIN (SELECT MAX(id) AS id FROM actions WHERE undone_at IS NULL AND data_key = ? GROUP BY sample_id) m
  ON a.id = m.id
ORDER BY a.id
"""
# current decisions (per data key and sample) made on other data, legacy rows without a key included
_HIDDEN = """
SELECT COUNT(*) FROM (SELECT 1 FROM actions WHERE undone_at IS NULL AND data_key IS NOT ?
                      GROUP BY data_key, sample_id)
"""


def _use_wal(con: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so). Changing the journal mode ignores the busy timeout, so two reviewers
    opening a new store at once would see "database is locked" at once: retry within the timeout instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            con.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass(frozen=True)
class Action:
    """One recorded review action."""

    id: int
    sample_id: str
    decision: str
    corrected_label: str | None
    reviewer: str
    created_at: str


@dataclass(frozen=True)
class ReviewedData:
    """The training samples a set of review decisions is made on: what is allowed, and its fingerprint.

    ``sample_ids`` (n,) and ``given_labels`` (n,) class names as trained on (maybe corrupted), aligned;
    ``classes``: every class name a corrected label may take.
    """

    sample_ids: tuple[str, ...]
    given_labels: tuple[str, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.sample_ids) != len(self.given_labels):
            raise ValueError(f"{len(self.sample_ids)} sample ids but {len(self.given_labels)} given labels")

    @classmethod
    def of_run(cls, run: Run) -> ReviewedData:
        """The run's training samples with their given labels, and its classes."""
        return cls(
            tuple(map(str, run.ids("train"))), tuple(run.classes[c] for c in run.labels("train")), tuple(run.classes)
        )

    @cached_property
    def key(self) -> str:
        """16 hex digits: the hash of the sample ids and given labels (order included)."""
        return stable_hash("reviews-v1", list(self.sample_ids), list(self.given_labels))

    @cached_property
    def given_label(self) -> dict[str, str]:
        """Sample id → given label name."""
        return dict(zip(self.sample_ids, self.given_labels, strict=True))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class ReviewStore:
    """Review decisions of one run's training data. Cheap to create: each call opens a short-lived connection.

    ``run_dir``: the run folder (the file is ``RunPaths(run_dir).reviews``); ``data``: the samples reviewed.
    Every SQLite or file-system failure (a read-only file or folder, a file that is not a database, a folder
    under a file) is raised as an :class:`InfluenceLensError` with a fix.
    """

    def __init__(self, run_dir: str | Path, data: ReviewedData):
        self.path = RunPaths(Path(run_dir)).reviews
        self.data = data
        with self._errors_explained():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as con:
            con.execute(_TABLE)
            present = {row[1] for row in con.execute("PRAGMA table_info(actions)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    con.execute(f"ALTER TABLE actions ADD COLUMN {column} {kind}")
            for statement in _INDEXES:
                con.execute(statement)

    @classmethod
    def for_run(cls, run: Run) -> ReviewStore:
        """The store of ``run``, showing only decisions made on its current training samples and labels."""
        return cls(run.path, ReviewedData.of_run(run))

    # --- connections and errors ----------------------------------------------------------------------------
    @contextmanager
    def _errors_explained(self) -> Iterator[None]:
        """Turn SQLite and file-system errors into an :class:`InfluenceLensError` naming the store and a fix."""
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            raise _store_error(self.path, e) from e

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._errors_explained():
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                _use_wal(con)
                yield con
            finally:
                con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no read-then-upgrade deadlocks)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        with self._connect() as con, closing(con.execute(sql, params)) as cur:
            return pd.DataFrame(cur.fetchall(), columns=[c[0] for c in cur.description])

    # --- writing -------------------------------------------------------------------------------------------
    def record(
        self, sample_id: str, decision: str, reviewer: str, corrected_label: str | None = None, *, idempotency_key: str
    ) -> Action:
        """Store one decision and return it; ``mislabeled`` needs the ``corrected_label`` (a class name).

        ``idempotency_key``: made once per click (e.g. ``uuid.uuid4().hex``). Recording again with a key that
        is already stored writes nothing and returns the action stored with it; the same key with a different
        decision is an error. ``sample_id`` must be one of the reviewed training samples.
        """
        reviewer = (reviewer or "").strip()
        sample_id = str(sample_id)
        if not reviewer:
            raise InfluenceLensError("A review decision needs a reviewer name.", "type your name in the reviewer box")
        if decision not in DECISIONS:
            raise InfluenceLensError(f"Unknown review decision {decision!r}.", f"use one of {', '.join(DECISIONS)}")
        if sample_id not in self.data.given_label:
            raise InfluenceLensError(
                f"{sample_id!r} is not a training sample of this run.",
                "review the images listed in the run's review queue",
            )
        corrected_label = self._checked_correction(sample_id, decision, corrected_label)
        if not idempotency_key:
            raise InfluenceLensError("A review decision needs an idempotency key.", "make one per click: uuid4().hex")
        with self._transaction() as con:
            row = con.execute(
                f"SELECT {_ACTION_COLUMNS}, data_key FROM actions WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            if row is not None:
                stored = Action(*row[:-1])
                if (stored.sample_id, stored.decision, stored.corrected_label, stored.reviewer, row[-1]) != (
                    sample_id,
                    decision,
                    corrected_label,
                    reviewer,
                    self.data.key,
                ):
                    raise InfluenceLensError(
                        f"The idempotency key {idempotency_key!r} was already used for another decision.",
                        "make a new key for each click",
                    )
                return stored
            created = _now()
            cur = con.execute(
                "INSERT INTO actions (sample_id, decision, corrected_label, reviewer, created_at, data_key, "
                "idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sample_id, decision, corrected_label, reviewer, created, self.data.key, idempotency_key),
            )
            assert cur.lastrowid is not None
            action = Action(cur.lastrowid, sample_id, decision, corrected_label, reviewer, created)
        pause = os.environ.get(PAUSE_AFTER_COMMIT_ENV)
        if pause:
            time.sleep(float(pause))
        return action

    def _checked_correction(self, sample_id: str, decision: str, corrected_label: str | None) -> str | None:
        """The label to store: a class name other than the given one for ``mislabeled``, else None."""
        if decision != "mislabeled":
            return None
        if not corrected_label:
            raise InfluenceLensError(
                "Marking a sample mislabeled needs the correct label.", "choose the label the image should have"
            )
        if corrected_label not in self.data.classes:
            raise InfluenceLensError(
                f"{corrected_label!r} is not a class of this run.", f"choose one of {', '.join(self.data.classes)}"
            )
        if corrected_label == self.data.given_label[sample_id]:
            raise InfluenceLensError(
                f"{sample_id!r} already has the label {corrected_label!r}.",
                "choose the label the image should have, or press Keep",
            )
        return corrected_label

    def undo(self, reviewer: str, *, idempotency_key: str) -> Action | None:
        """Revert ``reviewer``'s latest action on this data that is not yet undone; return it (None if none).

        ``idempotency_key`` as in :meth:`record`: a retried undo returns the action it undid the first time
        instead of undoing another one.
        """
        if not idempotency_key:
            raise InfluenceLensError("An undo needs an idempotency key.", "make one per click: uuid4().hex")
        with self._transaction() as con:
            done = con.execute(
                f"SELECT {_ACTION_COLUMNS} FROM actions WHERE undo_key = ?", (idempotency_key,)
            ).fetchone()
            if done is not None:
                return Action(*done)
            row = con.execute(
                f"SELECT {_ACTION_COLUMNS} FROM actions WHERE data_key = ? AND reviewer = ? AND undone_at IS NULL "
                "ORDER BY id DESC LIMIT 1",
                (self.data.key, (reviewer or "").strip()),
            ).fetchone()
            if row is None:
                return None
            con.execute(
                "UPDATE actions SET undone_at = ?, undo_key = ? WHERE id = ?", (_now(), idempotency_key, row[0])
            )
            return Action(*row)

    # --- reading -------------------------------------------------------------------------------------------
    def current(self) -> pd.DataFrame:
        """Current decision per reviewed sample of this data: id (action), sample_id, decision, corrected_label,
        reviewer, created_at."""
        return self._query(_CURRENT, (self.data.key,))

    def history(self) -> pd.DataFrame:
        """Every action on this data in order, undone ones included (``undone_at`` set)."""
        return self._query(
            f"SELECT {_ACTION_COLUMNS}, undone_at FROM actions WHERE data_key = ? ORDER BY id", (self.data.key,)
        )

    def hidden_count(self) -> int:
        """How many current decisions in the file were made on other data (another dataset, other labels,
        or written before decisions were keyed). They are kept, never shown here."""
        with self._connect() as con:
            return int(con.execute(_HIDDEN, (self.data.key,)).fetchone()[0])

    def decisions_for(self, sample_ids: Iterable[str]) -> dict[str, Action]:
        """Current decision of each of ``sample_ids`` that has one."""
        wanted = set(map(str, sample_ids))
        cur = self.current()
        return {r.sample_id: Action(*r) for r in cur.itertuples(index=False) if r.sample_id in wanted}

    def progress(self, sample_ids: Sequence[str]) -> dict[str, int]:
        """Counts over ``sample_ids``: ``reviewed`` (mislabeled or keep), ``skipped``, ``mislabeled``, ``total``."""
        ids = list(map(str, sample_ids))
        counts = pd.Series([a.decision for a in self.decisions_for(ids).values()], dtype=object).value_counts()
        mislabeled, keep, skip = (int(counts.get(d, 0)) for d in DECISIONS)
        return {"reviewed": mislabeled + keep, "skipped": skip, "mislabeled": mislabeled, "total": len(ids)}

    def corrections(self) -> pd.DataFrame:
        """id, given_label, corrected_label for every sample currently marked mislabeled."""
        cur = self.current()
        cur = cur[cur["decision"] == "mislabeled"]
        return pd.DataFrame(
            {
                "id": cur["sample_id"].to_numpy(),
                "given_label": [self.data.given_label[i] for i in cur["sample_id"]],
                "corrected_label": cur["corrected_label"].to_numpy(),
            }
        )

    def decisions_csv(self) -> str:
        """The current decisions as CSV: id, decision, corrected_label, reviewer, created_at."""
        return self.current().drop(columns="id").rename(columns={"sample_id": "id"}).to_csv(index=False)

    def corrections_csv(self) -> str:
        """The corrected labels as CSV: id, given_label, corrected_label."""
        return self.corrections().to_csv(index=False)


def _store_error(path: Path, e: sqlite3.Error | OSError) -> InfluenceLensError:
    """The user-facing error for a failure of the review store at ``path`` (named without server folders)."""
    name = f"{path.parent.name}/{path.name}"
    reason = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
    if isinstance(e, sqlite3.DatabaseError) and ("not a database" in reason or "malformed" in reason):
        return InfluenceLensError(
            f"The review store {name} is not a readable SQLite database ({reason}).",
            "move the file aside (e.g. rename it to reviews.sqlite.bad); a new, empty store "
            "is made on the next start and the old file stays for recovery",
        )
    if isinstance(e, sqlite3.OperationalError) and "locked" in reason:
        return InfluenceLensError(
            f"The review store {name} stayed locked by another reviewer for {BUSY_TIMEOUT_MS // 1000} s.",
            "try again in a moment",
        )
    return InfluenceLensError(
        f"The review store {name} cannot be opened for writing ({reason}).",
        "make the run folder and its reviews.sqlite writable for the app's user "
        "(e.g. chmod u+w), or copy the run to a writable folder",
    )
