"""Every page of the Streamlit app, run headless with ``AppTest`` on the small cached demo run."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from influence_core.analysis import SIGNALS, rank_suspects
from influence_core.display import short_id
from influence_core.measured import method_label
from influence_core.paths import RunPaths
from influence_core.pipeline import DEFAULT_SETTINGS, METHOD_CHOICES, compute_influence
from influence_core.review import ReviewStore

APP = Path(__file__).resolve().parents[2] / "app.py"


@pytest.fixture(scope="module")
def demo_result(demo_run):
    return compute_influence(demo_run, DEFAULT_SETTINGS)


@pytest.fixture
def app(demo_run, demo_result, runs_root, monkeypatch):
    """A function opening the app on one page of the demo run (``?run=demo``), already run once."""
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))

    def open_page(page: str | None = None, **params) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.query_params.update({"run": demo_run.path.name, **params})
        at.run()
        if page:
            at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        return at

    return open_page


def finish_jobs(at: AppTest) -> AppTest:
    """Wait for the app's background jobs (training, influences), then run the page again."""
    from pages.ui.runs import job_registry

    for job in job_registry().running():
        assert job.wait(300), job
    return at.run()


def copy_run(run_path: Path, dest: Path, influences: bool = True) -> Path:
    """A fresh copy of a finished run folder at ``dest`` (without its cached influences unless ``influences``)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        run_path, dest, ignore=shutil.ignore_patterns(*(() if influences else ("influence",)), "reviews.sqlite*")
    )
    return dest


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_overview_tells_the_story(app, demo_run, demo_result):
    at = app()
    flipped = demo_run.flipped()
    assert metric(at, "Test F1 (macro)") == f"{demo_run.metrics['f1_test']:.3f}"
    assert metric(at, "Training labels flipped") == f"{flipped.mean():.0%}"
    order = np.argsort(-demo_result.signals[demo_result.best_signal], kind="stable")[: int(np.ceil(0.1 * len(flipped)))]
    assert metric(at, "Flips found in the top 10 %") == f"{flipped[order].sum()} of {flipped.sum()}"
    story = " ".join(m.value for m in at.markdown)  # the three steps say what this run measured
    assert f"{flipped.sum()} of whose labels were flipped on purpose" in story
    assert f"the top 10 % of that queue holds {flipped[order].sum()} of the {flipped.sum()} flipped labels" in story
    assert len(at.get("image")) >= 8  # the eight most suspicious training images
    assert at.query_params["run"] == demo_run.path.name


def test_setup_page_shows_quality_and_weights(app, demo_run):
    at = app("setup_run")
    assert metric(at, "Test F1 (macro)") == f"{demo_run.metrics['f1_test']:.3f}"
    weights = "trained from scratch" if demo_run.config["weights"] == "scratch" else "ImageNet-pretrained"
    assert any(weights in box.value for box in [*at.warning, *at.success])
    assert [m.label for m in at.multiselect][0].startswith("Classes (type to search; empty = all 10)")
    from influence_core.cli import build_parser
    from influence_core.training import RECOMMENDED_EPOCHS, TrainConfig

    # the app, the CLI and the library train for the same default number of epochs
    assert next(s for s in at.slider if s.label == "Epochs").value == RECOMMENDED_EPOCHS == TrainConfig().epochs
    assert build_parser().parse_args(["train", "--run-dir", "r"]).epochs == RECOMMENDED_EPOCHS
    assert any(c.value == DEFAULT_SETTINGS.accuracy_note() and "Exact" in c.value for c in at.caption)
    next(r for r in at.radio if r.label == "Parameters").set_value("all").run()
    assert any(c.value.startswith("Approximate: influence functions assume") for c in at.caption)
    methods = next(b for b in at.selectbox if b.label == "Method")
    assert methods.options == [method_label(m, "all") for m in METHOD_CHOICES]  # with LDS where measured
    damping = next(b for b in at.selectbox if b.label == "Damping λ")
    assert damping.options[0] == "default: 1e-05 × each block's largest eigenvalue"  # the whole network's default
    assert any("λ=top:1e-05" in c.value for c in at.caption)
    damping.select_index(damping.options.index("0.1 × each block's mean eigenvalue")).run()
    assert any("λ=rel:0.1" in c.value for c in at.caption)
    options = next(t for t in at.text_input if t.label == "Method options")
    options.set_value("rank=5").run()  # the default method, direct, has no rank
    assert "Unknown option(s) for method 'direct': rank" in at.error[0].value
    methods = next(b for b in at.selectbox if b.label == "Method")
    methods.select_index(METHOD_CHOICES.index("kfac")).run()
    assert not at.error and any(c.value.startswith("kfac, rank=5, scope all") for c in at.caption)
    assert any("Measured at kfac's defaults, not with rank=5" in c.value for c in at.caption)
    # issue 29 item 5: an option of the wrong type is the app's message, not a traceback
    next(t for t in at.text_input if t.label == "Method options").set_value("rank=abc").run()
    assert not at.exception and "Method option rank='abc' of kfac is not an integer or none" in at.error[0].value
    assert "write e.g. rank=512" in at.error[0].value


def test_setup_page_opens_a_run_directory_inside_the_roots_only(app, demo_run, runs_root, tmp_path):
    at = app("setup_run")

    def open_folder(typed: str) -> None:
        next(t for t in at.text_input if t.label == "Run directory").input(typed).run()
        next(b for b in at.button if b.label == "Open run").click().run()

    open_folder(str(tmp_path))
    assert "outside the folders the app may open" in at.error[0].value and "Fix:" in at.error[0].value
    assert str(tmp_path) not in at.error[0].value
    (runs_root / "not-a-run").mkdir(exist_ok=True)
    open_folder("not-a-run")
    assert "not a finished run" in at.error[0].value and "Fix:" in at.error[0].value
    assert str(runs_root) not in at.error[0].value
    for typed in (str(demo_run.path), demo_run.path.name):
        open_folder(typed)
        assert not at.error and at.session_state["run"] == demo_run.path.name


def outside_links(runs_root: Path, outside: Path) -> list[str]:
    """Links that name ``outside`` (a folder beside the runs root): absolute, with ``..``, through a symlink."""
    link = runs_root / f"link-to-{outside.name}"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    return [str(outside), f"../{outside.name}", f"x/../../{outside.name}", link.name, f"~/{outside.name}"]


def test_links_cannot_reach_runs_outside_the_roots(demo_run, runs_root, monkeypatch):
    """A finished run beside the runs root (influences not computed) stays untouched whatever the link says."""
    outside = runs_root.parent / "elsewhere"
    if not outside.exists():
        copy_run(demo_run.path, outside, influences=False)
    before = files_under(outside)
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    for ref in outside_links(runs_root, outside):
        for page in (None, "review_queue"):
            at = AppTest.from_file(str(APP), default_timeout=60)
            at.query_params["run"] = ref
            at.run()
            if page:
                at.switch_page(f"pages/{page}.py").run()
            assert not at.exception, (ref, at.exception)
            assert "outside the folders the app may open" in at.error[0].value, ref
            assert str(runs_root.parent) not in at.error[0].value
    assert files_under(outside) == before


def test_extra_roots_open_runs_by_link(demo_run, demo_result, runs_root, tmp_path, monkeypatch):
    extra = tmp_path / "gpu-runs"
    copy_run(demo_run.path, extra / "from-the-gpu")
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    monkeypatch.setenv("INFLUENCE_LENS_EXTRA_ROOTS", str(extra))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "from-the-gpu"
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert metric(at, "Test F1 (macro)") == f"{demo_run.metrics['f1_test']:.3f}"


@pytest.mark.parametrize("page", [None, "review_queue"])
def test_an_unwritable_run_folder_is_a_clear_error(demo_run, runs_root, monkeypatch, page):
    """A run whose influence/ cannot be created (a file in its place, as on a read-only mount): no traceback."""
    run = copy_run(demo_run.path, runs_root / f"unwritable-{page}", influences=False)
    (run / "influence").write_text("not a folder")
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = run.name
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    if not at.error:  # the job was still running: its error shows once it has failed (else it showed at once)
        finish_jobs(at)
    assert not at.exception, at.exception
    assert at.error, "no error shown"
    assert "could not be read or written" in at.error[0].value and "Fix:" in at.error[0].value
    assert str(runs_root) not in at.error[0].value


def test_a_broken_review_store_is_a_clear_error(demo_run, demo_result, runs_root, monkeypatch):
    run = copy_run(demo_run.path, runs_root / "broken-store")
    (run / "reviews.sqlite").mkdir()  # sqlite cannot open a folder
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = run.name
    at.run()
    at.switch_page("pages/review_queue.py").run()
    assert not at.exception, at.exception
    assert "review store" in at.error[0].value and "Fix:" in at.error[0].value
    assert str(runs_root) not in at.error[0].value


def test_training_goes_on_in_the_background_across_pages(demo_run, runs_root, monkeypatch):
    """Train from the Data & model page, leave for another page: the job goes on, its progress shows there,
    the URL names the new run by dataset, classes and flip share, and the run opens once done."""
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = demo_run.path.name
    at.run()
    at.switch_page("pages/setup_run.py").run()
    next(s for s in at.slider if s.label == "Use this share of the images").set_value(0.1)
    next(s for s in at.slider if s.label == "Epochs").set_value(1)
    next(s for s in at.select_slider if s.label == "Image size (px)").set_value(16)
    next(s for s in at.slider if s.label.startswith("Flip this share")).set_value(0.2)
    at.run()
    next(b for b in at.button if b.label == "Train and compute influences").click().run()
    assert not at.exception, at.exception
    ref = at.session_state["run"]
    assert ref.startswith("digits-all-classes-20pct-flipped-") and at.query_params["run"] in (ref, [ref])
    assert any("runs on the server" in p.text for p in at.progress)  # the page shows the job
    at.switch_page("pages/test_set.py").run()  # leave: the job goes on and shows here too
    assert not at.exception, at.exception
    finish_jobs(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.dataframe[0].value) > 0
    assert (runs_root / ref / "train_key").is_file()


def test_explorer_shows_top_k_for_the_test_image_in_the_url(app, demo_run):
    at = app("explorer", test="3")
    assert at.session_state["test"] == 3
    assert any("Test image #3" in m.value for m in at.markdown)
    assert len([b for b in at.button if b.label == "Saliency"]) == 2 * 8  # k helpful + k harmful
    at.slider[0].set_value(4).run()
    assert len([b for b in at.button if b.label == "Saliency"]) == 2 * 4
    next(b for b in at.button if b.label == "Saliency").click().run()
    assert not at.exception
    assert at.session_state["train_pick"] is not None
    assert any("Red pixels" in c.value for c in at.caption)


@pytest.mark.slow  # trains a ResNet18 on tiny-imagenet (tiny_run)
def test_pages_show_the_image_of_each_sample_they_name(tiny_run):
    """Display images are looked up by sample id: a tiny-imagenet run lists its samples by split, its dataset by
    file, so a row of ``samples.csv`` is not a row of the dataset (pages once showed the wrong images here)."""
    from pages.ui.runs import images_at

    row_of = {sample_id: i for i, sample_id in enumerate(tiny_run.dataset.ids)}
    for split in ("train", "test"):
        ids = tiny_run.ids(split)
        positions = np.array([len(ids) - 1, 0, 5])
        expected = np.stack([tiny_run.dataset.images[row_of[ids[p]]] for p in positions])
        np.testing.assert_array_equal(images_at(tiny_run, split, positions), expected)
    rows = np.flatnonzero((tiny_run.samples["split"] == "test").to_numpy())
    assert any(row_of[i] != r for i, r in zip(tiny_run.ids("test"), rows, strict=True))  # the orders do differ


@pytest.mark.slow  # trains a ResNet18 on tiny-imagenet (tiny_run)
def test_explorer_ranks_with_the_better_whole_network_result_once_computed(app, tiny_run, runs_root, monkeypatch):
    """With the upgrade on (off elsewhere in the tests), the explorer shows the last layer's rankings and computes
    the better-measured whole-network result in the background; once it is cached, the rankings come from it
    (two real tiny-imagenet classes: one output-curvature column, so the whole network takes seconds)."""
    from influence_core import measured
    from influence_core.pipeline import load_influence
    from influence_core.upgrade import ranking_upgrade

    path = runs_root / "measured-upgrade.json"
    methods = {"direct/head": (0.073, 0.2), "ekfac/all": (0.083, 0.11)}  # LDS, Pearson of the loss changes
    path.write_text(
        json.dumps(
            {
                "workload": "w",
                "n_models": 50,
                "methods": {k: {"job": k, "lds": v, "pearson": r} for k, (v, r) in methods.items()},
            }
        )
    )
    monkeypatch.setattr(measured, "MEASURED_FILE", path)
    monkeypatch.setenv("INFLUENCE_LENS_RANKING_UPGRADE", "1")
    compute_influence(tiny_run, DEFAULT_SETTINGS)
    run_path = copy_run(tiny_run.path, runs_root / "tiny-upgrade")
    at = app("explorer", run=run_path.name, test="3")
    assert any(
        (c.help or "").startswith("Ranked by the last layer while ekfac on the whole network") for c in at.caption
    )
    at = finish_jobs(at)
    assert not at.exception
    note = next(c for c in at.caption if (c.help or "").startswith("Ranked by ekfac on the whole network (LDS 0.083"))
    assert note.help.endswith("not a loss change (against the retrained models' loss changes, Pearson 0.11).")
    assert "approximate (EK-FAC) influence through the whole network" in note.value  # the figures behind help
    from influence_core import Run

    run = Run(run_path)
    whole = load_influence(run, ranking_upgrade(run, DEFAULT_SETTINGS).settings)
    head = load_influence(run, DEFAULT_SETTINGS)
    captions = [i.caption for img in at.get("image") for i in img.proto.imgs]
    shown = [c.split(" · id ")[1].split(" · ")[0] for c in captions if " · id " in c][:8]  # the helpful row
    names = [short_id(i) for i in run.ids("train")]
    assert shown == [names[p] for p in whole.top_helpful(3, 8)[0]]
    assert shown != [names[p] for p in head.top_helpful(3, 8)[0]]


def test_whole_test_set_page_lists_every_training_image(app, demo_run):
    at = app("test_set")
    n = len(demo_run.ids("train"))
    assert len(at.dataframe[0].value) == min(50, n)  # one page of the table...
    pages = -(-n // 50)
    assert any(f"of {pages:,}; 50 of {n:,} rows" in w.label for w in at.number_input)  # ...of all of them


def test_review_queue_records_and_undoes(app, demo_run, demo_result):
    order = rank_suspects(demo_result.signals[demo_result.best_signal])
    queue = [demo_run.ids("train")[p] for p in order[: int(np.ceil(0.1 * len(order)))]]
    store = ReviewStore.for_run(demo_run)
    sid = next(i for i in queue if i not in store.decisions_for(queue))  # other tests may have reviewed some
    before = store.progress(queue)["reviewed"]
    at = app("review_queue")
    assert at.progress[0].text.startswith(f"Reviewed {before} of {len(queue)}")
    assert at.selectbox[0].value == demo_result.best_signal  # default: the best signal
    assert len(at.get("image")) == 10  # one page of suspects
    at.text_input[0].input("ann").run()
    at.button(key=f"keep-{sid}").click().run()
    assert store.decisions_for([sid])[sid].decision == "keep"
    assert at.progress[0].text.startswith(f"Reviewed {before + 1} of {len(queue)}")
    assert any("label kept by ann" in m.value for m in at.markdown)
    next(b for b in at.button if b.label == "Undo my last action").click().run()
    assert store.decisions_for([sid]) == {}
    assert at.progress[0].text.startswith(f"Reviewed {before} of {len(queue)}")


@pytest.fixture
def held_influences(monkeypatch):
    """The app's influence jobs wait until the yielded event is set (at the latest when the test ends)."""
    import pages.ui.runs as runs

    gate, real = threading.Event(), runs.compute_influence

    def held(*args, **kwargs):
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "compute_influence", held)
    yield gate
    gate.set()


