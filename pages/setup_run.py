"""Data & model: the current run's data, training and test quality; train a new run, open one, tune influence."""

import os

import numpy as np
import pandas as pd
import streamlit as st

from influence_core import TrainConfig, available_classes
from influence_core.data import DEFAULT_FASHION_MNIST
from influence_core.errors import InfluenceLensError
from influence_core.influence import Curvature, Damping, Scope, default_damping
from influence_core.measured import method_label
from influence_core.paths import RunPaths
from influence_core.pipeline import DEFAULT_SETTINGS, METHOD_CHOICES, InfluenceSettings, parse_settings
from influence_core.training import RECOMMENDED_EPOCHS
from pages.ui import charts, runs, state, widgets

DATASETS = {
    "Demo: handwritten digits (bundled)": "demo",
    "Tiny ImageNet folder": "tiny-imagenet",
    "Image folder (one sub-folder per class)": "folder",
    "Fashion-MNIST (IDX files)": "fashion-mnist",
}
DEFAULT_PATHS = {
    "tiny-imagenet": os.environ.get("TINY_IMAGENET", "../shared/data/tiny-imagenet-200"),
    "folder": "",
    "fashion-mnist": DEFAULT_FASHION_MNIST,
}
SAMPLE_CLASSES = 10  # classes whose sample images are shown at first (the others through a searchable picker)
# the dampings offered besides the scope's default (None); no bare strings here: Streamlit's magic would show them
DAMPINGS = [
    *(Damping.relative_to_top(v) for v in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)),
    *(Damping.absolute(v) for v in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)),
    *(Damping.relative(v) for v in (1e-3, 1e-2, 1e-1, 1.0)),
]


def damping_choice(settings: InfluenceSettings) -> int:
    """Index in ``[None, *DAMPINGS]`` for ``settings``: 0 (the scope's default) when they use it, else the offered
    damping closest to theirs, of the same kind."""
    current = settings.damping
    if current == default_damping(settings.scope):
        return 0
    return 1 + min(
        range(len(DAMPINGS)),
        key=lambda i: (DAMPINGS[i].relative_to != current.relative_to, abs(np.log(DAMPINGS[i].value / current.value))),
    )


@st.cache_data(show_spinner="Listing classes…")
def classes_of(spec: str) -> list[tuple[str, str]]:
    return available_classes(spec)


run = runs.current_run()  # first: on a fresh server's first link this runs the page inside app.py
st.title("Data & model")
current, new, open_dir, influence_tab = st.tabs(
    ["This run", "Train a new run", "Open a run directory", "Influence settings"]
)

# --- the current run ------------------------------------------------------------------------------------
with current:
    st.markdown(runs.describe_run(run))
    if run.config["weights"] == "pretrained":
        st.success("The backbone started from ImageNet-pretrained weights (a local file).", icon=":material/check:")
    else:
        st.warning(
            "No local ImageNet weights were found, so the network was trained from scratch.", icon=":material/info:"
        )
    cols = st.columns(4)
    cols[0].metric("Test F1 (macro)", f"{run.metrics['f1_test']:.3f}")
    cols[1].metric("Test accuracy", f"{run.metrics['accuracy_test']:.1%}")
    cols[2].metric("Flipped training labels", int(run.flipped().sum()))
    cols[3].metric("Seconds per epoch", f"{run.metrics['epoch_seconds']:.1f}")

    st.subheader("Sample images per class")
    shown = list(range(run.n_classes))
    if run.n_classes > SAMPLE_CLASSES:
        shown = st.multiselect(
            f"Classes to show (type to search; {run.n_classes} in all)",
            shown,
            default=shown[:SAMPLE_CLASSES],
            format_func=lambda c: run.classes[c],
        )
    train_true, images = run.true_labels("train"), run.images("train")
    for start in range(0, len(shown), 2):
        cols = st.columns(2)
        for c, col in zip(shown[start : start + 2], cols, strict=False):
            with col:
                st.markdown(f"**{run.classes[c]}**")
                picks = np.flatnonzero(train_true == c)[:6]
                st.image([widgets.enlarge(images[p], 64) for p in picks])

    left, right = st.columns(2)
    with left:
        charts.chart(charts.loss_curve_figure(run.history), key="loss")
    with right:
        charts.chart(charts.confusion_figure(run.metrics["confusion_matrix"], run.classes), key="confusion")

