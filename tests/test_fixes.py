"""Closing the loop: review decisions → a corrected child run → before / after → exports (real tiny-imagenet)."""

from __future__ import annotations

import json
import shutil
import threading
import uuid

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from influence_core import TrainConfig, train
from influence_core.cli import main
from influence_core.compare import compare_runs, macro_f1, paired_difference
from influence_core.data import load_dataset
from influence_core.errors import InfluenceLensError
from influence_core.export import MANIFEST, export_corrected, label_issues
from influence_core.fixes import (
    apply_reviews,
    decisions_since,
    default_child_dir,
    import_decisions,
    lineage,
    parent_of,
    pending_changes,
)
from influence_core.html_report import html_report
from influence_core.paths import RunPaths
from influence_core.review import ReviewedData, ReviewStore
from influence_core.run import Run

pytestmark = pytest.mark.slow  # trains small ResNet18s on real images


def _key() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_imagenet) -> Run:
    """goldfish vs lemon, 15 % of the images at 16 px, 1 epoch, 10 % of the labels flipped."""
    config = TrainConfig(
        dataset=f"tiny-imagenet:{tiny_imagenet}",
        classes=["goldfish", "lemon"],
        downsample=0.15,
        image_size=16,
        epochs=1,
        corrupt_fraction=0.1,
        n_checkpoints=0,
    )
    return train(config, tmp_path_factory.mktemp("fixes") / "parent")


@pytest.fixture(scope="module")
def decided(parent) -> dict[str, str]:
    """Decisions on the parent: two flipped images corrected, one clean image excluded, one kept, one skipped."""
    store = ReviewStore.for_run(parent)
    train = parent.part("train")
    flipped = train[train["flipped"]]
    clean = train[~train["flipped"]]
    ids = {
        "fixed_a": flipped["id"].iloc[0],
        "fixed_b": flipped["id"].iloc[1],
        "excluded": clean["id"].iloc[0],
        "kept": clean["id"].iloc[1],
        "skipped": clean["id"].iloc[2],
    }
    for name in ("fixed_a", "fixed_b"):
        true = parent.classes[int(flipped["true_label"].iloc[0 if name == "fixed_a" else 1])]
        store.record(ids[name], "mislabeled", "Ana", true, idempotency_key=_key())
    store.record(ids["excluded"], "exclude", "Ana", idempotency_key=_key())
    store.record(ids["kept"], "keep", "Ben", idempotency_key=_key())
    store.record(ids["skipped"], "skip", "Ben", idempotency_key=_key())
    return ids


@pytest.fixture(scope="module")
def child(parent, decided) -> Run:
    return apply_reviews(parent, parent.path.parent / "child")


def test_child_applies_the_decisions_and_nothing_else(parent, decided, child):
    record = lineage(child)
    assert record["relabelled"] == 2 and record["excluded"] == 1 and record["generation"] == 1
    assert record["parent_key"] == parent.key and record["decisions"] == {
        "mislabeled": 2,
        "exclude": 1,
        "keep": 1,
        "skip": 1,
    }
    before, after = parent.part("train").set_index("id"), child.part("train").set_index("id")
    assert decided["excluded"] not in after.index and len(after) == len(before) - 1
    for name in ("fixed_a", "fixed_b"):  # corrected: the true label now, no longer counted as flipped
        assert after.loc[decided[name], "label"] == before.loc[decided[name], "true_label"]
        assert not after.loc[decided[name], "flipped"]
    untouched = after.index.drop([decided["fixed_a"], decided["fixed_b"]])
    assert (after.loc[untouched, "label"] == before.loc[untouched, "label"]).all()
    assert child.ids("val") == parent.ids("val") and child.ids("test") == parent.ids("test")
    assert int(child.flipped().sum()) == int(parent.flipped().sum()) - 2
    assert child.config["seed"] == parent.config["seed"] and child.config["epochs"] == parent.config["epochs"]
    assert parent_of(child).key == parent.key


