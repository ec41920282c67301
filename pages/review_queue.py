"""Mislabel review: a ranked queue of suspected wrong labels; reviewers mark, keep or skip, shared via SQLite.

The reviewer's name lives in the URL (``?reviewer=``), so a reload or a bookmark keeps it. Each decision
carries an idempotency key made once per button (kept until the store has confirmed it), so a retried click
never stores a decision twice. Keyboard: m / k / s decide on the focused suspect (mislabeled, keep, skip),
n / p move the focus to the next / previous one.
"""

import uuid

import numpy as np
import streamlit as st

from influence_core.analysis import SIGNALS, rank_suspects
from influence_core.review import ReviewStore
from pages.ui import fixes, runs, widgets

PER_PAGE = 10
DECISIONS = {"mislabeled": ("Mislabeled", "m"), "keep": ("Keep", "k"), "skip": ("Skip", "s")}  # label, shortcut
VERDICTS = {"mislabeled": "✗ mislabeled → **{}**", "keep": "✓ label kept", "skip": "↷ skipped"}


def request_key(action: str) -> str:
    """The idempotency key of the next click on ``action``: the same until the store has confirmed it."""
    return st.session_state.setdefault(f"request-{action}", uuid.uuid4().hex)


def confirmed(action: str) -> None:
    """The click on ``action`` is stored: the next one gets a new key."""
    st.session_state.pop(f"request-{action}", None)


run = runs.current_run()
result = runs.influence(run)
st.title("Mislabel review")
store = ReviewStore.for_run(run)
ids, labels = run.ids("train"), run.labels("train")
pred_probs = run.predictions["probs_train"]

c1, c2, c3 = st.columns([1, 2, 1])
reviewer = c1.text_input(
    "Your name",
    value=st.session_state.get("reviewer", ""),
    placeholder="e.g. Ana",
    help="Decisions are saved under this name (it stays in the page's address, so a reload "
    "keeps it); Undo reverts your own latest action.",
).strip()
st.session_state["reviewer"] = reviewer
scores = result.signals  # read once per page run (the second pass is looked up on disk)
signal = c2.selectbox(
    "Rank suspects by",
    list(scores),
    index=list(scores).index(result.best_signal),
    format_func=lambda key: SIGNALS[key].label,
)
size = c3.number_input(
    "Queue length",
    1,
    len(ids),
    int(np.ceil(0.1 * len(ids))),
    help="The review queue holds this many of the most suspicious training images.",
)
st.caption(SIGNALS[signal].explanation)
with widgets.errors_shown():
    runs.second_pass_control(run)
with widgets.errors_shown():
    fixes.retrain_control(run)

queue = rank_suspects(scores[signal], size)
queue_ids = [ids[p] for p in queue]
progress = store.progress(queue_ids)
done = progress["reviewed"]
st.progress(
    done / max(progress["total"], 1),
    text=f"Reviewed {done} of {progress['total']} · {progress['mislabeled']} marked mislabeled · "
    f"{progress['skipped']} skipped",
)

c1, c2, c3, c4 = st.columns(4)
hide = c1.toggle("Hide decided images", value=False, help="Skipped images stay in the queue.")
if c2.button("Undo my last action", icon=":material/undo:", disabled=not reviewer, width="stretch"):
    undone = store.undo(reviewer, idempotency_key=request_key("undo"))
    confirmed("undo")
    st.toast(f"Undid “{undone.decision}” on {undone.sample_id}" if undone else "Nothing of yours to undo")
    st.rerun()
with c3:
    widgets.download_csv(store.decisions_csv(), f"{run.path.name}-review-decisions.csv", "Decisions CSV")
with c4:
    widgets.download_csv(store.corrections_csv(), f"{run.path.name}-corrected-labels.csv", "Corrected labels CSV")
if not reviewer:
    st.info("Type your name above to start reviewing.")

