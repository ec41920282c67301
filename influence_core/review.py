"""The mislabel review store: who decided what about which training sample, shared by several reviewers.

One SQLite file per run (``run_dir/reviews.sqlite``) in WAL mode with a busy timeout, so two reviewers
(threads, processes or browser sessions) can write at once; every action is one short transaction.
Actions are append-only: ``undo`` marks a reviewer's latest action as undone instead of deleting it.
Decisions are keyed by sample id (never by rank), so they survive a recomputed ranking.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .errors import InfluenceLensError

DECISIONS = ("mislabeled", "keep", "skip")
FILE_NAME = "reviews.sqlite"
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('mislabeled', 'keep', 'skip')),
    corrected_label TEXT,
    reviewer TEXT NOT NULL,
    created_at TEXT NOT NULL,
    undone_at TEXT
);
CREATE INDEX IF NOT EXISTS actions_sample ON actions (sample_id, id);
CREATE INDEX IF NOT EXISTS actions_reviewer ON actions (reviewer, id);
"""

# latest action that is not undone, per sample
_CURRENT = """
SELECT a.id, a.sample_id, a.decision, a.corrected_label, a.reviewer, a.created_at
FROM actions a
JOIN (SELECT sample_id, MAX(id) AS id FROM actions WHERE undone_at IS NULL GROUP BY sample_id) m ON a.id = m.id
ORDER BY a.id
"""


@dataclass(frozen=True)
class Action:
    """One recorded review action."""

    id: int
    sample_id: str
    decision: str
    corrected_label: str | None
    reviewer: str
    created_at: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class ReviewStore:
    """Review decisions of one run. Cheap to create: each call opens its own short-lived connection."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)  # idempotent; runs as its own transaction

    @contextmanager
    def _connect(self):
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            con.execute("PRAGMA journal_mode = WAL")
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self):
        """A write transaction that takes the lock up front (no read-then-upgrade deadlocks)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def record(self, sample_id: str, decision: str, reviewer: str, corrected_label: str | None = None) -> Action:
        """Store one decision; ``mislabeled`` needs the ``corrected_label`` (a class name)."""
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise InfluenceLensError("A review decision needs a reviewer name.", "type your name in the reviewer box")
        if decision not in DECISIONS:
            raise InfluenceLensError(f"Unknown review decision {decision!r}.", f"use one of {', '.join(DECISIONS)}")
        if decision == "mislabeled" and not corrected_label:
            raise InfluenceLensError("Marking a sample mislabeled needs the correct label.",
                                     "choose the label the image should have")
        if decision != "mislabeled":
            corrected_label = None
        created = _now()
        with self._transaction() as con:
            cur = con.execute(
                "INSERT INTO actions (sample_id, decision, corrected_label, reviewer, created_at) VALUES (?, ?, ?, ?, ?)",
                (str(sample_id), decision, corrected_label, reviewer, created))
            return Action(cur.lastrowid, str(sample_id), decision, corrected_label, reviewer, created)

    def undo(self, reviewer: str) -> Action | None:
        """Revert ``reviewer``'s latest action that is not yet undone; returns it, or None if there is none."""
        with self._transaction() as con:
            row = con.execute(
                "SELECT id, sample_id, decision, corrected_label, reviewer, created_at FROM actions "
                "WHERE reviewer = ? AND undone_at IS NULL ORDER BY id DESC LIMIT 1", ((reviewer or "").strip(),)
            ).fetchone()
            if row is None:
                return None
            con.execute("UPDATE actions SET undone_at = ? WHERE id = ?", (_now(), row[0]))
            return Action(*row)

    def _query(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        with self._connect() as con, closing(con.execute(sql, params)) as cur:
            return pd.DataFrame(cur.fetchall(), columns=[c[0] for c in cur.description])

    def current(self) -> pd.DataFrame:
        """Current decision per reviewed sample: id (action), sample_id, decision, corrected_label, reviewer, created_at."""
        return self._query(_CURRENT)

    def history(self) -> pd.DataFrame:
        """Every action in order, undone ones included (``undone_at`` set)."""
        return self._query("SELECT * FROM actions ORDER BY id")

    def decisions_for(self, sample_ids: Iterable[str]) -> dict[str, Action]:
        """Current decision of each of ``sample_ids`` that has one."""
        wanted = set(map(str, sample_ids))
        cur = self.current()
        return {r.sample_id: Action(*r) for r in cur.itertuples(index=False) if r.sample_id in wanted}

    def progress(self, sample_ids: Iterable[str]) -> dict[str, int]:
        """Counts over ``sample_ids``: ``reviewed`` (mislabeled or keep), ``skipped``, ``mislabeled``, ``total``."""
        ids = list(map(str, sample_ids))
        counts = pd.Series([a.decision for a in self.decisions_for(ids).values()], dtype=object).value_counts()
        mislabeled, keep, skip = (int(counts.get(d, 0)) for d in DECISIONS)
        return {"reviewed": mislabeled + keep, "skipped": skip, "mislabeled": mislabeled, "total": len(ids)}

    def corrections(self, given_labels: Mapping[str, str]) -> pd.DataFrame:
        """id, given_label, corrected_label for every sample currently marked mislabeled."""
        cur = self.current()
        cur = cur[cur["decision"] == "mislabeled"]
        return pd.DataFrame({"id": cur["sample_id"].to_numpy(),
                             "given_label": [given_labels.get(i, "") for i in cur["sample_id"]],
                             "corrected_label": cur["corrected_label"].to_numpy()})

    def decisions_csv(self) -> str:
        """The current decisions as CSV: id, decision, corrected_label, reviewer, created_at."""
        return self.current().drop(columns="id").rename(columns={"sample_id": "id"}).to_csv(index=False)

    def corrections_csv(self, given_labels: Mapping[str, str]) -> str:
        """The corrected labels as CSV: id, given_label, corrected_label."""
        return self.corrections(given_labels).to_csv(index=False)