def test_decisions_carry_over_into_the_child(decided, child):
    current = ReviewStore.for_run(child).current().set_index("sample_id")
    assert set(current.index) == {decided[k] for k in ("fixed_a", "fixed_b", "kept", "skipped")}
    assert current.loc[decided["kept"], "reviewer"] == "Ben"
    assert current.loc[decided["fixed_a"], "decision"] == "mislabeled"
    # carried corrections are applied already: nothing left to apply, nothing in the corrections CSV
    assert pending_changes(child).count == 0
    assert ReviewStore.for_run(child).corrections().empty


def test_applying_the_same_decisions_again_is_a_cache_hit(parent, child):
    stamp = child.paths.train_key.stat().st_mtime_ns
    again = apply_reviews(parent, child.path)
    assert again.key == child.key and again.paths.train_key.stat().st_mtime_ns == stamp
    assert len(ReviewStore.for_run(again).history()) == 4  # carrying over again stored nothing twice


def test_zero_decisions_and_hidden_decisions_are_refused(tmp_path, parent):
    with pytest.raises(InfluenceLensError, match="No decision"):
        apply_reviews(Run(_copy_run(parent, tmp_path / "fresh")), tmp_path / "out")
    # a decision made on other data (another label) is hidden and never applied
    other = _copy_run(parent, tmp_path / "other")
    data = ReviewedData.of_run(Run(other))
    changed = ReviewedData(data.sample_ids, (data.classes[1],) * len(data.sample_ids), data.classes)
    ReviewStore(other, changed).record(data.sample_ids[0], "exclude", "Ana", idempotency_key=_key())
    assert ReviewStore.for_run(Run(other)).hidden_count() == 1
    with pytest.raises(InfluenceLensError, match="No decision"):
        apply_reviews(Run(other), tmp_path / "out")
    with pytest.raises(InfluenceLensError, match="replace its parent"):
        ReviewStore.for_run(Run(other)).record(data.sample_ids[0], "exclude", "Ana", idempotency_key=_key())
        apply_reviews(Run(other), other)


def test_decisions_after_the_snapshot_stay_in_the_parent(parent, decided, child):
    """A reviewer still clicking on the parent: the new decision is not in this child, it is counted, and the
    next apply makes a new child that holds it."""
    assert decisions_since(child, parent) == 0
    store = ReviewStore.for_run(parent)
    train = parent.part("train")
    late = train[~train["flipped"]]["id"].iloc[5]
    action = store.record(late, "exclude", "Cy", idempotency_key=_key())
    try:
        assert decisions_since(child, parent) == 1
        assert late in child.ids("train")
        assert default_child_dir(parent, pending_changes(parent)) != default_child_dir(parent, pending_changes(child))
    finally:
        store.undo("Cy", idempotency_key=_key())
    assert action.decision == "exclude"


def test_child_of_a_child(tmp_path, parent, child):
    store = ReviewStore.for_run(child)
    target = child.part("train")["id"].iloc[-1]
    store.record(target, "exclude", "Dee", idempotency_key=_key())
    try:
        grandchild = apply_reviews(child, tmp_path / "grandchild")
    finally:
        store.undo("Dee", idempotency_key=_key())
    record = lineage(grandchild)
    assert record["generation"] == 2 and record["parent_key"] == child.key and record["excluded"] == 1
    assert len(grandchild.ids("train")) == len(child.ids("train")) - 1
    # the parent's exclusion is kept, its carried decisions reach the grandchild too
    assert set(grandchild.ids("train")) < set(parent.ids("train"))
    assert len(ReviewStore.for_run(grandchild).current()) == 4