decisions = store.decisions_for(queue_ids)
ranks = np.arange(1, len(queue) + 1)
if hide:
    keep = np.array([decisions.get(i) is None or decisions[i].decision == "skip" for i in queue_ids], bool)
    queue, ranks = queue[keep], ranks[keep]
n_pages = max(1, int(np.ceil(len(queue) / PER_PAGE)))
page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1) if n_pages > 1 else 1
shown, shown_ranks = queue[(page - 1) * PER_PAGE : page * PER_PAGE], ranks[(page - 1) * PER_PAGE : page * PER_PAGE]
if not len(shown):
    st.stop()

# keyboard focus: the suspect chosen with n / p, else the first one on this page without a decision
undecided = [int(p) for p in shown if ids[p] not in decisions]
focus = st.session_state.get("review_focus")
focus = focus if focus in shown else (undecided[0] if undecided else int(shown[0]))
nav = st.columns([1, 1, 4], vertical_alignment="center", gap="small")
step = {"previous": -1, "next": 1}
for col, (name, delta) in zip(nav, step.items(), strict=False):
    with col.container(key=f"review-{name}"):
        if st.button(name.capitalize(), width="stretch", help=f"Keyboard focus to the {name} suspect ({name[0]})"):
            at = list(shown).index(focus)
            st.session_state["review_focus"] = int(shown[min(max(at + delta, 0), len(shown) - 1)])
            st.rerun()
nav[2].caption(
    "Keyboard: **m** mislabeled · **k** keep · **s** skip on the focused suspect (▶), **n** / **p** "
    "next / previous (not while typing in a box)."
)
widgets.keyboard_shortcuts(
    {key: ("review-focus", label) for label, key in DECISIONS.values()}
    | {name[0]: (f"review-{name}", name.capitalize()) for name in step}
)

flags = runs.flags_at(run, shown)
for pos, rank, marks in zip(shown, shown_ranks, flags["marks"], strict=True):
    sid, given, pred = ids[pos], labels[pos], int(pred_probs[pos].argmax())
    current = decisions.get(sid)
    with st.container(border=True, key=f"suspect-{pos}"):
        img, info, action = st.columns([1, 3, 3])
        img.image(widgets.enlarge(runs.images_at(run, "train", [pos])[0], 96), caption=marks or None)
        info.markdown(
            ("▶ " if pos == focus else "") + f"**#{rank}** · `{sid}`  \nGiven label "
            f"**{run.classes[given]}** · model predicts **{run.classes[pred]}** "
            f"({pred_probs[pos, pred]:.0%})  \nScore {scores[signal][pos]:.3g}"
        )
        if current:
            info.markdown(f"{VERDICTS[current.decision].format(current.corrected_label)} by {current.reviewer}")
        others = [c for c in run.classes if c != run.classes[given]]
        if current and current.decision == "mislabeled":
            default, why = current.corrected_label, f"the correction {current.reviewer} recorded"
        elif pred != given:
            default, why = run.classes[pred], "the model's prediction"
        else:
            default, why = others[0], "the first other class (the model agrees with the given label)"
        corrected = action.selectbox(
            "Correct label",
            others,
            index=others.index(default),
            key=f"label-{sid}",
            help=f"Pre-filled with {why}; change it before pressing Mislabeled. Keep and Skip ignore it.",
        )
        buttons = action.container(key="review-focus") if pos == focus else action  # where m / k / s press
        for col, (decision, (label, key)) in zip(buttons.columns(3), DECISIONS.items(), strict=True):
            if col.button(
                label,
                key=f"{decision}-{sid}",
                disabled=not reviewer,
                width="stretch",
                help=f"Shortcut: {key} (on the focused suspect)",
                type="primary" if current and current.decision == decision else "secondary",
            ):
                store.record(sid, decision, reviewer, corrected, idempotency_key=request_key(f"{decision}-{sid}"))
                confirmed(f"{decision}-{sid}")
                st.session_state.pop("review_focus", None)
                st.rerun()
