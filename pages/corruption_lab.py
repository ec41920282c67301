"""Corruption lab: flip training labels on purpose, retrain, and check that influence exposes the flips."""

import pandas as pd
import streamlit as st

from influence_core import Run
from influence_core.analysis import (
    SIGNALS,
    describe_ranking,
    detection_curve,
    detection_metrics,
    top_k,
)
from influence_core.display import finding_words
from influence_core.experiments import notebook_claim, run_corruption_experiment
from influence_core.pipeline import InfluenceResult, InfluenceSettings
from pages.ui import charts, runs, state, widgets

run = runs.current_run()  # first: on a fresh server's first link this runs the page inside app.py
st.title("Corruption lab")
st.markdown(
    "Flip a share of the training labels, retrain, recompute influences — then check whether the flipped "
    "images stand out. A common claim is that they have *lower* mean influence on the test set than the clean "
    "ones; below, that claim is checked on the run's own numbers."
)


@st.cache_resource(max_entries=8, show_spinner=False)
def detection(
    result_path: str, second_pass: int | None, _result: InfluenceResult
) -> tuple[dict[str, dict], dict[str, pd.DataFrame]]:
    """Per signal: detection metrics and curve of the result at ``result_path`` (and of the run's second pass,
    written at ``second_pass``), computed once."""
    flipped = _result.run.flipped()
    return (
        {key: detection_metrics(score, flipped) for key, score in _result.signals.items()},
        {key: detection_curve(score, flipped) for key, score in _result.signals.items()},
    )


def experiment_work(base: Run, fraction: float, mode: str, settings: InfluenceSettings):
    """The corruption experiment as a job's ``work(progress)``, every setting bound now (the job runs later)."""
    root = runs.runs_root()
    return lambda progress: run_corruption_experiment(base, fraction, mode, root, settings, progress=progress)


# --- a new experiment -----------------------------------------------------------------------------------
with st.form("experiment"):
    c1, c2 = st.columns(2)
    fraction = c1.slider("Share of training labels to flip", 0.05, 0.4, 0.1, 0.05)
    mode = c2.radio(
        "Which labels",
        ["random", "top-influence"],
        horizontal=True,
        format_func={
            "random": "random images",
            "top-influence": "the most influential images (per class, by a clean run's mean test influence)",
        }.get,
    )
    start = st.form_submit_button("Retrain with flipped labels", type="primary")
if start:  # a background job of the server: leaving the page does not stop it, coming back shows its progress
    settings = state.settings()
    job = runs.job_registry().submit(
        f"experiment:{run.path}:{fraction}:{mode}:{settings}",
        experiment_work(run, fraction, mode, settings),
        f"Corruption experiment: {fraction:.0%} of the labels flipped ({mode})",
    )
    st.session_state["lab_job"] = job.key
experiment = runs.job_registry().get(st.session_state.get("lab_job", ""))
if experiment is not None:
    if experiment.status == "running":
        runs.show_job(experiment)
        st.stop()
    runs.job_registry().forget(experiment.key)
    del st.session_state["lab_job"]
    if experiment.error is not None:
        raise experiment.error
    runs.select_run(experiment.result.corrupted.path)  # the new run, by its human-readable name, in the URL
    st.rerun()


# --- results of the current run ---------------------------------------------------------------------
flipped = run.flipped()
if not flipped.any():
    st.info("This run has no flipped labels. Start an experiment above to see how influence exposes them.")
    st.stop()
result = runs.influence(run)
widgets.computation_caption(run)
st.subheader(f"Results: {flipped.sum()} of {len(flipped)} training labels flipped ({run.corruption['mode']})")
st.caption(f"Run `{runs.run_ref(run.path)}` · test F1 {run.metrics['f1_test']:.3f}")

mean = result.mean_influence
labels = run.labels("train")
metrics, curves = detection(str(result.path), runs.second_pass_stamp(run), result)
claim = notebook_claim(result)
box = st.success if claim.check.verdict == "held" else st.warning  # a failed claim is a finding, not an app error
box(f"{claim.check.summary()}\n\n{claim.check.implication()}", icon=":material/fact_check:")
st.caption("How the verdict is measured", help=claim.check.figures())
table = claim.table

# --- clean vs flipped, by label --------------------------------------------------------------------------
most_flipped = table.sort_values("n_corrupted", ascending=False, kind="stable")["label"].tolist()
shown = st.multiselect(
    "Labels in the chart (type to search; default: the ten with the most flips)", run.classes, default=most_flipped[:10]
)
charts.chart(
    charts.clean_vs_flipped_figure(mean, runs.class_names(run, labels), flipped, shown or most_flipped[:10]), key="box"
)
st.markdown(
    "**Mean influence per label** (difference = clean − flipped: positive where the flipped images have the "
    "lower mean, as the claim says)"
)
widgets.paged_table(
    table,
    f"{run.path.name}-corruption-table.csv",
    per_page=20,
    key="corruption-table",
    column_config={
        c: st.column_config.NumberColumn(format="%.4g") for c in ("mean_clean", "mean_corrupted", "difference")
    },
)

# --- the most harmful images, and how well each signal finds flips ---------------------------------------
harmful = top_k(mean, 8)[1]
flags = runs.flags_at(run, harmful)
st.markdown("**Lowest mean influence on the test set** (the suspects by that claim)")
st.caption(describe_ranking(flags, True).text)
widgets.image_grid(
    runs.images_at(run, "train", harmful),
    widgets.training_captions(run, harmful, flags, mean[harmful], "mean influence"),
    columns=8,
    size=80,
)
charts.chart(
    charts.detection_figure(
        {f"{SIGNALS[key].label} ({finding_words(metrics[key]['auroc'])})": curve for key, curve in curves.items()}
    ),
    key="detection",
)
st.caption(
    "Each curve ranks the training images by one signal: the steeper it rises, the fewer images a reviewer must "
    "look at to find the flipped labels.",
    help="Detection AUROC per signal (the chance that a flipped image ranks above a clean one; 0.5 is guessing): "
    + "; ".join(f"{SIGNALS[key].label} {metrics[key]['auroc']:.2f}" for key in curves),
)
