"""Whole test set: mean influence of every training image over all test images, by label and per class."""

import numpy as np
import pandas as pd
import streamlit as st

from influence_core.analysis import describe_ranking, top_k
from influence_core.display import grouped_histogram, label_groups
from pages.ui import charts, runs, widgets

ALL_LABELS_UP_TO = 10  # with more classes the histogram starts pooled and the user picks labels to split out

run = runs.current_run()  # first: on a fresh server's first link this runs the page inside app.py
st.title("Influence on the whole test set")
st.caption(
    "Mean influence of a training image over all test images: high = it helps the model in general, "
    "negative = the test set would be better off without it (a typical sign of a wrong label)."
)

result = runs.influence(run)
widgets.computation_caption(run)
mean = result.mean_influence
labels = run.labels("train")
flipped = run.flipped()
label_of = run.classes.__getitem__

# --- histogram by label -----------------------------------------------------------------------------------
featured = st.multiselect(
    "Labels shown on their own (type to search; the rest are pooled)",
    range(run.n_classes),
    default=range(run.n_classes) if run.n_classes <= ALL_LABELS_UP_TO else [],
    format_func=label_of,
)
codes, groups = label_groups(labels, run.classes, [(c, "") for c in featured])
hist = grouped_histogram(mean, codes, groups)
charts.chart(
    charts.influence_histogram(
        hist, "Mean influence over the test set, by training label", "mean influence over the test set"
    ),
    key="mean-hist",
)
if hist.outliers_note():
    st.caption(hist.outliers_note())

# --- per class ------------------------------------------------------------------------------------------
st.subheader("Per class: the most and least useful training images")
c1, c2 = st.columns([2, 1])
cls = c1.selectbox("Training label (type to search)", range(run.n_classes), format_func=label_of)
k = c2.slider("Images each", 1, 16, 8)
highest, lowest = top_k(mean, k, labels == cls)


def ranked(title: str, positions: np.ndarray, claim: str, claim_holds) -> None:
    """A row of training images; ``claim`` joins the title only if ``claim_holds(note)`` for its ranking note."""
    flags = runs.flags_at(run, positions)
    note = describe_ranking(flags, bool(flipped.any()))
    st.markdown(f"**{title}{' — ' + claim if claim_holds(note) else ''}**")
    st.caption(note.text)
    caps = widgets.training_captions(run, positions, flags, mean[positions], "mean influence")
    widgets.image_grid(runs.images_at(run, "train", positions), caps, columns=8, size=80)


ranked(
    f"Highest mean influence among images labelled “{label_of(cls)}”",
    highest,
    "the clearest examples",
    lambda note: not note.has_wrong_labels,
)
ranked(
    f"Lowest mean influence among images labelled “{label_of(cls)}”",
    lowest,
    "they hurt the test set",
    lambda note: bool((mean[lowest] < 0).all()),
)

# --- every training image -------------------------------------------------------------------------------
st.subheader("All training images, most harmful first")
ids = run.ids("train")
reviews = runs.review_decisions(run, ids)
df = pd.DataFrame(
    {
        "id": ids,
        "label": runs.class_names(run, labels),
        "true_label": runs.class_names(run, run.true_labels("train")),
        "flipped": flipped,
        "review": [reviews[i].decision if i in reviews else "" for i in ids],
        "mean_influence": mean,
    }
).sort_values("mean_influence", kind="stable")
widgets.paged_table(df, f"{run.path.name}-mean-influence.csv", key="all-training")
