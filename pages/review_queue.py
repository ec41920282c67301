"""Mislabel review: a ranked queue of suspected wrong labels; reviewers mark, keep, skip or exclude, shared via SQLite.

The reviewer's name lives in the URL (``?reviewer=``), so a reload or a bookmark keeps it. Each decision
carries an idempotency key made once per button (kept until the store has confirmed it), so a retried click
never stores a decision twice. Keyboard: m / k / s / x decide on the focused suspect (mislabeled, keep, skip,
exclude), after which the focus moves on to the next undecided one; n / p move the focus by hand. Each image
says who decided what and how long ago; another reviewer's decisions show within seconds (the page checks the
store every few seconds and reruns when it changed). Reviewer-facing help: docs/review.md.
"""

import uuid

import numpy as np
import streamlit as st

from influence_core.analysis import SIGNALS, best_signal, rank_suspects
from influence_core.display import ago, plain
from influence_core.fixes import lineage
from influence_core.pipeline import run_signals
from influence_core.review import Action, ReviewStore, focus_after
from pages.ui import fixes, runs, widgets

PER_PAGE = 10
REFRESH_S = 5.0  # how often an open page looks for other reviewers' decisions
DECISIONS = {  # label, shortcut, what it means
    "mislabeled": ("Mislabeled", "m", "The given label is wrong: store the label chosen in the box above."),
    "keep": ("Keep", "k", "The given label is right."),
    "skip": ("Skip", "s", "Not sure yet: leave it for later (it stays in the queue)."),
    "exclude": ("Exclude", "x", "Drop the image from training: ambiguous, neither class, or a broken image."),
}
VERDICTS = {
    "mislabeled": "✗ mislabeled → **{}**",
    "keep": "✓ label kept",
    "skip": "↷ skipped",
    "exclude": "⊘ excluded from training",
}
STEP = {"previous": (-1, "◀ Previous image", "p"), "next": (1, "Next image ▶", "n")}  # delta, label, shortcut


def request_key(action: str) -> str:
    """The idempotency key of the next click on ``action``: the same until the store has confirmed it."""
    return st.session_state.setdefault(f"request-{action}", uuid.uuid4().hex)


def confirmed(action: str) -> None:
    """The click on ``action`` is stored: the next one gets a new key."""
    st.session_state.pop(f"request-{action}", None)


def verdict(action: Action) -> str:
    """E.g. "✗ mislabeled → **dog** by ann, 3 minutes ago" (names and labels as plain text)."""
    what = VERDICTS[action.decision].format(plain(action.corrected_label))
    return f"{what} by {plain(action.reviewer)}, {ago(action.created_at)}"


def move_focus(shown: list[int], at: int, delta: int) -> None:
    st.session_state["review_focus"] = shown[min(max(shown.index(at) + delta, 0), len(shown) - 1)]


@st.fragment(run_every=REFRESH_S)
def follow_other_reviewers(store: ReviewStore, seen: tuple[int, int]) -> None:
    """Rerun the page when anyone recorded or undid a decision since this run drew it."""
    if store.version() != seen:
        st.rerun(scope="app")


run = runs.current_run()
st.title("Mislabel review")
result = None  # until computed, the queue ranks by the signals of training; those of influence join when done
with widgets.errors_shown():
    result = runs.influence_when_ready(run)
store = ReviewStore.for_run(run)
seen = store.version()  # before reading the decisions: a change after this read shows on the next run
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
scores = run_signals(run, result)  # read once per page run (the second pass is looked up on disk)
default = best_signal(scores)
chosen = st.session_state.get("review-signal")  # the reviewer's own pick: kept when signals join the list
signal = c2.selectbox(
    "Rank suspects by",
    list(scores),
    index=list(scores).index(chosen if chosen in scores else default),
    format_func=lambda key: SIGNALS[key].label,
)
st.session_state["review-signal"] = None if signal == default else signal  # no pick: follow the best signal
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

# --- progress and the actions on the whole queue ------------------------------------------------------------
with st.container(key="review-progress"):
    progress = store.progress(queue_ids)
    done = progress["reviewed"]
    st.progress(
        done / max(progress["total"], 1),
        text=f"Reviewed {done} of {progress['total']} · {progress['mislabeled']} marked mislabeled · "
        f"{progress['excluded']} excluded from training · {progress['skipped']} skipped",
    )
c1, c2, c3, c4 = st.columns(4)
hide = c1.toggle(
    "Hide decided images",
    value=lineage(run) is not None,  # a corrected run: carry on where the review left off
    help="Skipped images stay in the queue. On by default in a corrected run, whose queue holds the decisions made "
    "before retraining.",
)
if c2.button("Undo my last action", icon=":material/undo:", disabled=not reviewer, width="stretch"):
    undone = store.undo(reviewer, idempotency_key=request_key("undo"))
    confirmed("undo")
    st.toast(f"Undid “{undone.decision}” on {plain(undone.sample_id)}" if undone else "Nothing of yours to undo")
    st.rerun()
with c3:
    widgets.download_csv(store.decisions_csv(), f"{run.path.name}-review-decisions.csv", "Decisions CSV")
