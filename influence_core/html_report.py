"""A report of a run that travels: one self-contained HTML file that opens offline in any browser.

plotly's JavaScript is inlined once in the head, every figure is a ``<div>`` drawn by it, and images are small
PNG thumbnails embedded as base64 ``data:`` URIs, so the file makes no network request. Sections: the run (data,
model, accuracy), the detection of flipped labels and its curve, the top suspects with their review decisions,
a few test images with their influence histogram and most helpful / harmful training images, the retraining
checks (:mod:`.counterfactual`) and, for a child run with corrected labels, the before / after comparison
(:mod:`influence_core.compare`). A 1,000-image run gives about 5 MB, most of it plotly.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from . import counterfactual as cf
from .analysis import SIGNALS, detection_curve, detection_metrics, rank_suspects
from .compare import compare_runs
from .data import parse_spec
from .display import grouped_histogram, label_groups
from .errors import InfluenceLensError
from .figures import detection_figure, influence_histogram
from .fixes import lineage
from .paths import RunPaths
from .pipeline import DEFAULT_SETTINGS, InfluenceResult, cached_results, load_influence
from .run import Run
from .storage import atomic_write_bytes

THUMB_PX = 64
"""Side of an embedded thumbnail in pixels (smaller images are enlarged with sharp pixels, larger ones shrunk)."""
N_SUSPECTS = 24
N_TESTS = 4
N_RANKED = 8

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.tile{width:120px;font-size:11px;line-height:1.3}
.tile img{width:96px;height:96px;image-rendering:pixelated;display:block}
.note{color:#555;font-size:13px}.bad{color:#b2182b}.good{color:#1a9850}
"""


def html_report(run: Run, result: InfluenceResult | None = None) -> str:
    """The report of ``run`` as one HTML document; ``result``: the influence entry to show (default: the default
    settings' entry, else the newest one; without any, the influence sections say that none was computed)."""
    result = result or load_influence(run, DEFAULT_SETTINGS) or next(iter(cached_results(run)), None)
    sections = [_run_section(run)]
    if result is None:
        sections.append(_p("No influences were computed for this run yet, so there is nothing more to report."))
    else:
        sections += [_detection_section(result), _suspects_section(result), _tests_section(result)]
    sections.append(_checks_section(run))
    sections.append(_lineage_section(run))
    from plotly.offline import get_plotlyjs

    name = html.escape(run.path.name)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Influence Lens report: {name}</title>'
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>Influence Lens report: {name}</h1>{''.join(sections)}</body></html>"
    )


def write_html_report(run: Run, path: str | Path) -> Path:
    """Write :func:`html_report` of ``run`` to ``path`` (atomically) and return it."""
    path = Path(path)
    if path.is_dir():
        raise InfluenceLensError(f"{path} is a folder.", "give a file name such as report.html")
    atomic_write_bytes(path, html_report(run).encode())
    return path


# --- sections --------------------------------------------------------------------------------------------------
def _run_section(run: Run) -> str:
    cfg, m = run.config, run.metrics
    n = run.samples["split"].value_counts()
    weights = "ImageNet-pretrained" if cfg["weights"] == "pretrained" else "trained from scratch"
    layers = "only the last layer trained" if cfg["train_layers"] == "head" else "whole network trained"
    classes = ", ".join(run.classes[:20]) + (f" and {run.n_classes - 20} more" if run.n_classes > 20 else "")
    rows = {
        "Data": f"{_dataset(cfg['dataset'])}: {run.n_classes} classes ({classes})",
        "Images": f"{n.get('train', 0)} train / {n.get('val', 0)} validation / {n.get('test', 0)} test at "
        f"{cfg['image_size']} px",
        "Model": f"ResNet18, {weights}, {layers}, {cfg['epochs']} epochs",
        "Test accuracy": f"{m['accuracy_test']:.3f} (macro F1 {m['f1_test']:.3f})",
        "Training labels flipped on purpose": f"{int(run.flipped().sum())} of {len(run.flipped())}",
    }
    return "<h2>The run</h2>" + _table(pd.DataFrame({"": list(rows), " ": list(rows.values())}), header=False)


