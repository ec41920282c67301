"""Corruption lab: flip training labels on purpose, retrain, and check that influence exposes the flips."""

import dataclasses

import pandas as pd
import streamlit as st

from influence_core import TrainConfig
from influence_core.analysis import (
    SIGNALS,
    corruption_table,
    describe_ranking,
    detection_curve,
    detection_metrics,
    top_k,
)
from influence_core.display import check_notebook_claim
from influence_core.pipeline import InfluenceResult
from pages.ui import charts, runs, widgets

st.title("Corruption lab")
st.markdown("Flip a share of the training labels, retrain, recompute influences — then check whether the flipped "
            "images stand out. The reference notebook claims they have *lower* mean influence on the test set "
            "than the clean ones; below, that claim is checked on the run's own numbers.")

run = runs.current_run()


@st.cache_resource(max_entries=8, show_spinner=False)
def detection(result_path: str, _result: InfluenceResult) -> tuple[dict[str, dict], dict[str, pd.DataFrame]]:
    """Per signal: detection metrics and curve of the result at ``result_path``, computed once."""
    flipped = _result.run.flipped()
    return ({key: detection_metrics(score, flipped) for key, score in _result.signals.items()},
            {key: detection_curve(score, flipped) for key, score in _result.signals.items()})


# --- a new experiment -----------------------------------------------------------------------------------
with st.form("experiment"):
    c1, c2 = st.columns(2)
    fraction = c1.slider("Share of training labels to flip", 0.05, 0.4, 0.1, 0.05)
    mode = c2.radio("Which labels", ["random", "top-influence"], horizontal=True,
                    format_func={"random": "random images", "top-influence": "the most influential images "
                                 "(per class, by a clean run's mean test influence)"}.get)
    start = st.form_submit_button("Retrain with flipped labels", type="primary")
if start:
    base = TrainConfig.from_run(run)
    scores = None
    if mode == "top-influence":
        clean = runs.train_with_progress(dataclasses.replace(base, corrupt_fraction=0.0, corrupt_mode="random"),
                                       "Training the clean run (no flipped labels)")
        scores = runs.influence(clean).mean_influence.tolist()
    corrupted = runs.train_with_progress(
        dataclasses.replace(base, corrupt_fraction=fraction, corrupt_mode=mode, corrupt_scores=scores),
        f"Training with {fraction:.0%} flipped labels ({mode})")
    runs.influence(corrupted)
    st.session_state["lab_run"] = str(corrupted.path)


# --- results --------------------------------------------------------------------------------------------
lab = runs.open_run(st.session_state["lab_run"]) if "lab_run" in st.session_state else run
flipped = lab.flipped()
if not flipped.any():
    st.info("This run has no flipped labels. Start an experiment above to see how influence exposes them.")
    st.stop()
result = runs.influence(lab)
mode = lab.corruption["mode"]
st.subheader(f"Results: {flipped.sum()} of {len(flipped)} training labels flipped ({mode})")
st.caption(f"Run `{runs.run_ref(lab.path)}` · test F1 {lab.metrics['f1_test']:.3f}")
if lab.path != run.path and st.button("Open this run everywhere in the app"):
    runs.select_run(lab.path)
    st.rerun()

mean = result.mean_influence
labels = lab.labels("train")
table = corruption_table(mean, labels, flipped, lab.classes)
metrics, curves = detection(str(result.path), result)
claim = check_notebook_claim(table, metrics["neg_mean_test_influence"]["auroc"], mode)
box = st.success if claim.verdict == "held" else st.warning  # a failed claim is a finding, not an app error
box(f"{claim.summary()}\n\n{claim.implication()}", icon=":material/fact_check:")

# --- clean vs flipped, by label --------------------------------------------------------------------------
most_flipped = table.sort_values("n_corrupted", ascending=False, kind="stable")["label"].tolist()
shown = st.multiselect("Labels in the chart (type to search; default: the ten with the most flips)", lab.classes,
                       default=most_flipped[:10])
charts.chart(charts.clean_vs_flipped_figure(mean, runs.class_names(lab, labels), flipped, shown or most_flipped[:10]),
             key="box")
st.markdown("**Mean influence per label** (the reference notebook's table; difference = clean − flipped, positive "
            "where the claim holds)")
widgets.paged_table(table, f"{lab.path.name}-corruption-table.csv", per_page=20, key="corruption-table",
                    column_config={c: st.column_config.NumberColumn(format="%.4g") for c in
                                   ("mean_clean", "mean_corrupted", "difference")})

# --- the most harmful images, and how well each signal finds flips ---------------------------------------
harmful = top_k(mean, 8)[1]
flags = runs.flags_at(lab, harmful)
st.markdown("**Lowest mean influence on the test set** (the notebook's suspects)")
st.caption(describe_ranking(flags, True).text)
widgets.image_grid(runs.images_at(lab, "train", harmful),
                   widgets.training_captions(lab, harmful, flags, mean[harmful], "mean influence"), columns=8, size=80)
charts.chart(charts.detection_figure({f"{SIGNALS[key].label} — AUROC {metrics[key]['auroc']:.2f}": curve
                                      for key, curve in curves.items()}), key="detection")
