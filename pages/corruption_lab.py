"""Corruption lab: flip training labels on purpose, retrain, and check that influence exposes the flips."""

import dataclasses

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from influence_core import TrainConfig
from influence_core.analysis import SIGNALS, corruption_table, detection_curve, detection_metrics
from pages.ui import charts, runs, widgets

st.title("Corruption lab")
st.markdown("Flip a share of the training labels, retrain, recompute influences — then check whether the flipped "
            "images stand out: they should have *lower* mean influence on the test set than the clean ones, and "
            "rank high on the suspicion signals.")

run = runs.current_run()

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
corruption = lab.corruption
st.subheader(f"Results: {flipped.sum()} of {len(flipped)} training labels flipped ({corruption['mode']})")
st.caption(f"Run `{runs.run_ref(lab.path)}` · test F1 {lab.metrics['f1_test']:.3f}")
if lab.path != run.path and st.button("Open this run everywhere in the app"):
    runs.select_run(lab.path)
    st.rerun()

mean = result.mean_influence
labels = lab.labels("train")
status = np.where(flipped, "corrupted", "clean")
df = pd.DataFrame({"label": runs.class_names(lab, labels), "mean influence": mean, "points": status})
fig = px.box(df, x="label", y="mean influence", color="points", points="outliers",
             color_discrete_map={"clean": charts.GOOD, "corrupted": charts.BAD},
             category_orders={"label": lab.classes, "points": ["clean", "corrupted"]},
             title="Mean influence on the test set of clean vs corrupted training points, by (given) label")
fig.add_hline(y=0, line_dash="dot", line_color="grey")
fig.update_xaxes(type="category")
fig.update_layout(height=420)
charts.chart(fig, key="box")

left, right = st.columns(2)
with left:
    st.markdown("**Mean influence per label** (the reference notebook's table)")
    widgets.table(corruption_table(mean, labels, flipped, lab.classes).round(6), f"{lab.path.name}-corruption-table.csv")
with right:
    curve = go.Figure()
    for key, score in result.signals.items():
        d = detection_curve(score, flipped)
        auroc = detection_metrics(score, flipped)["auroc"]
        curve.add_scatter(x=d["inspected"], y=d["found"], mode="lines", name=f"{SIGNALS[key].label} — AUROC {auroc:.2f}")
    curve.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="random order", line=dict(dash="dot", color="grey"))
    curve.update_layout(title="Detection: share of flips found vs share of training images inspected",
                        xaxis=dict(title="training images inspected", tickformat=".0%"),
                        yaxis=dict(title="flipped labels found", tickformat=".0%"), height=440,
                        legend=dict(yanchor="bottom", y=0.02, xanchor="right", x=0.98))
    charts.chart(curve, key="detection")