def _dataset(spec: str) -> str:
    """The dataset's kind and folder name, without the folder's place on this machine (``tiny-imagenet-200``)."""
    kind, path = parse_spec(spec)
    return f"{kind} ({Path(path).name})" if path else kind


def _detection_section(result: InfluenceResult) -> str:
    run, signals = result.run, result.signals
    flipped = run.flipped()
    best = result.best_signal
    if not flipped.any():
        return "<h2>Finding wrong labels</h2>" + _p(
            f"No training label was flipped on purpose in this run, so how well wrong labels are found cannot be "
            f"measured here. The suspects below are ranked by “{SIGNALS[best].label}”."
        )
    metrics = {k: detection_metrics(v, flipped) for k, v in signals.items()}
    table = pd.DataFrame(
        {
            "signal": [SIGNALS[k].label + (" (used)" if k == best else "") for k in metrics],
            "flips found in the top 10 %": [f"{v['recall_at_10pct']:.0%}" for v in metrics.values()],
            "chance a flip ranks above a clean image": [f"{v['auroc']:.3f}" for v in metrics.values()],
        }
    )
    curves = {SIGNALS[k].label: detection_curve(signals[k], flipped) for k in signals}
    return (
        "<h2>Finding wrong labels</h2>"
        + _p(
            f"{int(flipped.sum())} training labels were flipped on purpose. Inspecting the training images in the "
            f"order of “{SIGNALS[best].label}” finds {metrics[best]['recall_at_10pct']:.0%} of them in the first "
            "10 %."
        )
        + _table(table)
        + _figure(detection_figure(curves))
    )


def _suspects_section(result: InfluenceResult) -> str:
    run = result.run
    best = result.best_signal
    order = rank_suspects(result.signals[best], N_SUSPECTS)
    ids, labels, true = run.ids("train"), run.labels("train"), run.true_labels("train")
    decisions = _decisions(run, [ids[p] for p in order])
    captions = []
    for p in order:
        text = f"labelled {run.classes[labels[p]]}"
        if run.flipped()[p]:
            text += f' · <span class="bad">really {html.escape(run.classes[true[p]])} ✗</span>'
        if ids[p] in decisions:
            text += f" · reviewed: {html.escape(decisions[ids[p]])}"
        captions.append(text)
    return (
        f"<h2>Most suspicious training images</h2>{_p(f'Ranked by “{SIGNALS[best].label}”; review decisions under each image.')}"
        + _grid(run.images("train")[order], captions, escape=False)
    )


def _tests_section(result: InfluenceResult) -> str:
    run = result.run
    true, probs = run.labels("test"), run.predictions["probs_test"]
    pred = probs.argmax(1)
    train_labels = run.labels("train")
    parts = ["<h2>What the model learned from, for a few test images</h2>"]
    for t in chosen_tests(run):
        row = result.row(t)
        codes, groups = label_groups(
            train_labels, run.classes, [(int(true[t]), "this test image's label"), (int(pred[t]), "predicted")]
        )
        verdict = "✓" if true[t] == pred[t] else "✗"
        parts.append(
            f"<h3>Test image #{t}: labelled {html.escape(run.classes[true[t]])}, predicted "
            f"{html.escape(run.classes[pred[t]])} ({probs[t].max():.0%}) {verdict}</h3>"
        )
        parts.append(_grid(run.images("test")[[t]], [html.escape(run.ids("test")[t])], escape=False))
        fig = influence_histogram(
            grouped_histogram(row, codes, groups),
            "Influence of every training image on this test image, by training label",
            "influence on this test image",
        )
        parts.append(_figure(fig))
        for title, positions in (
            ("Most helpful training images", result.top_helpful(t, N_RANKED)[0]),
            ("Most harmful training images", result.top_harmful(t, N_RANKED)[0]),
        ):
            captions = [
                f"influence {row[p]:+.3g} · trained as {run.classes[train_labels[p]]}"
                + (" · flipped on purpose" if run.flipped()[p] else "")
                for p in positions
            ]
            parts.append(f"<h4>{title}</h4>" + _grid(run.images("train")[positions], captions))
    parts.append(
        _p(
            "Influence of a training image on a test image: positive = it helped the model get the test image right "
            "(removing it would raise the test loss), negative = it pushed the prediction the wrong way."
        )
    )
    return "".join(parts)


