"""Test image explorer: pick a test image, see which training images helped or hurt its prediction."""

from pathlib import PurePosixPath

import numpy as np
import streamlit as st

from influence_core.analysis import top_k
from pages.ui import charts, runs, widgets

PER_PAGE = 24

st.title("Test image explorer")
st.caption("Influence of a training image on a test image: positive = it helped the model get the test image "
           "right (removing it would raise the test loss), negative = it pushed the prediction the wrong way.")

run = runs.current_run()
result = runs.influence(run)
test_true, test_pred = run.labels("test"), runs.predicted(run, "test")
test_images, train_images = run.images("test"), run.images("train")
train_labels, train_ids = run.labels("train"), run.ids("train")

# --- pick a test image ----------------------------------------------------------------------------------
with st.expander("Pick a test image", expanded="test" not in st.session_state):
    c1, c2 = st.columns([2, 1])
    show = c1.segmented_control("Show", ["all", "misclassified", "one class"], default="misclassified")
    chosen_class = c2.selectbox("Class", run.classes, disabled=show != "one class")
    mask = {"all": np.ones(len(test_true), bool), "misclassified": test_true != test_pred,
            "one class": test_true == run.classes.index(chosen_class)}.get(show or "all")
    candidates = np.flatnonzero(mask)
    if len(candidates) == 0:
        st.info("No test image matches; showing all.")
        candidates = np.arange(len(test_true))
    n_pages = int(np.ceil(len(candidates) / PER_PAGE))
    page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1) if n_pages > 1 else 1
    shown = candidates[(page - 1) * PER_PAGE:page * PER_PAGE]
    captions = [f"✓ {run.classes[t]}" if t == p else f"✗ {run.classes[t]} → {run.classes[p]}"
                for t, p in zip(test_true[shown], test_pred[shown])]
    clicked = widgets.image_grid(test_images[shown], captions, columns=8, size=80, button="Inspect", key="test-grid",
                            selected=widgets.index_of(shown, st.session_state.get("test")))
    if clicked is not None:
        st.session_state["test"] = int(shown[clicked])
        st.session_state.pop("train_pick", None)
        st.rerun()

test = st.session_state.setdefault("test", int(candidates[0]))
if not 0 <= test < len(test_true):
    st.warning(f"Test image {test} does not exist in this run; showing the first one.")
    test = st.session_state["test"] = int(candidates[0])

# --- the chosen test image ------------------------------------------------------------------------------
row = result.row(test)
probs = run.predictions["probs_test"][test]
left, right = st.columns([1, 3])
with left:
    ok = test_true[test] == test_pred[test]
    st.image(widgets.enlarge(test_images[test], 220))
    st.markdown(f"**Test image #{test}** · `{run.ids('test')[test]}`")
    st.markdown(f"True label **{run.classes[test_true[test]]}**, predicted **{run.classes[test_pred[test]]}** "
                f"({probs.max():.0%}) {'✓' if ok else '✗'}")
with right:
    charts.chart(charts.influence_histogram(row, runs.class_names(run, train_labels),
                                    "Influence of every training image on this test image",
                                    "influence on this test image"), key="hist")

# --- most helpful and most harmful training images --------------------------------------------------------
c1, c2 = st.columns(2)
k = c1.slider("How many training images", 1, 16, 8)
same = c2.toggle(f"Same label as the test image ({run.classes[test_true[test]]}) only", value=False)
helpful, harmful = top_k(row, k, train_labels == test_true[test] if same else None)


def ranked(title: str, positions: np.ndarray, key: str) -> None:
    """One row of training images with influence, label and id; a click selects one for the saliency view."""
    st.markdown(f"**{title}**")
    caps = [f"{widgets.fmt(row[p])} · {run.classes[train_labels[p]]} · {PurePosixPath(train_ids[p]).name}" for p in positions]
    picked = widgets.image_grid(train_images[positions], caps, columns=8, size=80, button="Saliency", key=key,
                           selected=widgets.index_of(positions, st.session_state.get("train_pick")))
    if picked is not None:
        st.session_state["train_pick"] = int(positions[picked])


ranked("Most helpful training images (support the true label)", helpful, "helpful")
ranked("Most harmful training images (push towards a wrong prediction)", harmful, "harmful")

# --- saliency of one training image ---------------------------------------------------------------------
pick = st.session_state.get("train_pick")
if pick is None:
    st.info("Click **Saliency** under a training image to see which of its pixels carry its influence.")
else:
    with st.spinner("Computing the saliency map…"):
        sal = runs.saliency(run, test, pick)
    charts.chart(charts.saliency_figure(train_images[pick], sal,
                                f"Training image {train_ids[pick]} (label {run.classes[train_labels[pick]]}, "
                                f"influence {widgets.fmt(row[pick])}) on test image #{test}"), key="saliency")
    st.caption("Red pixels: brightening them would make this training image *more* helpful for the test image; "
               "blue: less helpful.")