def open_without_influences(demo_run, runs_root, monkeypatch, name: str) -> AppTest:
    """The app on a copy of the demo run without its influences, run once (on Overview)."""
    run = copy_run(demo_run.path, runs_root / name, influences=False)
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = run.name
    return at.run()


def test_overview_shows_while_the_influences_are_computed(demo_run, runs_root, monkeypatch, held_influences):
    """A run opened before its influences exist: Overview tells its story at once (the suspects rank by the signals
    of training) under the computation's bar; the report waits for the influences."""
    at = open_without_influences(demo_run, runs_root, monkeypatch, "overview-pending")
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert at.progress[0].text.startswith("Computing influences")
    flips = metric(at, "Flips found in the top 10 %")
    assert len(at.get("image")) >= 8  # the most suspicious training images
    assert not [b for b in at.get("download_button") if "report" in b.proto.label]
    assert any("once the influences are computed" in c.value for c in at.caption)
    held_influences.set()
    finish_jobs(at)
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert not at.progress and metric(at, "Flips found in the top 10 %") == flips  # the same ranking
    assert [b for b in at.get("download_button") if "report" in b.proto.label]


def test_review_queue_shows_while_the_influences_are_computed(demo_run, runs_root, monkeypatch, held_influences):
    """A run without cached influences (as a corrected run made by the CLI): the queue ranks by the signals of
    training at once, the influence job's progress shows above it, and the influence signals join when done
    without undoing the reviewer's pick."""
    at = open_without_influences(demo_run, runs_root, monkeypatch, "review-pending")
    at.switch_page("pages/review_queue.py").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert at.progress[0].text.startswith("Computing influences")
    assert at.progress[1].text.startswith("Reviewed 0 of")
    assert len(at.get("image")) == 10  # one page of suspects
    assert at.selectbox[0].value == "mean_loss" and SIGNALS["self_influence"].label not in at.selectbox[0].options
    at.selectbox[0].set_value("mean_margin").run()  # the reviewer's own pick...
    held_influences.set()
    finish_jobs(at)
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert at.progress[0].text.startswith("Reviewed 0 of")
    assert SIGNALS["self_influence"].label in at.selectbox[0].options
    assert at.selectbox[0].value == "mean_margin"  # ...stays when the list grows


