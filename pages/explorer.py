"""Test image explorer: pick a test image, see which training images helped or hurt its prediction."""

import numpy as np
import streamlit as st

from influence_core.analysis import describe_ranking, top_k
from influence_core.display import grouped_histogram, label_groups, pages
from pages.ui import charts, checks, runs, widgets

PER_PAGE = 24

run = runs.current_run()  # first: on a fresh server's first link this runs the page inside app.py
st.title("Test image explorer")
st.caption(
    "Influence of a training image on a test image: positive = it helped the model get the test image "
    "right (removing it would raise the test loss), negative = it pushed the prediction the wrong way."
)

ranking = runs.rankings(run)
result = ranking.result
widgets.computation_caption(run, ranking.settings, ranking.note)  # one computation for every value below
if ranking.job is not None and ranking.job.error is None and ranking.job.status == "running":
    st.caption(
        "A whole-network computation that agreed better with retraining runs in the background; this page "
        "switches to it (and says so) once it is done.",
        help=ranking.note,
    )
if ranking.job is not None and ranking.job.error is not None:
    widgets.show_error(ranking.job.error)  # the last layer's rankings stay on the page
elif ranking.job is not None and ranking.job.status == "running":
    runs.show_job(ranking.job)  # the page reruns with the better rankings once they are computed
test_true, test_pred = run.labels("test"), runs.predicted(run, "test")
train_labels, train_ids = run.labels("train"), run.ids("train")

# --- pick a test image ----------------------------------------------------------------------------------
# the picker keeps the open/closed state it had when the page was first shown (a changing `expanded` would
# fold it away on the first click after a test image got selected)
picker_open = st.session_state.setdefault("explorer_picker_open", "test" not in st.session_state)
with st.expander("Pick a test image", expanded=picker_open):
    c1, c2 = st.columns([2, 1])
    show = c1.segmented_control("Show", ["all", "misclassified", "one class"], default="misclassified")
    chosen_class = c2.selectbox(
        "Class (type to search)",
        range(run.n_classes),
        format_func=run.classes.__getitem__,
        disabled=show != "one class",
    )
    mask = {
        "all": np.ones(len(test_true), bool),
        "misclassified": test_true != test_pred,
        "one class": test_true == chosen_class,
    }[show or "all"]
    candidates = np.flatnonzero(mask)
    if len(candidates) == 0:
        st.info("No test image matches; showing all.")
        candidates = np.arange(len(test_true))
    n_pages = pages(len(candidates), PER_PAGE)
    page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1) if n_pages > 1 else 1
    shown = candidates[(page - 1) * PER_PAGE : page * PER_PAGE]
    captions = [
        f"✓ {run.classes[t]}" if t == p else f"✗ {run.classes[t]}, predicted {run.classes[p]}"
        for t, p in zip(test_true[shown], test_pred[shown], strict=True)
    ]

    def pick_test(i: int) -> None:  # runs before the next run of the page: `shown` is the grid that was clicked
        st.session_state["test"] = int(shown[i])
        st.session_state.pop("train_pick", None)

    widgets.image_grid(
        runs.images_at(run, "test", shown),
        captions,
        columns=8,
        size=80,
        button="Inspect",
        key="test-grid",
        selected=widgets.index_of(shown, st.session_state.get("test")),
        on_click=pick_test,
    )
    st.caption("✓ the model predicted the test image's label · ✗ it predicted another one")

test = st.session_state.setdefault("test", int(candidates[0]))
if not 0 <= test < len(test_true):
    st.warning(f"Test image {test} does not exist in this run; showing the first one.")
    test = st.session_state["test"] = int(candidates[0])

# --- the chosen test image ------------------------------------------------------------------------------
row = result.row(test)
probs = run.predictions["probs_test"][test]
true_label, predicted_label = int(test_true[test]), int(test_pred[test])
left, right = st.columns([1, 3])
with left:
    st.image(widgets.enlarge(runs.images_at(run, "test", [test])[0], 220))
    st.markdown(f"**Test image #{test}** · `{run.ids('test')[test]}`")
    st.markdown(
        f"True label **{run.classes[true_label]}**, predicted **{run.classes[predicted_label]}** "
        f"({probs.max():.0%}) {'✓' if true_label == predicted_label else '✗'}"
    )
with right:
    codes, groups = label_groups(
        train_labels, run.classes, [(true_label, "this test image's label"), (predicted_label, "predicted")]
    )
    hist = grouped_histogram(row, codes, groups)
    charts.chart(
        charts.influence_histogram(
            hist,
            "Influence of every training image on this test image, by training label",
            "influence on this test image",
        ),
        key="hist",
    )
    st.caption(
        " ".join(filter(None, ["Training images grouped by the label they were trained with.", hist.outliers_note()]))
    )

# --- most helpful and most harmful training images --------------------------------------------------------
c1, c2 = st.columns(2)
k = c1.slider("How many training images", 1, 16, 8)
same = c2.toggle(f"Same label as the test image ({run.classes[true_label]}) only", value=False)
if same:  # a label filter needs the whole row; otherwise the stored top-k lists answer at once
    helpful, harmful = top_k(row, k, train_labels == true_label)
else:
    helpful, harmful = result.top_helpful(test, k)[0], result.top_harmful(test, k)[0]
flipped = run.flipped()


def ranked(title: str, positions: np.ndarray, key: str) -> None:
    """One row of training images with captions and flags; its saliency view opens right under it."""
    st.markdown(f"**{title}**")
    flags = runs.flags_at(run, positions)
    st.caption(describe_ranking(flags, bool(flipped.any())).text)
    caps = widgets.training_captions(run, positions, flags, row[positions], "influence")
    pick = st.session_state.get("train_pick")

    def pick_train(i: int) -> None:
        st.session_state["train_pick"] = int(positions[i])

    widgets.image_grid(
        runs.images_at(run, "train", positions),
        caps,
        columns=8,
        size=80,
        button="Saliency",
        key=key,
        selected=widgets.index_of(positions, pick),
        on_click=pick_train,
    )
    if pick is not None and pick in positions:
        saliency_panel(pick, key)


def saliency_panel(pick: int, key: str) -> None:
    """The saliency map of training image ``pick`` for the test image, over the image or beside it."""
    with st.container(border=True):
        c1, c2 = st.columns([1, 2])
        with c1:
            st.markdown(
                f"**Saliency of training image `{train_ids[pick]}`** (trained as "
                f"{run.classes[train_labels[pick]]}, influence {widgets.fmt(row[pick])}) on test image "
                f"#{test}"
            )
            overlay = st.toggle("Overlay on the image", value=True, key=f"{key}-overlay")
            st.caption(
                "Red pixels: brightening them would make this training image *more* helpful for the test "
                "image; blue: less helpful."
            )
        with c2, st.spinner("Computing the saliency map…"):
            sal = runs.saliency(run, test, pick, ranking.settings)
            charts.chart(
                charts.saliency_figure(runs.images_at(run, "train", [pick])[0], sal, overlay), key=f"{key}-saliency"
            )


ranked("Most helpful training images (support the true label)", helpful, "helpful")
ranked("Most harmful training images (push towards a wrong prediction)", harmful, "harmful")
if st.session_state.get("train_pick") is None:
    st.info("Click **Saliency** under a training image to see which of its pixels carry its influence.")

# === Check by retraining (owned by pages/ui/checks.py; keep this section separate) ==========================
st.subheader("Check this ranking by retraining")
with st.container(border=True), widgets.errors_shown():
    checks.check_control(result, test)
    checks.checks_list(run)
