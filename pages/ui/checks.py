"""Retraining checks of a ranking on the pages (:mod:`influence_core.counterfactual`): the explorer's button for the
picked test image, the list of every check done on a run (explorer and Overview), and the offline report's
download (:mod:`influence_core.html_report`, Overview)."""

from __future__ import annotations

import streamlit as st

from influence_core import counterfactual as cf
from influence_core.html_report import html_report
from influence_core.pipeline import InfluenceResult
from influence_core.progress import tagged
from influence_core.run import Run

from . import runs, widgets

WHAT = cf.REMOVED


def _job_key(result: InfluenceResult, test: int, k: int) -> str:
    return f"check:{result.run.path}:{result.run.key}:{result.path.name}:{test}:{k}"


def _minutes(run: Run, trainings: int) -> str:
    seconds = cf.estimated_seconds(run)
    return f"about {max(trainings * seconds / 60, 0.1):.1f} min" if seconds else "one training each"


def check_control(result: InfluenceResult, test: int) -> None:
    """For test image ``test``: the checks done on it against ``result``, and a button that removes its top-k
    training images of its own direction and as many random ones, retraining twice in the background."""
    run = result.run
    label, probs = int(run.labels("test")[test]), run.predictions["probs_test"][test]
    own = cf.reference_direction(probs, label)
    default_k, reason = cf.choose_k(result, test, own)
    st.markdown(
        f"**Check by retraining.** Remove the {WHAT[own]} training images of this test image, train again with "
        "this run's recipe, and see whether the prediction changes — next to removing as many random training "
        "images of the same labels."
    )
    c1, c2 = st.columns([1, 3])
    k = int(
        c1.number_input(
            "Training images to remove",
            1,
            len(run.labels("train")) - 1,
            default_k,
            key=f"check-k-{test}",
            help=f"Default: {reason}.",
        )
    )
    key = _job_key(result, test, k)
    registry = runs.job_registry()
    job = registry.get(key)
    done = {c.direction: c for c in cf.checks(run) if c.test == test and c.entry == result.path.name and c.k == k}
    if job is not None and job.status == "running":
        runs.show_job(job)
    elif job is not None and job.error is not None:
        widgets.show_error(job.error)
        registry.forget(key)
    elif own not in done or "random" not in done:
        if c2.button(
            f"Check: remove {k} {WHAT[own]} and {k} random images, retrain twice ({_minutes(run, 2)})",
            icon=":material/replay:",
            key=f"check-run-{test}",
            help="Two more trainings of this run's recipe on the server; you may leave the page meanwhile. "
            "The result is kept with the run.",
        ):

            def work(progress) -> None:
                for direction in (own, "random"):
                    cf.run_check(result, test, k, direction, progress=tagged(progress, WHAT[direction]))

            registry.submit(key, work, f"Checking test image #{test} by retraining without {k} training images")
            st.rerun()
    shown = [done[d] for d in (own, "random") if d in done]
    if shown:
        st.dataframe(cf.table(shown, run.classes), hide_index=True, width="stretch")
        notes = {c.units_note for c in shown if c.units_note}
        st.caption(
            "Loss: the test image's loss (nats), higher = the model believes its label less. Margin: the score of "
            "its label minus the best other score; below zero the prediction is wrong. " + " ".join(sorted(notes))
        )


def checks_list(run: Run, expanded: bool = False) -> None:
    """Every check done on ``run``: the one-line summary and, folded, the table (nothing when there is none)."""
    found = cf.checks(run)
    line = cf.summary(found)
    if line is None:
        return
    with st.expander(f"Retraining checks of the rankings: {line}", expanded=expanded):
        widgets.table(cf.table(found, run.classes), "retraining-checks.csv")
        st.caption(
            "Each check removed a test image's most helpful (or most harmful) training images, or as many random "
            "ones of the same labels, trained this run's recipe again and looked at the test image's prediction."
        )


def report_download(run: Run) -> None:
    """A button that downloads the run's report as one HTML file that opens offline (made when clicked)."""
    st.download_button(
        "Download the report (HTML, opens offline)",
        data=lambda: html_report(run),
        file_name=f"{run.path.name}-report.html",
        mime="text/html",
        on_click="ignore",
        icon=":material/download:",
        key="html-report",
        help="One file to send to anyone: the run, how well wrong labels are found, the top suspects with their "
        "review decisions, a few test images with their most helpful and harmful training images, and the "
        "retraining checks. It needs no network and no Influence Lens to open.",
    )
