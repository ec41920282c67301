"""The numbers behind the app's charts (influence_core.display) and the chart functions that draw them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from influence_core.display import (
    ALL,
    OTHERS,
    check_notebook_claim,
    grouped_histogram,
    label_groups,
    stage_words,
    top_confusions,
)
from pages.ui import charts


def test_histogram_range_leaves_out_a_few_huge_values_and_counts_them():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(10_000), [5_000.0, -8_000.0, 9_000.0]])
    codes = np.arange(len(values)) % 2
    h = grouped_histogram(values, codes, ["a", "b"])
    assert h.edges[-1] < 10 and h.edges[0] > -10  # the three outliers do not stretch the x-range
    assert (h.above.sum(), h.below.sum()) == (2, 1)
    assert h.counts.sum() + h.n_outside == len(values)
    assert list(h.counts.sum(1) + h.below + h.above) == [np.sum(codes == 0), np.sum(codes == 1)]
    assert "3 extreme values" in h.outliers_note() and "2 above" in h.outliers_note()


def test_histogram_keeps_everything_without_outliers_and_shows_zero():
    values = np.linspace(1.0, 2.0, 500)
    h = grouped_histogram(values, np.zeros(500, int), ["only"])
    assert h.n_outside == 0 and h.outliers_note() == ""
    assert h.edges[0] == 0.0 and h.edges[-1] == 2.0  # 0 (helpful/harmful border) always in range


def test_label_groups_feature_own_and_predicted_label_and_pool_the_rest():
    classes = [f"c{i}" for i in range(200)]
    labels = np.arange(1000) % 200
    codes, names = label_groups(labels, classes, [(7, "this test image's label"), (3, "predicted")])
    assert names == ["c7 (this test image's label)", "c3 (predicted)", OTHERS]
    assert list(np.bincount(codes)) == [5, 5, 990]
    codes, names = label_groups(labels, classes, [(7, "own"), (7, "predicted")])  # right prediction: one group
    assert names == ["c7 (own)", OTHERS]
    codes, names = label_groups(labels, classes, [])
    assert names == [ALL] and set(codes) == {0}


def test_top_confusions_lists_the_largest_off_diagonal_cells():
    m = np.diag([50, 40, 30, 20])
    m[0, 2], m[3, 1], m[1, 0] = 9, 4, 7
    top = top_confusions(m, ["a", "b", "c", "d"], k=10)
    assert list(zip(top["true"], top["predicted"], top["test images"], strict=True)) == [
        ("a", "c", 9),
        ("b", "a", 7),
        ("d", "b", 4),
    ]
    assert np.isclose(top["share of true class"].iloc[0], 9 / 59)


def test_confusion_view_switches_to_top_confusions_with_many_classes():
    classes = [f"c{i}" for i in range(200)]
    m = np.eye(200, dtype=int) * 5
    m[np.arange(200), (np.arange(200) + 1) % 200] = np.arange(200) % 7
    fig = charts.confusion_figure(m.tolist(), classes, k=15)
    assert len(fig.data) == 1 and fig.data[0].type == "bar" and len(fig.data[0].y) == 15
    assert charts.confusion_figure(np.eye(10, dtype=int).tolist(), classes[:10]).data[0].type == "heatmap"


def test_loss_curve_legend_uses_human_names():
    fig = charts.loss_curve_figure(
        [
            {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "seconds": 1.0},
            {"epoch": 2, "train_loss": 1.0, "val_loss": 1.5, "seconds": 1.0},
        ]
    )
    assert {t.name for t in fig.data} == {"training loss", "validation loss"}


def test_detection_chart_ends_at_100_percent_with_the_legend_below():
    n = 10_000
    curve = pd.DataFrame({"inspected": np.arange(1, n + 1) / n, "found": np.linspace(0, 1, n)})
    fig = charts.detection_figure({"signal": curve})
    assert fig.layout.xaxis.tickvals[-1] == 1.0 and fig.layout.xaxis.range[1] >= 1.0
    assert fig.layout.legend.y < 0  # under the plot, not over the curves
    assert len(fig.data[0].x) <= 400 and fig.data[0].x[-1] == 1.0


def test_the_claims_implication_never_contradicts_the_verdict():
    """With random flips the page says where the signal was near chance elsewhere and where not; a run where the
    claim held is told it held here but not everywhere, one where it failed is not told it was above chance."""
    table = pd.DataFrame({"n_clean": [40, 40], "n_corrupted": [5, 5], "difference": [0.5, 0.4]})
    held = check_notebook_claim(table, 0.81, "random")
    failed = check_notebook_claim(table.assign(difference=[-0.1, -0.2]), 0.52, "random")
    assert (held.verdict, failed.verdict) == ("held", "did not hold")
    assert "above chance" in held.implication() and "It is not always" in held.implication()
    assert "depended on the training" in failed.implication() and "above chance" not in failed.implication()
    assert "by construction" in check_notebook_claim(table, 0.9, "top-influence").implication()


def test_plain_text_shows_markdown_as_typed():
    """Issue 29: a reviewer named ``**bold** [x](javascript:…)`` became bold text and a link."""
    import re

    from influence_core.display import plain

    shown = plain("**bold** [x](javascript:alert(1))\n# big")
    assert not re.search(r"(?<!\\)[*\[\]()#:]", shown)  # every Markdown character escaped
    assert re.sub(r"\\(.)", r"\1", shown) == "**bold** [x](javascript:alert(1)) # big"  # and shown as typed


def test_export_csv_neutralises_formulas_in_text_cells_and_headers_only():
    import io

    from influence_core.display import export_csv

    df = pd.DataFrame({"=sum": ["=1+1", "+x", "-y", "@z", "\tt", "\rr", "ok"], "value": [-1.5, 2, 3, 4, 5, 6, 7]})
    back = pd.read_csv(io.StringIO(export_csv(df)), keep_default_na=False)
    assert list(back.columns) == ["'=sum", "value"]
    assert back["'=sum"].tolist() == ["'=1+1", "'+x", "'-y", "'@z", "'\tt", "'\rr", "ok"]
    assert back["value"].tolist() == [-1.5, 2, 3, 4, 5, 6, 7]  # negative numbers stay numbers


def test_ago_says_how_long_ago_in_words():
    from datetime import UTC, datetime, timedelta

    from influence_core.display import ago

    now = datetime(2030, 1, 10, 12, tzinfo=UTC)
    before = {s: (now - timedelta(seconds=s)).isoformat() for s in (5, 60, 180, 7_200, 86_400, 5 * 86_400)}
    assert [ago(t, now) for t in before.values()] == [
        "just now",
        "1 minute ago",
        "3 minutes ago",
        "2 hours ago",
        "yesterday",
        "5 days ago",
    ]


def test_dataset_names_and_captions_never_show_a_server_path_or_wrap_mid_name():
    """Issue 29 item 20: Overview's heading showed the raw spec (a server path); long ids wrapped mid-name."""
    from influence_core.display import dataset_name, short_id

    assert dataset_name("tiny-imagenet:/srv/data/tiny-imagenet-200") == "Tiny ImageNet"
    assert dataset_name("folder:/srv/data/pets/") == "image folder “pets”"
    assert dataset_name("demo") == "handwritten digits (demo)"
    long = "n01443537/images/n01443537_123456.JPEG"
    assert len(short_id(long)) == 18 and short_id(long).endswith(".JPEG") and short_id(long).startswith("n0144")
    assert short_id("n01443537/images/7.JPEG") == "7.JPEG" and short_id("digits:12") == "digits:12"


def test_claim_verdicts_are_plain_words_with_the_figure_apart():
    """Issue 29 item 18: the verdict said "AUROC 0.81" and named "the reference notebook"."""
    table = pd.DataFrame({"n_clean": [5, 5], "n_corrupted": [1, 1], "difference": [0.1, 0.2]})
    held = check_notebook_claim(table, 0.81, "random")
    for text in (held.summary(), held.implication()):
        assert "AUROC" not in text and "notebook" not in text and "2026" not in text
    assert "clearly better than guessing" in held.summary() and "AUROC 0.81" in held.figures()


def test_stage_words_name_checkpoints_and_stages_in_plain_words():
    """Guards the progress bars' words: checkpoint tags and engine stages become words, others stay."""
    assert stage_words("epoch_4: features") == "model after epoch 4: gradients of the training images"
    assert stage_words("final: self-influence") == "final model: each training image's influence on itself"
    assert stage_words("epoch 3/15") == "epoch 3/15" and stage_words("clean run: epoch 2/3") == "clean run: epoch 2/3"
