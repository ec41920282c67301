"""Overview: what Influence Lens is, what this run is, its key numbers and where to click next."""

import streamlit as st

from influence_core.analysis import SIGNALS, best_signal, detection_metrics, rank_suspects
from influence_core.pipeline import run_signals
from pages.ui import checks, fixes, runs, widgets

run = runs.current_run()
st.title("Influence Lens")
st.markdown("##### Which training images pushed a prediction up or down — and which training labels look wrong?")
result = None  # until computed, the page ranks by the signals of training (its best signals need none)
with widgets.errors_shown():
    result = runs.influence_when_ready(run)
flipped = run.flipped()
scores = run_signals(run, result)
best = best_signal(scores)

st.markdown(runs.describe_run(run))
fixes.child_headline(run)
cols = st.columns(4)
cols[0].metric(
    "Test F1 (macro)",
    f"{run.metrics['f1_test']:.3f}",
    help="How well the model classifies images it never saw; 1.0 is perfect.",
)
cols[1].metric(
    "Training labels flipped",
    f"{flipped.mean():.0%}",
    help=f"{flipped.sum()} of {len(flipped)} training labels were deliberately set to a wrong class, "
    "so we can check whether the tool finds them.",
)
total = int(flipped.sum())
detection = detection_metrics(scores[best], flipped) if total else {"recall_at_10pct": 0.0}
found = round(detection["recall_at_10pct"] * total)  # flips among the top 10 % of the ranking
if total:
    cols[2].metric(
        "Flips found in the top 10 %",
        f"{found} of {total}",
        help=f"Inspect the 10 % most suspicious training images by “{SIGNALS[best].label}”: this many "
        f"of the flipped labels are among them (random inspection would find about {total // 10}).",
    )
    cols[3].metric(
        "Flipped ranked above clean",
        f"{detection['auroc']:.0%}",
        help="How often a flipped image ranks above a clean one: 50 % is guessing, 100 % is perfect "
        "(the detection AUROC).",
    )
else:
    cols[2].metric("Suspect signal", SIGNALS[best].label)
    cols[3].metric("Training images", len(flipped))

st.subheader("The story in three steps")
steps = st.columns(3)
steps[0].markdown(
    "**1 · A model learns from labelled images.** "
    f"A ResNet18 learned {run.n_classes} classes from {len(flipped)} training images — "
    + (
        f"{total} of whose labels were flipped on purpose."
        if total
        else "none flipped on purpose here, though real labels can be wrong."
    )
)
steps[1].markdown(
    "**2 · Influence measures each image's share.** For every test prediction we estimate how much "
    "each training image helped (positive) or hurt (negative) it, without retraining."
)
only = "" if 2 * found >= total else "only "
outcome = (
    f"On this run the top 10 % of that queue holds {only}{found} of the {total} flipped labels."
    if total
    else "This run has no flipped labels to check that against."
)
steps[2].markdown(
    "**3 · Wrong labels stand out.** An image whose label disagrees with its look keeps fighting the model "
    f"(high loss, unusual self-influence), so ranking by these signals puts it early in a review queue. {outcome}"
)

st.subheader("Most suspicious training images")
order = rank_suspects(scores[best], 8)
truth = runs.class_names(run, run.true_labels("train")[order])
flags = runs.flags_at(run, order)
captions = [
    f"labelled {g}" + (f" · really {t} ✗" if f else " ✓") + (f" · reviewed: {r}" if r else "")
    for g, t, f, r in zip(flags["label"], truth, flags["flipped"], flags["review"], strict=True)
]
widgets.image_grid(runs.images_at(run, "train", order), captions, columns=8, size=88)
st.caption(
    f"Ranked by “{SIGNALS[best].label}”. ✗ marks a label we flipped on purpose; review decisions are shown "
    "under each image."
)

st.subheader("Where next")
links = st.columns(3)
links[0].page_link("pages/explorer.py", label="Explain one prediction", icon=":material/image_search:")
links[1].page_link("pages/review_queue.py", label="Review suspected mislabels", icon=":material/fact_check:")
links[2].page_link("pages/test_set.py", label="Influence on the whole test set", icon=":material/bar_chart:")
links[0].page_link("pages/corruption_lab.py", label="Corruption experiment", icon=":material/science:")
links[1].page_link("pages/setup_run.py", label="Your own data & model", icon=":material/tune:")

# === Retraining checks and the offline report (owned by pages/ui/checks.py; keep this section separate) =====
st.subheader("Evidence to share")
with widgets.errors_shown():
    checks.checks_list(run)
    if result is not None:
        checks.report_download(run)
    else:
        st.caption("The report can be downloaded once the influences are computed (the bar at the top).")
