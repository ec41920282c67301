"""Exports a user can take to other tools: the corrected training set as an image folder, and a label-issues
table in cleanlab's column names.

The folder has one sub-folder per class (the ``folder:PATH`` layout, so it trains again with
``--dataset folder:PATH``) holding the run's training images with the current review decisions applied
(mislabeled → corrected class, exclude → left out), hard-linked to the source files where the file system allows
and copied otherwise (array datasets such as the digits demo are written as PNG). ``manifest.csv`` beside the
class folders lists every image: id, source_path, given_label, final_label, decision, reviewer, decided_at.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .analysis import best_signal, rank_suspects
from .data import parse_spec
from .display import export_csv
from .errors import InfluenceLensError
from .fixes import pending_changes
from .pipeline import run_signals
from .review import ReviewStore
from .run import Run

MANIFEST = "manifest.csv"
LABEL_ISSUE_SHARE = 0.1
"""Share of the training set flagged ``is_label_issue`` in :func:`label_issues` (the review queue's default)."""


def _folder_name(name: str) -> str:
    """A class name as a folder name (no path separators, nothing hidden)."""
    return re.sub(r"[^\w+.,() -]+", "_", name).strip(" .") or "class"


def export_corrected(run: Run, out: str | Path) -> Path:
    """Write ``run``'s training set with its current decisions applied into the new folder ``out`` (see the
    module docstring); returns the path of the manifest. The folder is built beside ``out`` and renamed into
    place when complete, so an interrupted export leaves nothing half-written."""
    out = Path(out)
    if out.exists():
        raise InfluenceLensError(f"{out} already exists.", "give a new folder for the export, or remove the old one")
    kind, root = parse_spec(run.config["dataset"])
    files = kind in ("tiny-imagenet", "folder")
    changes = pending_changes(run)
    store = ReviewStore.for_run(run)
    decisions = store.current().set_index("sample_id")
    train = run.part("train")
    excluded = set(changes.exclude)
    given = [run.classes[c] for c in train["label"]]
    final = [changes.relabel.get(i, g) for i, g in zip(train["id"], given, strict=True)]
    images = run.images("train")
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    rows = []
    try:
        for name in sorted(set(final)):
            (staging / _folder_name(name)).mkdir(parents=True)
        for position, (sample_id, g, f) in enumerate(zip(train["id"], given, final, strict=True)):
            decision = decisions.loc[sample_id] if sample_id in decisions.index else None
            row = {
                "id": sample_id,
                "source_path": str(Path(root) / sample_id) if files else sample_id,
                "given_label": g,
                "final_label": "" if sample_id in excluded else f,
                "decision": "" if decision is None else decision["decision"],
                "reviewer": "" if decision is None else decision["reviewer"],
                "decided_at": "" if decision is None else decision["created_at"],
            }
            rows.append(row)
            if sample_id in excluded:
                continue
            stem = re.sub(r"[^\w.-]+", "_", sample_id)
            if files:
                target = staging / _folder_name(f) / stem
                try:
                    os.link(Path(root) / sample_id, target)
                except OSError:
                    shutil.copy2(Path(root) / sample_id, target)
            else:
                Image.fromarray(np.asarray(images[position])).save(staging / _folder_name(f) / f"{stem}.png")
        (staging / MANIFEST).write_text(export_csv(pd.DataFrame(rows)))
        staging.rename(out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfluenceLensError(
            f"Cannot write the export to {out}: {e.strerror or e}.", "choose a writable folder with free space"
        ) from e
    return out / MANIFEST


def review_signal(run: Run) -> np.ndarray:
    """(n_train,) float64, higher = more suspicious: the loss under the run's second pass once computed, else
    the mean training loss over the epochs (the review queue's default ranking, no influence needed)."""
    signals = run_signals(run)
    return signals[best_signal(signals)]


def label_issues(run: Run, signal: np.ndarray | None = None, share: float = LABEL_ISSUE_SHARE) -> pd.DataFrame:
    """The training images ranked by ``signal`` ((n_train,) float, higher = more suspicious; default
    :func:`review_signal`), in cleanlab's
    column names: id, is_label_issue (the top ``share``), label_quality (the probability the run's model gives
    the given label, in [0, 1], higher = better, cleanlab's self-confidence), given_label, predicted_label,
    rank (1 = most suspicious). Most suspicious first."""
    signal = review_signal(run) if signal is None else np.asarray(signal)
    probs = run.predictions["probs_train"]
    labels = run.labels("train")
    order = rank_suspects(signal, len(signal))
    flagged = np.zeros(len(signal), bool)
    flagged[order[: max(1, round(share * len(signal)))]] = True
    return pd.DataFrame(
        {
            "id": np.asarray(run.ids("train"), dtype=object)[order],
            "is_label_issue": flagged[order],
            "label_quality": probs[np.arange(len(labels)), labels][order].astype(float),
            "given_label": [run.classes[c] for c in labels[order]],
            "predicted_label": [run.classes[c] for c in probs.argmax(1)[order]],
            "rank": np.arange(1, len(order) + 1),
        }
    )