# --- train a new run ------------------------------------------------------------------------------------
with new:
    kind = DATASETS[st.radio("Dataset", list(DATASETS), horizontal=True)]
    spec = kind
    if kind != "demo":
        path = st.text_input("Dataset folder", DEFAULT_PATHS[kind], key=f"path-{kind}")
        spec = f"{kind}:{path}"
    offered = []
    with widgets.errors_shown():
        offered = classes_of(spec)
    names = dict(offered)
    picked = st.multiselect(
        f"Classes (type to search; empty = all {len(offered)})",
        list(names),
        format_func=lambda key: names[key] if names[key] == key else f"{names[key]} ({key})",
        default=list(names)[:2] if kind == "tiny-imagenet" else None,
    )
    c1, c2, c3, c4 = st.columns(4)
    val = c1.number_input("Validation fraction", 0.05, 0.4, 0.1, 0.05)
    test = c2.number_input("Test fraction", 0.05, 0.4, 0.1, 0.05)
    downsample = c3.slider("Use this share of the images", 0.05, 1.0, 1.0, 0.05)
    size = c4.select_slider("Image size (px)", [16, 32, 64], 32 if kind != "tiny-imagenet" else 64)
    c1, c2, c3 = st.columns(3)
    layers = c1.radio(
        "Train",
        ["all", "head"],
        horizontal=True,
        format_func={"all": "the whole network", "head": "only the last layer"}.get,
    )
    epochs = c2.slider(
        "Epochs",
        1,
        30,
        RECOMMENDED_EPOCHS,
        help=f"Wrong labels were found best at {RECOMMENDED_EPOCHS} epochs on the tiny-imagenet runs tested; "
        "fewer train faster and find fewer wrong labels.",
    )
    corrupt = c3.slider("Flip this share of training labels (to test detection)", 0.0, 0.4, 0.1, 0.05)
    config = TrainConfig(
        dataset=spec,
        classes=picked or None,
        image_size=size,
        split=(1 - val - test, val, test),
        downsample=downsample,
        epochs=epochs,
        train_layers=layers,
        corrupt_fraction=corrupt,
    )
    target = runs.run_dir_for(config)
    st.caption(
        f"New run: `{runs.run_ref(target)}`"
        + (" — already trained, opens at once" if RunPaths(target).train_key.is_file() else "")
    )
    if st.button("Train and compute influences", type="primary", disabled=not offered):
        with widgets.errors_shown():
            runs.start_training(config, f"Training {runs.run_ref(target)}", target, then=state.settings())
            runs.select_run(target)
            st.rerun()

# --- open a run computed elsewhere ----------------------------------------------------------------------
with open_dir:
    st.markdown(
        "Open a run directory written by `influence-core train` or by this app on another machine. "
        f"It must lie in the runs folder (`{runs.RUNS_ENV}`) or in one of the folders listed in "
        f"`{runs.EXTRA_ROOTS_ENV}` when the server started."
    )
    folder = st.text_input("Run directory", placeholder="a folder name in the runs folder, or its full path")
    if st.button("Open run", disabled=not folder):
        with widgets.errors_shown():
            runs.select_run(runs.open_run_folder(folder).path)
            st.rerun()

# --- influence settings ---------------------------------------------------------------------------------
with influence_tab:
    s = state.settings()
    c1, c2, c3, c4 = st.columns(4)
    scope = c1.radio(
        "Parameters",
        list(Scope),
        index=list(Scope).index(s.scope) if isinstance(s.scope, Scope) else 0,
        format_func={Scope.HEAD: "last layer", Scope.ALL: "whole network"}.get,
    )
    method = c2.selectbox(
        "Method",
        METHOD_CHOICES,
        index=METHOD_CHOICES.index(s.method.name),
        format_func=lambda m: method_label(m, scope.value),
        help="direct: exact inverse (small scopes); cg / lissa: iterative; arnoldi: low rank; "
        "kfac / ekfac: Kronecker-factored approximations. LDS: the linear datamodeling score measured by "
        "benchmarks/lds.py (correlation with models retrained on random halves of the data; higher is better).",
    )
    lam = c3.selectbox(
        "Damping λ",
        [None, *DAMPINGS],
        index=damping_choice(s),
        format_func=lambda d: f"default: {default_damping(scope).describe()}" if d is None else d.describe(),
        help="λ added to the curvature: relative to its largest eigenvalue (per layer for kfac / ekfac, where "
        "the whole network's layers differ by orders of magnitude), absolute, or relative to its mean eigenvalue "
        "(Kronfluence's heuristic; refused where float32 cannot resolve it). The defaults had the best linear "
        "datamodeling score of the scan in benchmarks/lds_methods.py.",
    )
    curvature = c4.radio("Curvature", list(Curvature), index=list(Curvature).index(s.curvature))
    options = st.text_input(
        "Method options",
        value=" ".join(f"{k}={v}" for k, v in s.method.options().items()) if method == s.method.name else "",
        placeholder="the method's defaults; e.g. fit_examples=512 rank=1024 for kfac",
        help="KEY=VALUE pairs separated by spaces (none for None), as `influence-core influence --option`. The "
        "LDS shown beside each method is measured at its defaults.",
    )
    try:
        chosen: InfluenceSettings | None = parse_settings(method, options.split(), scope, lam, curvature)
    except InfluenceLensError as e:
        widgets.show_error(e)
        chosen = None
    if chosen is not None:
        cached = runs.cached_influence(run, chosen) is not None
        st.caption(
            f"{chosen.describe()} — {'cached for this run' if cached else 'not computed yet for this run'}"
            + (" (the default)" if chosen == DEFAULT_SETTINGS else "")
        )
        st.caption(chosen.accuracy_note())
        if st.button(
            "Use these settings" + ("" if cached else " and compute"), type="primary", disabled=chosen == s and cached
        ):
            st.session_state["settings"] = chosen  # every page now uses them (and waits for them while computed)
            with widgets.errors_shown():
                runs.influence(run, chosen)
                st.rerun()
    result = runs.cached_influence(run)
    if result is not None:
        timings = pd.DataFrame(sorted(result.meta["timings_s"].items()), columns=["step", "seconds"])
        with st.expander(f"Timings of the current influence result ({state.settings().describe()})"):
            widgets.table(timings, f"{run.path.name}-influence-timings.csv")