def test_review_keeps_the_reviewer_and_the_recorded_correction_after_a_reload(app, demo_run, demo_result):
    """The name rides in the URL, the relabel box shows the recorded correction (not the model's suggestion)
    and explains its pre-filled value, each click stores an idempotency key, and flipped images are marked."""
    ids, classes = demo_run.ids("train"), demo_run.classes
    first_page = rank_suspects(demo_result.signals[demo_result.best_signal], 10)
    store = ReviewStore.for_run(demo_run)
    pos = next(int(p) for p in first_page if ids[p] not in store.decisions_for([ids[p] for p in first_page]))
    sid = ids[pos]
    at = app("review_queue")
    at.text_input[0].input("bea").run()
    assert at.query_params["reviewer"] in ("bea", ["bea"])
    box = at.selectbox(key=f"label-{sid}-0")
    assert "Pre-filled with" in box.help
    wanted = next(c for c in classes if c not in (classes[demo_run.labels("train")[pos]], box.value))
    box.set_value(wanted).run()
    at.button(key=f"mislabeled-{sid}").click().run()
    action = store.decisions_for([sid])[sid]
    assert (action.decision, action.corrected_label, action.reviewer) == ("mislabeled", wanted, "bea")
    with closing(sqlite3.connect(RunPaths(demo_run.path).reviews)) as con:
        assert con.execute("SELECT idempotency_key FROM actions WHERE id = ?", (action.id,)).fetchone()[0]

    reloaded = app("review_queue", reviewer="bea")  # a new session on the same link
    assert reloaded.text_input[0].value == "bea" and not reloaded.button(key=f"keep-{sid}").disabled
    assert reloaded.selectbox(key=f"label-{sid}-{action.id}").value == wanted
    assert "correction bea recorded" in reloaded.selectbox(key=f"label-{sid}-{action.id}").help
    captions = [i.caption for img in reloaded.get("image") for i in img.proto.imgs]
    flipped_shown = demo_run.flipped()[first_page].sum()
    assert sum("flipped" in c for c in captions) == flipped_shown and any("marked mislabeled" in c for c in captions)


