"""Mislabel review: a ranked queue of suspected wrong labels; reviewers mark, keep or skip, shared via SQLite."""

import uuid

import numpy as np
import streamlit as st

from influence_core.analysis import SIGNALS
from influence_core.review import ReviewStore
from pages.ui import runs, widgets

PER_PAGE = 10

st.title("Mislabel review")
run = runs.current_run()
result = runs.influence(run)
store = ReviewStore.for_run(run)
ids, labels = run.ids("train"), run.labels("train")
pred_probs = run.predictions["probs_train"]
images = run.images("train")

c1, c2, c3 = st.columns([1, 2, 1])
reviewer = c1.text_input("Your name", value=st.session_state.get("reviewer", ""), placeholder="e.g. Ana",
                         help="Decisions are saved under this name; Undo reverts your own latest action.").strip()
st.session_state["reviewer"] = reviewer
signals = list(result.signals)
signal = c2.selectbox("Rank suspects by", signals, index=signals.index(result.best_signal),
                      format_func=lambda key: SIGNALS[key].label)
size = c3.number_input("Queue length", 1, len(ids), int(np.ceil(0.1 * len(ids))),
                       help="The review queue holds this many of the most suspicious training images.")
st.caption(SIGNALS[signal].explanation)

queue = np.argsort(-result.signals[signal], kind="stable")[:size]
queue_ids = [ids[p] for p in queue]
progress = store.progress(queue_ids)
done = progress["reviewed"]
st.progress(done / max(progress["total"], 1),
            text=f"Reviewed {done} of {progress['total']} · {progress['mislabeled']} marked mislabeled · "
                 f"{progress['skipped']} skipped")

c1, c2, c3, c4 = st.columns(4)
hide = c1.toggle("Hide decided images", value=False, help="Skipped images stay in the queue.")


def undo() -> None:
    """Revert this reviewer's latest action (a callback, so the page redraws with it undone)."""
    undone = store.undo(reviewer, idempotency_key=uuid.uuid4().hex)
    st.toast(f"Undid “{undone.decision}” on {undone.sample_id}" if undone else "Nothing of yours to undo")


c2.button("Undo my last action", icon=":material/undo:", disabled=not reviewer, width="stretch", on_click=undo)
given_names = dict(zip(ids, runs.class_names(run, labels)))
with c3:
    widgets.download_csv(store.decisions_csv(), f"{run.path.name}-review-decisions.csv", "Decisions CSV")
with c4:
    widgets.download_csv(store.corrections_csv(given_names), f"{run.path.name}-corrected-labels.csv", "Corrected labels CSV")
if not reviewer:
    st.info("Type your name above to start reviewing.")

decisions = store.decisions_for(queue_ids)
ranks = np.arange(1, len(queue) + 1)
if hide:
    keep = np.array([decisions.get(i) is None or decisions[i].decision == "skip" for i in queue_ids], bool)
    queue, ranks = queue[keep], ranks[keep]
n_pages = max(1, int(np.ceil(len(queue) / PER_PAGE)))
page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1) if n_pages > 1 else 1


for pos, rank in zip(queue[(page - 1) * PER_PAGE:page * PER_PAGE], ranks[(page - 1) * PER_PAGE:page * PER_PAGE]):
    sid, given, pred = ids[pos], labels[pos], int(pred_probs[pos].argmax())
    current = decisions.get(sid)
    with st.container(border=True, key=f"suspect-{pos}"):
        img, info, action = st.columns([1, 3, 3])
        img.image(widgets.enlarge(images[pos], 96))
        info.markdown(f"**#{rank}** · `{sid}`  \nGiven label **{run.classes[given]}** · model predicts "
                      f"**{run.classes[pred]}** ({pred_probs[pos, pred]:.0%})  \nScore {result.signals[signal][pos]:.3g}")
        if current:
            verdict = {"mislabeled": f"✗ mislabeled → **{current.corrected_label}**", "keep": "✓ label kept",
                       "skip": "↷ skipped"}[current.decision]
            info.markdown(f"{verdict} by {current.reviewer}")
        others = [c for c in run.classes if c != run.classes[given]]
        default = run.classes[pred] if pred != given else others[0]
        corrected = action.selectbox("Correct label", others, index=others.index(default), key=f"label-{sid}")
        buttons = zip(action.columns(3), ("mislabeled", "keep", "skip"), ("Mislabeled", "Keep", "Skip"))
        for col, decision, label in buttons:
            if col.button(label, key=f"{decision}-{sid}", disabled=not reviewer, width="stretch",
                          type="primary" if current and current.decision == decision else "secondary"):
                store.record(sid, decision, reviewer, corrected, idempotency_key=uuid.uuid4().hex)
                st.rerun()
