"""Plotly figures of the pages, in one style (``chart`` draws any figure with the app's template).

Every figure gets its numbers ready-made (counts, curves, tables from ``influence_core``): a chart never sends
one point per training image to the browser, so the pages stay fast on 100,000 training images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from influence_core.display import top_confusions
from influence_core.figures import detection_figure, influence_histogram, plotly_texts

__all__ = ["detection_figure", "influence_histogram"]  # built in the library, also for the offline report

GOOD, BAD = "#1a9850", "#d73027"
MAX_HEATMAP_CLASSES = 20  # above this the confusion view lists the largest confusions instead of a matrix
LOSS_NAMES = {"train_loss": "training loss", "val_loss": "validation loss"}


def chart(fig: go.Figure, key: str | None = None) -> None:
    top = 50 + 20 * str(fig.layout.title.text or "").count("<br>") if fig.layout.title.text else 20
    fig.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=top, b=10))
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


def loss_curve_figure(history: list[dict]) -> go.Figure:
    """Training and validation loss per epoch, with human names in the legend (``history.json`` rows)."""
    df = pd.DataFrame(history).melt("epoch", list(LOSS_NAMES), "curve", "loss").replace({"curve": LOSS_NAMES})
    fig = px.line(
        df,
        x="epoch",
        y="loss",
        color="curve",
        markers=True,
        title="Training and validation loss",
        color_discrete_map={"training loss": "#4477aa", "validation loss": "#ee6677"},
    )
    fig.update_layout(height=420, xaxis_dtick=1, legend=dict(title_text="", orientation="h", y=-0.2))
    return fig


def confusion_figure(matrix: list[list[int]], classes: list[str], k: int = 15) -> go.Figure:
    """The confusion matrix as a heatmap, or with many classes the ``k`` largest confusions as bars."""
    classes = plotly_texts(classes)
    if len(classes) > MAX_HEATMAP_CLASSES:
        top = top_confusions(matrix, classes, k).iloc[::-1]
        fig = go.Figure(
            go.Bar(
                x=top["test images"],
                y=top["true"] + " → " + top["predicted"],
                orientation="h",
                marker_color=BAD,
                customdata=top["share of true class"],
                hovertemplate="%{y}: %{x} test images (%{customdata:.0%} of the true class)<extra></extra>",
            )
        )
        fig.update_layout(
            title=f"Largest confusions (true → predicted), {len(top)} of {len(classes)}² cells",
            xaxis_title="test images",
            height=max(300, 60 + 24 * len(top)),
        )
        return fig
    fig = px.imshow(
        np.asarray(matrix),
        x=classes,
        y=classes,
        text_auto=True,
        color_continuous_scale="Blues",
        labels=dict(x="predicted", y="true", color="test images"),
        title="Confusion matrix (test set)",
    )
    fig.update_xaxes(type="category", side="bottom")
    fig.update_yaxes(type="category")
    fig.update_layout(height=420, coloraxis_showscale=False)
    return fig


def clean_vs_flipped_figure(values: np.ndarray, labels: list[str], flipped: np.ndarray, order: list[str]) -> go.Figure:
    """Box plots of ``values`` (n,) for clean and flipped training points by given label (``order``: labels drawn)."""
    labels, order = plotly_texts(labels), plotly_texts(order)
    df = pd.DataFrame({"label": labels, "mean influence": values, "points": np.where(flipped, "flipped", "clean")})
    df = df[df["label"].isin(order)]
    fig = px.box(
        df,
        x="label",
        y="mean influence",
        color="points",
        points="outliers",
        color_discrete_map={"clean": GOOD, "flipped": BAD},
        category_orders={"label": order, "points": ["clean", "flipped"]},
        title="Mean influence on the test set of clean and flipped training images, by given label",
    )
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_xaxes(type="category")
    fig.update_layout(
        height=420, legend=dict(title_text="", orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right")
    )
    return fig


def saliency_figure(image: np.ndarray, saliency: np.ndarray, overlay: bool = True) -> go.Figure:
    """The training image with its signed saliency map (red: more helpful if brighter, blue: less).

    ``image``: (S, S, 3) uint8; ``saliency``: (S, S). ``overlay``: the map drawn semi-transparent over the image,
    else beside it.
    """
    limit = float(np.abs(saliency).max()) or 1.0
    heat = dict(z=saliency, colorscale="RdBu_r", zmin=-limit, zmax=limit, colorbar=dict(len=0.9, thickness=12))
    if overlay:
        fig = go.Figure([go.Image(z=image), go.Heatmap(**heat, opacity=0.5)])
        fig.update_yaxes(autorange="reversed", scaleanchor="x")
    else:
        fig = make_subplots(1, 2, subplot_titles=("training image", "saliency"), horizontal_spacing=0.06)
        fig.add_trace(go.Image(z=image), 1, 1)
        fig.add_trace(go.Heatmap(**heat), 1, 2)
        fig.update_yaxes(autorange="reversed", scaleanchor="x2", row=1, col=2)
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False)
    fig.update_layout(height=320)
    return fig
