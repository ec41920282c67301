"""Whole test set: mean influence of every training image over all test images, by label and per class."""

from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import streamlit as st

from pages.ui import charts, runs, widgets

st.title("Influence on the whole test set")
st.caption("Mean influence of a training image over all test images: high = it helps the model in general, "
           "negative = the test set would be better off without it (a typical sign of a wrong label).")

run = runs.current_run()
result = runs.influence(run)
mean = result.mean_influence
labels, ids = run.labels("train"), run.ids("train")
names = runs.class_names(run, labels)
flipped = run.flipped()

charts.chart(charts.influence_histogram(mean, names, "Mean influence over the test set, by training label",
                                "mean influence over the test set"), key="mean-hist")

st.subheader("Per class: the most and least useful training images")
c1, c2 = st.columns([2, 1])
cls = c1.selectbox("Training label", run.classes)
k = c2.slider("Images each", 1, 16, 8)
members = np.flatnonzero(labels == run.classes.index(cls))
order = members[np.argsort(-mean[members], kind="stable")]


def row(title: str, positions: np.ndarray) -> None:
    st.markdown(f"**{title}**")
    caps = [f"{widgets.fmt(mean[p])} · {PurePosixPath(ids[p]).name}" + (" · flipped" if flipped[p] else "")
            for p in positions]
    widgets.image_grid(run.images("train")[positions], caps, columns=8, size=80)


row(f"Highest mean influence — the clearest “{cls}” examples", order[:k])
row(f"Lowest mean influence — “{cls}” images that hurt the test set most", order[::-1][:k])

st.subheader("All training images")
df = pd.DataFrame({"id": ids, "label": names, "true_label": runs.class_names(run, run.true_labels("train")),
                   "flipped": flipped, "mean_influence": mean}).sort_values("mean_influence")
widgets.table(df, f"{run.path.name}-mean-influence.csv", height=280)
