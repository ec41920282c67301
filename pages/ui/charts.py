"""Plotly figures of the pages, in one style (``chart`` draws any figure with the app's template)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

COLORS = px.colors.qualitative.Safe
GOOD, BAD = "#1a9850", "#d73027"


def chart(fig: go.Figure, key: str | None = None) -> None:
    fig.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=50 if fig.layout.title.text else 20, b=10))
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


def influence_histogram(values: np.ndarray, labels: list[str], title: str, x_title: str) -> go.Figure:
    """Overlaid histograms of ``values`` coloured by training label."""
    df = pd.DataFrame({x_title: values, "training label": labels})
    fig = px.histogram(df, x=x_title, color="training label", barmode="overlay", nbins=60, opacity=0.65,
                       title=title, color_discrete_sequence=COLORS,
                       category_orders={"training label": sorted(set(labels), key=_natural)})
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_layout(yaxis_title="training images", height=380, legend_title_text="training label")
    return fig


def _natural(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> go.Figure:
    fig = px.imshow(np.asarray(matrix), x=classes, y=classes, text_auto=True, color_continuous_scale="Blues",
                    labels=dict(x="predicted", y="true", color="test images"), title="Confusion matrix (test set)")
    fig.update_xaxes(type="category", side="bottom")
    fig.update_yaxes(type="category")
    fig.update_layout(height=420, coloraxis_showscale=False)
    return fig


def saliency_figure(image: np.ndarray, saliency: np.ndarray, title: str) -> go.Figure:
    """The training image beside its signed saliency map (red: more helpful if brighter, blue: less)."""
    from plotly.subplots import make_subplots

    limit = float(np.abs(saliency).max()) or 1.0
    fig = make_subplots(1, 2, subplot_titles=("training image", "saliency (perturbation influence)"),
                        horizontal_spacing=0.08)
    fig.add_trace(go.Image(z=image), 1, 1)
    fig.add_trace(go.Heatmap(z=saliency, colorscale="RdBu_r", zmin=-limit, zmax=limit, colorbar=dict(len=0.9)),
                  1, 2)
    fig.update_yaxes(autorange="reversed", scaleanchor="x2", row=1, col=2)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=70, b=10))
    return fig
