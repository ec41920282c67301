"""Apply a review's decisions to a run: a *child run* with the corrected labels, trained with the same recipe.

Every training image marked ``mislabeled`` gets its corrected label, every image marked ``exclude`` leaves the
training set, ``keep``, ``skip`` and unreviewed images stay as they are. The child keeps the parent's recipe,
seed, initial weights and val / test images, so its test numbers compare with the parent's image for image
(:mod:`influence_core.compare`). Its ``config.json`` records the lineage (:func:`lineage`); it is cached by its
labels (the same decisions applied again are a cache hit), and the parent's decisions carry over into its review
store, so the reviewed images show as reviewed there.

Decisions are taken from the parent's review store as they stand when applying starts (the *snapshot*: the last
action id); decisions made later stay in the parent's store and are counted by :func:`decisions_since`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Split
from .errors import InfluenceLensError
from .paths import RunPaths
from .progress import Progress
from .review import ReviewStore
from .run import Run
from .storage import stable_hash
from .training import TrainConfig, TrainingData, train_on, training_key

log = logging.getLogger(__name__)

LINEAGE_FIELD = "lineage"
"""The ``config.json`` field of a child run that says where it comes from (:func:`lineage`)."""
DECISION_COLUMNS = ("id", "decision", "corrected_label", "reviewer")
"""Columns of a decisions file (the app's *Decisions CSV*; ``created_at`` may follow and is ignored)."""


@dataclass(frozen=True)
class Changes:
    """What applying a run's current decisions changes in its training set.

    ``relabel``: sample id → corrected class name (only where it differs from the label trained on);
    ``exclude``: ids to leave out; ``snapshot``: the id of the newest decision taken into account (0: none);
    ``decisions``: how many current decisions of each kind the snapshot holds."""

    relabel: dict[str, str]
    exclude: tuple[str, ...]
    snapshot: int
    decisions: dict[str, int]

    @property
    def count(self) -> int:
        """How many training images change (relabelled + excluded)."""
        return len(self.relabel) + len(self.exclude)


def pending_changes(run: Run) -> Changes:
    """The changes the current decisions in ``run``'s review store make to its training set."""
    store = ReviewStore.for_run(run)
    current = store.current()
    given = store.data.given_label
    relabel = {
        r.sample_id: r.corrected_label
        for r in current.itertuples(index=False)
        if r.decision == "mislabeled" and r.corrected_label != given[r.sample_id]
    }
    exclude = tuple(r.sample_id for r in current.itertuples(index=False) if r.decision == "exclude")
    return Changes(
        relabel,
        exclude,
        int(current["id"].max()) if len(current) else 0,
        {str(k): int(v) for k, v in current["decision"].value_counts().items()},
    )


def import_decisions(run: Run, path: str | Path) -> int:
    """Record the decisions of a CSV file (columns :data:`DECISION_COLUMNS`, corrected labels as class names)
    in ``run``'s review store, each checked like a click; returns how many rows were recorded.

    Each row's idempotency key is a hash of the file's content, the row and the run's data, so importing the same
    file twice records nothing new. The first bad row stops the import (rows before it stay recorded)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        content = path.read_bytes()
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InfluenceLensError(
            f"Cannot read the decisions file {path.name}: {e}.", "give a CSV file as the Decisions CSV download"
        ) from e
    missing = [c for c in DECISION_COLUMNS if c not in table.columns]
    if missing:
        raise InfluenceLensError(
            f"The decisions file {path.name} lacks the column(s) {', '.join(missing)}.",
            f"give a CSV with the columns {', '.join(DECISION_COLUMNS)} (as the app's Decisions CSV)",
        )
    store = ReviewStore.for_run(run)
    file_key = stable_hash("decisions-file", content, store.data.key)
    for i, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        try:
            store.record(
                str(row.id).strip(),
                str(row.decision).strip().lower(),
                str(row.reviewer),
                str(row.corrected_label).strip() or None,
                idempotency_key=f"{file_key}:{i}",
            )
        except InfluenceLensError as e:
            raise InfluenceLensError(f"{path.name}, line {i}: {e.problem}", e.fix) from e
    return len(table)


def child_data(parent: Run, changes: Changes) -> TrainingData:
    """The parent's training data with ``changes`` applied: same dataset, recipe, seed and val / test images;
    training labels corrected, excluded images left out."""
    config = same_recipe(parent)
    train = parent.part("train")
    keep = ~train["id"].isin(set(changes.exclude)).to_numpy()
    index = {name: i for i, name in enumerate(parent.classes)}
    labels = train["label"].to_numpy(np.int64).copy()
    rows = pd.Index(train["id"]).get_indexer(list(changes.relabel))
    labels[rows] = [index[name] for name in changes.relabel.values()]
    y_train, true = labels[keep], train["true_label"].to_numpy(np.int64)[keep]
    if len(np.unique(y_train)) < 2:
        raise InfluenceLensError(
            "After these decisions the training set would hold fewer than two classes.",
            "undo some Exclude or Mislabeled decisions",
        )
    split = Split(*(parent.images(s).positions for s in ("train", "val", "test")))
    split = dataclasses.replace(split, train=split.train[keep])
    return TrainingData(config, parent.dataset, split, y_train, np.flatnonzero(y_train != true))


def same_recipe(run: Run) -> TrainConfig:
    """``run``'s recipe with its initial weights pinned: a run trained from scratch stays from scratch, never
    picking up a pretrained file that appeared since."""
    config = TrainConfig.from_run(run)
    return dataclasses.replace(config, weights="scratch" if run.config["weights"] == "scratch" else config.weights)


def child_key(parent: Run, data: TrainingData) -> str:
    """The cache key of a child run: its training (ids, labels, settings) and its parent's training."""
    return stable_hash("child-v1", training_key(data), parent.key)


def default_child_dir(parent: Run, changes: Changes) -> Path:
    """``<parent>-fixed-<hash>`` beside the parent: one folder per set of changes, so applying more decisions
    later makes a new child and the earlier one stays."""
    digest = stable_hash("child-dir", parent.key, sorted(changes.relabel.items()), sorted(changes.exclude), length=8)
    return parent.path.parent / f"{parent.path.name}-fixed-{digest}"


def apply_reviews(
    parent: Run,
    out_dir: str | Path | None = None,
    *,
    decisions_csv: str | Path | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    wait: bool = True,
) -> Run:
    """Train the child run of ``parent`` with its current decisions applied into ``out_dir`` (default
    :func:`default_child_dir`); a cache hit when it already holds the same child. ``decisions_csv``: record that
    file's decisions in the parent's store first (:func:`import_decisions`). Returns the child."""
    if decisions_csv is not None:
        import_decisions(parent, decisions_csv)
    changes = pending_changes(parent)
    if not changes.count:
        n = sum(changes.decisions.values())
        raise InfluenceLensError(
            f"No decision of this run changes its training set ({n} decision(s), none Mislabeled or Exclude).",
            "mark images Mislabeled (with the correct label) or Exclude on the Mislabel review page, "
            "or give a decisions file with --decisions",
        )
    out = Path(out_dir) if out_dir is not None else default_child_dir(parent, changes)
    if out.resolve() == parent.path.resolve():
        raise InfluenceLensError(
            "The child run would replace its parent.", "give another folder for the corrected run (--out)"
        )
    data = child_data(parent, changes)
    given = dict(zip(parent.ids("train"), parent.labels("train"), strict=True))
    record = {
        "parent": str(parent.path.resolve()),
        "parent_name": parent.path.name,
        "parent_key": parent.key,
        "generation": int((lineage(parent) or {}).get("generation", 0)) + 1,
        "review_snapshot": changes.snapshot,
        "decisions": changes.decisions,
        "relabelled": len(changes.relabel),
        "excluded": len(changes.exclude),
        "relabelled_ids": {i: [parent.classes[given[i]], name] for i, name in sorted(changes.relabel.items())},
        "excluded_ids": sorted(changes.exclude),
        "source": Path(decisions_csv).name if decisions_csv is not None else "review store",
    }
    t0 = time.perf_counter()
    child = train_on(
        data,
        out,
        device=device,
        progress=progress,
        wait=wait,
        key=child_key(parent, data),
        extra_config={LINEAGE_FIELD: record},
        timings={"load_data": time.perf_counter() - t0},
    )
    carry_over_reviews(parent, child, changes.snapshot)
    return child


def carry_over_reviews(parent: Run, child: Run, snapshot: int) -> int:
    """Copy the parent's current decisions (up to action ``snapshot``) on images the child still trains on into
    the child's review store (reviewer and time kept; idempotent). Returns how many are in the child's store."""
    current = ReviewStore.for_run(parent).current()
    current = current[current["id"] <= snapshot]
    store = ReviewStore.for_run(child)
    trained = set(store.data.sample_ids)
    return store.carry_over(current[current["sample_id"].isin(trained)], source=parent.key)


def lineage(run: Run) -> dict | None:
    """The lineage of a child run (parent, parent_key, review_snapshot, relabelled, excluded, relabelled_ids
    {id: [from, to]}, excluded_ids, generation, source), or None for a run trained from a dataset."""
    value = run.config.get(LINEAGE_FIELD)
    return value if isinstance(value, dict) else None


def parent_path(run: Run) -> Path | None:
    """Where the parent of a child run is: a folder of its name beside the child (the two moved or were copied
    together) when it is the same training, else its recorded path, else that sibling whatever its training (so
    that :func:`parent_of` can say it was retrained); None for a run without a parent or when neither is there."""
    record = lineage(run)
    if record is None:
        return None
    name, recorded = record.get("parent_name"), record.get("parent")
    places = ([run.path.parent / str(name)] if name else []) + ([Path(str(recorded))] if recorded else [])
    candidates = [c for c in places if RunPaths(c).train_key.is_file()]
    same = [c for c in candidates if RunPaths(c).train_key.read_text().strip() == record.get("parent_key")]
    found = same or candidates
    return found[0] if found else None


def parent_of(run: Run) -> Run:
    """The parent run of a child run, checked to be the training the child was made from."""
    record = lineage(run)
    if record is None:
        raise InfluenceLensError(f"{run.path.name} is not a corrected run (it has no parent).", "pick a child run")
    path = parent_path(run)
    if path is None:
        raise InfluenceLensError(
            f"The parent run {record.get('parent_name')} of {run.path.name} is not there any more.",
            "put the parent run folder back beside the child, or compare with --against PARENT_DIR",
        )
    parent = Run(path)
    if parent.key != record.get("parent_key"):
        raise InfluenceLensError(
            f"The parent run {path.name} was retrained after {run.path.name} was made from it.",
            "apply the decisions again to the retrained parent",
        )
    return parent


def decisions_since(child: Run, parent: Run) -> int:
    """How many review actions were stored in the parent after the child was made from it (not applied)."""
    record = lineage(child) or {}
    history = ReviewStore.for_run(parent).history()
    return int((history["id"] > int(record.get("review_snapshot", 0))).sum())


def true_labels_config(run: Run) -> TrainConfig:
    """The recipe of ``run`` (or of the run it descends from) on the true labels: no flips, same data, split,
    seed and initial weights. Only meaningful for runs whose labels were flipped on purpose (their true labels are
    known): the upper bound a review can reach."""
    return dataclasses.replace(same_recipe(run), corrupt_fraction=0.0)


def true_labels_dir(run: Run) -> Path:
    """Where :func:`true_labels_config`'s run goes: beside ``run``, named by the config (shared by a run and its
    children)."""
    from .experiments import run_dir_name

    return run.path.parent / run_dir_name(true_labels_config(run))
