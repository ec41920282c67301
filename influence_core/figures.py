"""Plotly figures shared by the app's pages and the offline HTML report (:mod:`.html_report`); no Streamlit.

Every figure gets its numbers ready-made (counts, curves): a chart never sends one point per training image.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from .display import GroupedHistogram

COLORS = px.colors.qualitative.Safe


def plotly_text(text: object) -> str:
    """``text`` (a class name, a file name) as Plotly shows it literally: its HTML-like tags (``<b>``, ``<br>``,
    ``<a href=…>``) escaped, and ``%`` too, which hover templates would read as ``%{variable}``."""
    return html.escape(str(text), quote=False).replace("%", "&#37;")


def plotly_texts(texts: Iterable[object]) -> list[str]:
    return [plotly_text(t) for t in texts]


def influence_histogram(h: GroupedHistogram, title: str, x_title: str) -> go.Figure:
    """Ridgeline: one histogram per group on its own row (shared bins and x-axis, each row scaled to its own
    tallest bar), never overlaid colours; one plot area however many groups, so it draws fast."""
    n = len(h.groups)
    totals = h.counts.sum(1) + h.below + h.above
    centres, widths = (h.edges[1:] + h.edges[:-1]) / 2, np.diff(h.edges)
    fig = go.Figure()
    groups = plotly_texts(h.groups)
    for i, (group, counts) in enumerate(zip(groups, h.counts, strict=True)):
        row = n - 1 - i
        fig.add_bar(
            x=centres,
            y=0.9 * counts / max(counts.max(), 1),
            base=row,
            width=widths,
            customdata=counts,
            name=group,
            marker_color=COLORS[i % len(COLORS)],
            hovertemplate=f"{group}<br>%{{x:.3g}}: %{{customdata}} images<extra></extra>",
        )
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_xaxes(range=[h.edges[0], h.edges[-1]], title_text=x_title)
    fig.update_yaxes(
        tickvals=[n - 1 - i for i in range(n)],
        ticktext=[
            f"{g} — {int(t):,} images<br>tallest bar {int(c.max()):,}"
            for g, t, c in zip(groups, totals, h.counts, strict=True)
        ],
        range=[-0.05, n],
        showgrid=False,
    )
    fig.update_layout(title=title, height=160 + 70 * n, showlegend=False, bargap=0)
    return fig


def detection_figure(curves: dict[str, pd.DataFrame], max_points: int = 400) -> go.Figure:
    """Share of flips found vs share of training images inspected (``analysis.detection_curve`` frames by name),
    each curve thinned to ``max_points`` evenly spaced points (its last point kept)."""
    fig = go.Figure()
    for i, (name, d) in enumerate(curves.items()):
        keep = np.unique(np.linspace(0, len(d) - 1, min(len(d), max_points)).round().astype(int))
        fig.add_scatter(
            x=d["inspected"].to_numpy()[keep],
            y=d["found"].to_numpy()[keep],
            mode="lines",
            name=plotly_text(name),
            line_color=COLORS[i % len(COLORS)],
        )
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="random order", line=dict(dash="dot", color="grey"))
    ticks = dict(tickformat=".0%", tickvals=np.linspace(0, 1, 6), range=[-0.01, 1.02])
    fig.update_layout(
        title="Share of flipped labels found<br>vs share of training images inspected",
        xaxis=dict(title="training images inspected", **ticks),
        yaxis=dict(title="flipped labels found", **ticks),
        height=380 + 22 * len(curves),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
    )
    return fig