with c4:
    widgets.download_csv(store.corrections_csv(), f"{run.path.name}-corrected-labels.csv", "Corrected labels CSV")
if not reviewer:
    st.info("Type your name above to start reviewing.")

# --- which suspects this page shows -------------------------------------------------------------------------
opinions = store.opinions(queue_ids)  # newest first: [0] is the current decision
decisions = {sid: found[0] for sid, found in opinions.items()}
ranks = np.arange(1, len(queue) + 1)
if hide:
    keep = np.array([decisions.get(i) is None or decisions[i].decision == "skip" for i in queue_ids], bool)
    queue, ranks = queue[keep], ranks[keep]
n_pages = max(1, int(np.ceil(len(queue) / PER_PAGE)))
page = 1
if n_pages > 1:
    page = st.number_input(
        f"Queue page (of {n_pages}, {PER_PAGE} images each)",
        1,
        n_pages,
        1,
        help="Which ten suspects of the queue this page shows, most suspicious first.",
    )
shown = [int(p) for p in queue[(page - 1) * PER_PAGE : page * PER_PAGE]]
shown_ranks = ranks[(page - 1) * PER_PAGE : page * PER_PAGE]
if not shown:
    st.stop()

# --- keyboard focus: the suspect chosen with n / p, moved on after each decision, else the first undecided -----
undecided = [p for p in shown if ids[p] not in decisions]
focus = st.session_state.get("review_focus")
focus = focus if focus in shown else (undecided[0] if undecided else shown[0])
nav = st.columns([1, 1, 4], vertical_alignment="center", gap="small")
for col, (name, (delta, label, key)) in zip(nav, STEP.items(), strict=False):
    with col.container(key=f"review-{name}"):
        st.button(
            label,
            width="stretch",
            on_click=move_focus,
            args=(shown, focus, delta),
            help=f"Moves the keyboard focus (▶) to the {name} image on this page; the queue page stays. "
            f"Shortcut: {key}",
        )
nav[2].caption(
    "Keyboard: **m** mislabeled · **k** keep · **s** skip · **x** exclude on the focused image (▶); the focus then "
    "moves to the next undecided one. **n** / **p** next / previous image (not while typing in a box)."
)

flags = runs.flags_at(run, np.asarray(shown))
for pos, rank, marks in zip(shown, shown_ranks, flags["marks"], strict=True):
    sid, given, pred = ids[pos], labels[pos], int(pred_probs[pos].argmax())
    current = decisions.get(sid)
    with st.container(border=True, key=f"suspect-{pos}"):
        img, info, action = st.columns([1, 2.5, 3.5])
        img.image(widgets.enlarge(runs.images_at(run, "train", [pos])[0], 96), caption=marks or None)
        info.markdown(
            ("▶ " if pos == focus else "") + f"**#{rank}** · {plain(sid)}  \nGiven label "
            f"**{plain(run.classes[given])}** · model predicts **{plain(run.classes[pred])}** "
            f"({pred_probs[pos, pred]:.0%})  \nSuspicion score {scores[signal][pos]:.3g}"
        )
        if current:
            earlier = opinions[sid][1:]
            info.markdown(
                verdict(current)
                + "".join(f"  \nEarlier: {verdict(a)}" for a in earlier)
                + (
                    "  \n*Reviewers disagree; the latest decision counts.*"
                    if any(
                        (a.decision, a.corrected_label) != (current.decision, current.corrected_label) for a in earlier
                    )
                    else ""
                )
            )
        others = [c for c in run.classes if c != run.classes[given]]
        if current and current.decision == "mislabeled":
            default, why = current.corrected_label, f"the correction {plain(current.reviewer)} recorded"
        elif pred != given:
            default, why = run.classes[pred], "the model's prediction"
        else:
            default, why = others[0], "the first other class (the model agrees with the given label)"
        corrected = action.selectbox(
            "Correct label",
            others,
            index=others.index(default),
            key=f"label-{sid}-{current.id if current else 0}",  # a new decision (anyone's) shows its label
            help=f"Pre-filled with {why}; change it before pressing Mislabeled. The other decisions ignore it.",
        )
        buttons = action.container(key="review-focus") if pos == focus else action  # where m / k / s / x press
        for col, (decision, (label, key, meaning)) in zip(buttons.columns(4), DECISIONS.items(), strict=True):
            if col.button(
                label,
                key=f"{decision}-{sid}",
                disabled=not reviewer,
                width="stretch",
                help=f"{meaning} Shortcut: {key} (on the focused image)",
                type="primary" if current and current.decision == decision else "secondary",
            ):
                store.record(sid, decision, reviewer, corrected, idempotency_key=request_key(f"{decision}-{sid}"))
                confirmed(f"{decision}-{sid}")
                st.session_state["review_focus"] = focus_after(shown, pos, undecided)
                st.rerun()

follow_other_reviewers(store, seen)
widgets.keyboard_shortcuts(  # last on the page: a key waits until the page is drawn again
    {key: ("review-focus", label) for label, key, _ in DECISIONS.values()}
    | {key: (f"review-{name}", label) for name, (_, label, key) in STEP.items()}
)
