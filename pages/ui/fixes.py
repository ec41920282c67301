"""Find → fix → verify in the app: retrain with the review's decisions, and the before / after view.

The work is :mod:`influence_core.fixes` (the child run), :mod:`influence_core.compare` (the numbers) and
:mod:`influence_core.export`; this module only lays them out and runs the retraining as a background job.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st

from influence_core.compare import compare_runs
from influence_core.errors import InfluenceLensError
from influence_core.export import export_corrected, label_issues
from influence_core.fixes import (
    LINEAGE_FIELD,
    apply_reviews,
    decisions_since,
    default_child_dir,
    lineage,
    parent_of,
    pending_changes,
    true_labels_config,
    true_labels_dir,
)
from influence_core.paths import RunPaths
from influence_core.pipeline import compute_influence
from influence_core.run import Run
from influence_core.storage import read_json
from influence_core.training import train
from pages.ui import charts, runs, widgets
from pages.ui.state import settings

COMPARE_PAGE = "pages/compare.py"


def _minutes(run: Run) -> float:
    """About how long a retraining of ``run``'s recipe and its influences take, in minutes (from its timings)."""
    t = run.metrics.get("timings_s", {})
    return (t.get("train", 0) + t.get("evaluate", 0)) / 60


def retrain_control(run: Run) -> None:
    """*Retrain with N decisions*: a button that trains the corrected child run in the background (then its
    influences), its progress while it runs, and once done the before / after view of the child."""
    changes = pending_changes(run)
    key = f"apply:{run.path}:{default_child_dir(run, changes).name}"
    job = runs.job_registry().get(key)
    if job is not None and job.status == "done":
        runs.job_registry().forget(key)
        runs.select_run(Path(job.result))
        st.switch_page(COMPARE_PAGE)
    if not runs.settled(key, wait=False):
        return
    if not changes.count:
        st.caption(
            "Mark images *Mislabeled* (with the correct label) or *Exclude* them, then retrain the model with "
            "your decisions to see what they change."
        )
        return
    out = runs.confine(default_child_dir(run, changes))
    label = f"Retrain with {changes.count} decision{'s' if changes.count != 1 else ''}"
    if st.button(
        f"{label} (about {max(_minutes(run), 0.1):.1f} min)",
        icon=":material/model_training:",
        type="primary",
        help=f"Trains this run's model again with {len(changes.relabel)} label(s) corrected and "
        f"{len(changes.exclude)} image(s) left out, same recipe and test images, then shows what changed. "
        "Keep and Skip change nothing. Runs on the server; you may leave the page.",
    ):
        s = settings()

        def work(progress) -> str:
            child = apply_reviews(run, out, progress=progress)
            compute_influence(child, s, progress=progress)
            return str(child.path)

        runs.job_registry().submit(key, work, label)
        st.rerun()


def child_headline(run: Run) -> None:
    """For a corrected run: one sentence of what the fixes bought, with a link to the before / after view."""
    if lineage(run) is None:
        return
    try:
        result = compare_runs(run)
    except InfluenceLensError as e:  # a missing or retrained parent: said, and the page goes on
        st.info(f"This run was made by correcting labels of another run, which cannot be compared now: {e.problem}")
        return
    st.success(_sentence(result))
    st.page_link(COMPARE_PAGE, label="Before and after, in detail", icon=":material/compare_arrows:")


def _sentence(result: dict) -> str:
    c, a = result["changes"] or {"relabelled": 0, "excluded": 0}, result["difference"]["accuracy"]
    fixed = f"We corrected {c['relabelled']} label(s) and left out {c['excluded']} image(s)"
    held = (
        "a clear gain"
        if a["low"] > 0
        else "a clear loss"
        if a["high"] < 0
        else "too close to call on this test set (the interval includes no change)"
    )
    return (
        f"{fixed}: test accuracy went from {a['before']:.1%} to {a['after']:.1%} "
        f"({a['difference']:+.1%}, 95 % interval {a['low']:+.1%} to {a['high']:+.1%}: {held}). "
        f"{len(result['fixed'])} test prediction(s) were fixed and {len(result['broken'])} broken."
    )