def test_corruption_lab_shows_the_notebook_table(app, demo_run):
    at = app("corruption_lab")
    table = at.dataframe[0].value
    assert list(table["label"]) == demo_run.classes
    assert table["n_corrupted"].sum() == demo_run.flipped().sum()


def test_a_missing_run_is_a_clear_error(demo_run, runs_root, monkeypatch):
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "no-such-run"
    at.run()
    assert not at.exception
    assert "not a finished run" in at.error[0].value


@pytest.mark.slow  # trains a ResNet18 on tiny-imagenet (tiny_run)
@pytest.mark.parametrize("page", [None, "setup_run", "explorer", "test_set", "review_queue", "corruption_lab"])
def test_every_page_works_on_a_tiny_imagenet_run(tiny_run, runs_root, monkeypatch, page):
    compute_influence(tiny_run, DEFAULT_SETTINGS)
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"run": tiny_run.path.name})
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.title) == 1, [t.value for t in at.title]  # drawn once: AppTest starts outside app.py's frame
    run = at.query_params["run"]
    assert (run[0] if isinstance(run, list) else run) == tiny_run.path.name  # no fallback to the demo


def test_review_page_runs_the_second_pass_and_ranks_by_it(demo_run, demo_result, runs_root, monkeypatch):
    """The button trains the second pass in the background; once done, the queue is ranked by it by default."""
    from influence_core.analysis import SIGNALS
    from influence_core.second_pass import SECOND_PASS_SIGNAL, load_second_pass

    run = copy_run(demo_run.path, runs_root / "second-pass")
    monkeypatch.setenv("INFLUENCE_LENS_RUNS", str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = run.name
    at.run()

    def detection_chart() -> str:
        at.switch_page("pages/corruption_lab.py").run()
        return next(c.proto.spec for c in at.get("plotly_chart") if "flipped labels found" in c.proto.spec)

    assert SIGNALS[SECOND_PASS_SIGNAL].label not in detection_chart()
    at.switch_page("pages/review_queue.py").run()
    ranked_by = next(b for b in at.selectbox if b.label == "Rank suspects by")
    assert ranked_by.value == "mean_loss" and SECOND_PASS_SIGNAL not in ranked_by.options
    next(b for b in at.button if b.label.startswith("Second pass: retrain without the top 10 %")).click().run()
    finish_jobs(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    from influence_core import Run

    second = load_second_pass(Run(run))
    assert second is not None
    assert next(b for b in at.selectbox if b.label == "Rank suspects by").value == SECOND_PASS_SIGNAL
    assert any(c.value == SIGNALS[SECOND_PASS_SIGNAL].explanation for c in at.caption)
    assert any(c.value.startswith("Second pass: retrained without the top") for c in at.caption)
    assert not any(b.label.startswith("Second pass: retrain") for b in at.button)
    assert SIGNALS[SECOND_PASS_SIGNAL].label in detection_chart()  # the lab's cached curves include it now