def test_a_copied_pair_of_runs_compares_within_the_copy(tmp_path, parent, child):
    """Guards runs computed elsewhere: a child copied with its parent finds the copied parent (the original may be
    outside the folders the app opens), and a sibling of the parent's name from another training is passed over
    for the recorded parent."""
    shutil.copytree(parent.path, tmp_path / "copy" / parent.path.name, ignore=shutil.ignore_patterns("*.lock"))
    shutil.copytree(child.path, tmp_path / "copy" / child.path.name, ignore=shutil.ignore_patterns("*.lock"))
    assert parent_of(Run(tmp_path / "copy" / child.path.name)).path == tmp_path / "copy" / parent.path.name

    shutil.copytree(child.path, tmp_path / "other" / child.path.name, ignore=shutil.ignore_patterns("*.lock"))
    impostor = RunPaths(tmp_path / "other" / parent.path.name)
    impostor.train_key.parent.mkdir(parents=True)
    impostor.train_key.write_text("another-training")
    assert parent_of(Run(tmp_path / "other" / child.path.name)).path == parent.path


def test_two_reviewers_applying_at_once_share_one_child(tmp_path, parent, decided):
    out = tmp_path / "together"
    results, errors = [], []

    def apply() -> None:
        try:
            results.append(apply_reviews(parent, out))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=apply) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0].key == results[1].key
    assert len(ReviewStore.for_run(Run(out)).history()) == 4


def test_a_killed_retrain_leaves_no_child_and_loses_no_decision(tmp_path, parent, decided, monkeypatch):
    import influence_core.training as training

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit_model", crash)
    before = len(ReviewStore.for_run(parent).history())
    with pytest.raises(KeyboardInterrupt):
        apply_reviews(parent, tmp_path / "killed")
    assert not (tmp_path / "killed").exists()
    assert len(ReviewStore.for_run(parent).history()) == before


def test_decisions_file_is_recorded_once_and_checked(tmp_path, parent):
    run = Run(_copy_run(parent, tmp_path / "from-file"))
    train = run.part("train")
    flipped = train[train["flipped"]].iloc[0]
    rows = pd.DataFrame(
        {
            "id": [flipped["id"], train["id"].iloc[3]],
            "decision": ["mislabeled", "keep"],
            "corrected_label": [run.classes[int(flipped["true_label"])], ""],
            "reviewer": ["Ana", "Ana"],
            "created_at": ["", ""],
        }
    )
    path = tmp_path / "decisions.csv"
    rows.to_csv(path, index=False)
    assert import_decisions(run, path) == 2
    assert import_decisions(run, path) == 2
    assert len(ReviewStore.for_run(run).history()) == 2  # the second import stored nothing new
    bad = rows.assign(corrected_label=["no-such-class", ""])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InfluenceLensError, match=r"bad\.csv, line 2: 'no-such-class' is not a class"):
        import_decisions(run, tmp_path / "bad.csv")


def test_compare_is_paired_and_agrees_with_each_runs_metrics(parent, child, decided):
    result = compare_runs(child)
    for side, run in (("before", parent), ("after", child)):
        assert result[side]["accuracy"] == pytest.approx(run.metrics["accuracy_test"])
        assert result[side]["f1"] == pytest.approx(run.metrics["f1_test"])
    for name in ("accuracy", "f1"):
        d = result["difference"][name]
        assert d["difference"] == pytest.approx(d["after"] - d["before"])
        assert d["low"] <= d["difference"] <= d["high"]
    y = child.true_labels("test")
    before, after = (r.predictions["probs_test"].argmax(1) for r in (parent, child))
    assert len(result["fixed"]) == int(((before != y) & (after == y)).sum())
    assert len(result["broken"]) == int(((before == y) & (after != y)).sum())
    assert result["changes"] == {"relabelled": 2, "excluded": 1}
    flips = result["flips"]
    assert flips["before"] == int(parent.flipped().sum()) and flips["corrected"] == 2 and flips["excluded"] == 0
    assert flips["left"] == flips["before"] - 2 and flips["new_errors"] == 0
    assert np.array(result["confusion"]["after"]).sum() == len(y)