def compare_view(child: Run) -> None:
    """The before / after view of a corrected run against its parent (every number from the two runs)."""
    parent = parent_of(child)
    result = compare_runs(child, parent)
    st.success(_sentence(result))
    acc, f1 = result["difference"]["accuracy"], result["difference"]["f1"]
    cols = st.columns(4)
    cols[0].metric(
        "Test accuracy",
        f"{acc['after']:.1%}",
        f"{acc['difference']:+.1%}",
        help=f"Before: {acc['before']:.1%}. 95 % interval of the change: {acc['low']:+.1%} to {acc['high']:+.1%} "
        "(the same test images resampled 2,000 times for both models).",
    )
    cols[1].metric(
        "Test F1 (macro)",
        f"{f1['after']:.3f}",
        f"{f1['difference']:+.3f}",
        help=f"Before: {f1['before']:.3f}. 95 % interval of the change: {f1['low']:+.3f} to {f1['high']:+.3f}.",
    )
    changes = result["changes"] or {"relabelled": 0, "excluded": 0}
    cols[2].metric("Labels corrected", changes["relabelled"])
    cols[3].metric("Images left out", changes["excluded"])
    if (flips := result["flips"]) is not None:
        st.markdown(
            f"Of the **{flips['before']}** training labels flipped on purpose, **{flips['corrected']}** were "
            f"corrected and **{flips['excluded']}** left out; **{flips['left']}** are still in the training set."
            + (f" {flips['new_errors']} other label(s) were changed to a wrong class." if flips["new_errors"] else "")
        )
    _references(child, parent, result)
    if since := decisions_since(child, parent):
        st.info(
            f"{since} review decision(s) were made on the original run after this one was trained; they are not "
            "in it. Open the original run and retrain again to include them."
        )

    st.subheader("Test images whose prediction changed")
    for kind, title in (("fixed", "Fixed: wrong before, right now"), ("broken", "Broken: right before, wrong now")):
        ids = result[kind]
        st.markdown(f"**{title}** ({len(ids)})")
        if ids:
            _test_grid(child, parent, ids[:24])

    st.subheader("Per class")
    per_class = pd.DataFrame(result["per_class"]).rename(
        columns={
            "class": "Class",
            "precision_before": "Precision before",
            "precision_after": "Precision after",
            "recall_before": "Recall before",
            "recall_after": "Recall after",
        }
    )
    widgets.table(
        per_class,
        f"{child.path.name}-per-class.csv",
        column_config={c: st.column_config.NumberColumn(format="percent") for c in per_class.columns if c != "Class"},
    )
    left, right = st.columns(2)
    with left:
        st.markdown("**Confusions before** (rows: true class)")
        charts.chart(charts.confusion_figure(result["confusion"]["before"], child.classes), key="confusion-before")
    with right:
        st.markdown("**Confusions after**")
        charts.chart(charts.confusion_figure(result["confusion"]["after"], child.classes), key="confusion-after")
    exports(child)


def _references(child: Run, parent: Run, result: dict) -> None:
    """What the parent's automatic second pass reached, and the model trained on the true labels (only for runs
    whose labels were flipped on purpose): numbers from those runs, or a button to train the latter."""
    lines = []
    if result["second_pass"] is not None:
        lines.append(
            f"The automatic second pass (retraining without the top suspects, no review) reached "
            f"{result['second_pass']:.1%} test accuracy."
        )
    if result["true_labels"] is not None:
        lines.append(
            f"The same recipe trained on the true labels reaches {result['true_labels']['accuracy']:.1%} "
            f"(F1 {result['true_labels']['f1']:.3f}): the most fixing labels can buy here."
        )
    if lines:
        st.caption(" ".join(lines))
    if result["flips"] is None or result["true_labels"] is not None:
        return
    key = f"train:{runs.confine(true_labels_dir(parent))}"
    if not runs.settled(key, wait=False):
        return
    if st.button(
        f"Train on the true labels for comparison (about {max(_minutes(parent), 0.1):.1f} min)",
        icon=":material/verified:",
        help="Labels of this run were flipped on purpose, so their true values are known: a model of the same "
        "recipe trained on them shows the best that fixing labels can reach here.",
    ):
        config, out = true_labels_config(parent), runs.confine(true_labels_dir(parent))
        runs.job_registry().submit(
            key, lambda progress: train(config, out, progress=progress), "Training on the true labels"
        )
        st.rerun()


def _test_grid(child: Run, parent: Run, ids: list[str]) -> None:
    positions = pd.Index(child.ids("test")).get_indexer(ids)
    truth = runs.class_names(child, child.true_labels("test")[positions])
    before = runs.class_names(parent, runs.predicted(parent, "test")[positions])
    after = runs.class_names(child, runs.predicted(child, "test")[positions])
    captions = [f"{t}: was {b}, now {a}" for t, b, a in zip(truth, before, after, strict=True)]
    widgets.image_grid(runs.images_at(child, "test", positions), captions, columns=8, size=88, key=f"grid-{ids[0]}")


def exports(run: Run) -> None:
    """Downloads of the corrected training set (zip of an image folder with its manifest) and the label-issues
    table in cleanlab's columns."""
    st.subheader("Take the corrections elsewhere")
    left, right = st.columns(2)
    with left:
        key = f"export-zip:{run.path}:{run.key}"
        if st.button(
            "Prepare the corrected training set (zip)",
            help="One folder per class with the training images, your decisions applied (corrected labels, "
            "excluded images left out), and manifest.csv listing every image and its decision. It trains again "
            "as an image folder.",
        ):
            st.session_state[key] = _export_zip(run)
        if key in st.session_state:
            st.download_button(
                "Download the corrected training set",
                st.session_state[key],
                f"{run.path.name}-corrected.zip",
                mime="application/zip",
                icon=":material/download:",
            )
    with right:
        widgets.download_csv(
            label_issues(run), f"{run.path.name}-label-issues.csv", "Label issues CSV (cleanlab columns)"
        )


def _export_zip(run: Run) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"{run.path.name}-corrected"
        export_corrected(run, folder)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(folder.parent))
        return buffer.getvalue()


def children_of(run: Run) -> list[Path]:
    """Corrected runs made from ``run`` (in the runs roots), newest first."""
    found = []
    for path in runs.list_runs():
        try:
            record = read_json(RunPaths(path).config).get(LINEAGE_FIELD)
        except (OSError, ValueError, AttributeError):  # unreadable or not a dict: no child of anything
            continue
        if isinstance(record, dict) and record.get("parent_key") == run.key:
            found.append(path)
    return found