def chosen_tests(run: Run, n: int = N_TESTS) -> list[int]:
    """Test positions the report shows: those with retraining checks first, then wrong predictions, then right
    ones, at most ``n``."""
    true, pred = run.labels("test"), run.predictions["probs_test"].argmax(1)
    checked = [c.test for c in cf.checks(run)]
    wrong, right = np.flatnonzero(true != pred).tolist(), np.flatnonzero(true == pred).tolist()
    return list(dict.fromkeys([*checked, *wrong[: n // 2], *right, *wrong]))[:n]


def _checks_section(run: Run) -> str:
    found = cf.checks(run)
    head = "<h2>Retraining checks</h2>"
    if not found:
        return head + _p(
            "No ranking was checked by retraining yet (the explorer's “Check” button, or influence-core check)."
        )
    frame = cf.table(found, run.classes).round(3)
    notes = sorted({c.units_note for c in found if c.units_note})
    return (
        head
        + _p(f"{cf.summary(found)}.")
        + _p(
            "Each check removed a test image's most helpful (or most harmful) training images, or as many random "
            "ones of the same labels, trained the run's recipe again and looked at the test image's prediction. "
            "Loss in nats; margin = score of the test image's label minus the best other score."
        )
        + _table(frame)
        + "".join(_p(n) for n in notes)
    )


def _lineage_section(run: Run) -> str:
    """Before / after for a child run with corrected labels (:mod:`influence_core.fixes`); empty for other runs."""
    record = lineage(run)
    if record is None:
        return ""
    head = "<h2>Before and after the corrections</h2>"
    try:
        found = compare_runs(run)
    except InfluenceLensError as e:
        return head + _p(f"The run it was made from cannot be compared here: {e.problem}")
    before, after = found["before"], found["after"]
    rows = []
    for key, name in (("accuracy", "test accuracy"), ("f1", "macro F1")):
        d = found["difference"][key]
        rows.append(
            {
                "": name,
                "before": f"{d['before']:.3f}",
                "after": f"{d['after']:.3f}",
                "change (95 % interval)": f"{d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})",
            }
        )
    changes = found.get("changes") or {}
    text = (
        f"{after['name']} was trained from {before['name']} with "
        f"{changes.get('relabelled', record.get('relabelled', 0))} labels corrected and "
        f"{changes.get('excluded', record.get('excluded', 0))} images left out. On the same test images "
        f"{len(found.get('fixed', []))} predictions became right and {len(found.get('broken', []))} became wrong."
    )
    per_class = pd.DataFrame(found.get("per_class", [])).round(3)
    return head + _p(text) + _table(pd.DataFrame(rows)) + (_table(per_class) if len(per_class) else "")


# --- building blocks -------------------------------------------------------------------------------------------
def _decisions(run: Run, ids: list[str]) -> dict[str, str]:
    """Sample id → its current review decision (the store is read only when it exists)."""
    if not RunPaths(run.path).reviews.is_file():
        return {}
    from .review import ReviewStore

    return {sid: a.decision for sid, a in ReviewStore.for_run(run).decisions_for(ids).items()}


def thumbnail(image: np.ndarray, size: int = THUMB_PX) -> str:
    """A ``data:image/png;base64,...`` URI of a ``(S, S, 3)`` uint8 image resized to ``size`` pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.Resampling.NEAREST).save(
        buf, "PNG", optimize=True
    )
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid(images, captions: list[str], escape: bool = True) -> str:
    tiles = [
        f'<div class="tile"><img src="{thumbnail(img)}" alt="">{html.escape(c) if escape else c}</div>'
        for img, c in zip(images, captions, strict=True)
    ]
    return f'<div class="grid">{"".join(tiles)}</div>'


def _figure(fig: go.Figure) -> str:
    fig.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=70, b=10))
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _table(df: pd.DataFrame, header: bool = True) -> str:
    return df.to_html(index=False, header=header, border=0, na_rep="—", escape=True)


def _p(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'