def test_the_offline_report_of_a_child_shows_before_and_after(child):
    text = html_report(child)
    d = compare_runs(child)["difference"]["accuracy"]
    assert "<h2>Before and after the corrections" in text
    assert f"{d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})" in text


def test_macro_f1_matches_scikit_learn_also_with_missing_classes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 5, 40), rng.integers(0, 4, 40)
        assert macro_f1(y, p, 6)[0] == pytest.approx(f1_score(y, p, average="macro"))


def test_paired_interval_is_zero_for_equal_predictions_and_covers_a_real_gain():
    y = np.arange(200) % 2
    same = paired_difference(y, y.copy(), y.copy(), 2)
    assert same["accuracy"]["low"] == same["accuracy"]["high"] == 0
    worse = np.where(np.arange(200) < 40, 1 - y, y)  # 40 of 200 wrong: +0.2 after fixing them
    gain = paired_difference(y, worse, y, 2)["accuracy"]
    assert gain["difference"] == pytest.approx(0.2) and 0.13 < gain["low"] < 0.2 < gain["high"] < 0.27


def test_export_is_an_image_folder_that_trains_again(tmp_path, parent, decided, child):
    path = export_corrected(parent, tmp_path / "export")
    assert path == tmp_path / "export" / MANIFEST
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(manifest.columns) == [
        "id",
        "source_path",
        "given_label",
        "final_label",
        "decision",
        "reviewer",
        "decided_at",
    ]
    assert len(manifest) == len(parent.ids("train"))
    row = manifest.set_index("id").loc[decided["fixed_a"]]
    assert row["decision"] == "mislabeled" and row["final_label"] != row["given_label"]
    assert (tmp_path / "export" / row["final_label"] / decided["fixed_a"].replace("/", "_")).is_file()
    assert manifest.set_index("id").loc[decided["excluded"], "final_label"] == ""
    data = load_dataset(f"folder:{tmp_path / 'export'}", image_size=16)
    assert len(data) == len(parent.ids("train")) - 1
    assert sorted(data.classes) == sorted(parent.classes)
    with pytest.raises(InfluenceLensError, match="already exists"):
        export_corrected(parent, tmp_path / "export")
    code = main(["train", "--dataset", f"folder:{tmp_path / 'export'}", "--run-dir", str(tmp_path / "again"),
                 "--epochs", "1", "--image-size", "16", "--checkpoints", "0"])  # fmt: skip
    assert code == 0 and Run(tmp_path / "again").n_classes == 2


def test_label_issues_in_cleanlab_columns(parent):
    table = label_issues(parent)
    assert list(table.columns[:5]) == ["id", "is_label_issue", "label_quality", "given_label", "predicted_label"]
    assert table["is_label_issue"].sum() == round(0.1 * len(table)) and table["is_label_issue"].iloc[0]
    assert table["label_quality"].between(0, 1).all()
    mean_loss = parent.dynamics["loss"].mean(0)
    assert table["id"].iloc[0] == parent.ids("train")[int(np.argmax(mean_loss))]


def test_cli_apply_compare_and_refusal(tmp_path, parent, decided, child, capsys):
    assert main(["apply-reviews", "--run-dir", str(parent.path), "--out", str(child.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["relabelled"] == 2 and summary["excluded"] == 1
    assert main(["compare", "--run-dir", str(child.path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["changes"] == {"relabelled": 2, "excluded": 1}
    fresh = _copy_run(parent, tmp_path / "fresh")
    assert main(["apply-reviews", "--run-dir", str(fresh), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: No decision of this run changes its training set")
    assert main(["label-issues", "--run-dir", str(parent.path), "--out", str(tmp_path / "issues.csv")]) == 0
    assert pd.read_csv(tmp_path / "issues.csv")["is_label_issue"].any()


def _copy_run(run: Run, dest):
    """A copy of the run folder without its review store."""
    import shutil

    shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns("reviews.sqlite*"))
    return dest
