"""Measured accuracy is data that ships with the package (written by the benchmarks), and the app's notes come
from it. Tests read tests/fixtures/measured.json, so new measurements never break them."""

import json
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

from influence_core import measured, upgrade
from influence_core.influence import CG, EKFAC, Scope
from influence_core.measured import MEASURED_FILE, load_measured, measured_for
from influence_core.pipeline import DEFAULT_SETTINGS, InfluenceSettings
from influence_core.upgrade import ranking_upgrade

FIXTURE = Path(__file__).parent / "fixtures" / "measured.json"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fixture_measurements(monkeypatch):
    """The app reads tests/fixtures/measured.json instead of the package's measurements."""
    monkeypatch.setattr(measured, "MEASURED_FILE", FIXTURE)
    return FIXTURE


def test_notes_come_from_the_measurements_file(fixture_measurements):
    table = load_measured()
    assert DEFAULT_SETTINGS.accuracy_note() == table[("direct", "head")].describe()
    cg_all = InfluenceSettings(method=CG(), scope=Scope.ALL).accuracy_note()
    assert cg_all == "Approximate: whole network (fixture). Not measured by the benchmarks for cg on scope all."


def test_the_measurements_ship_as_package_data():
    """Guards the move out of benchmarks/: the default file is read through importlib.resources, parses, and
    names a measurement for the default settings."""
    shipped = files("influence_core") / "data" / "measured.json"
    assert Path(str(shipped)) == MEASURED_FILE
    data = json.loads(shipped.read_text())
    assert {"workload", "n_models", "methods"} <= set(data)
    assert load_measured() is not None and measured_for("direct", "head") is not None


@pytest.mark.slow
def test_an_installed_wheel_keeps_the_measurements(tmp_path):
    """Guards pyproject's package-data: a wheel built from the checkout contains the measurements file."""
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("influence_core-*.whl")
    assert "influence_core/data/measured.json" in zipfile.ZipFile(wheel).namelist()


def test_an_lds_measurement_is_shown_with_its_error(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(
        json.dumps(
            {
                "workload": "goldfish vs lemon",
                "n_models": 50,
                "methods": {
                    "ekfac/all": {
                        "job": "ours_ekfac_all",
                        "lds": 0.213,
                        "lds_se": 0.021,
                        "slope": 0.5,
                        "note": "Approximate.",
                    },
                    "kfac/all": {"job": "ours_kfac_all", "lds": None, "lds_se": None, "note": None, "cost_x_floor": 23},
                },
            }
        )
    )
    text = measured_for("ekfac", "all", path).details()
    assert text.startswith("Approximate. Measured: LDS 0.21 ± 0.02 (50 retrained models; goldfish vs lemon)")
    assert "magnitudes ×2 the measured loss changes" in text
    assert measured_for("kfac", "all", path).details() == "Measured: 23× a forward+backward pass."
    # issue 29: screens get plain words, the figures go behind a help icon
    assert measured_for("ekfac", "all", path).describe() == "Approximate. Agreement with retraining: fair."
    assert measured_for("kfac", "all", path).describe() == (
        "Takes about 23× the time of one pass of the model over the images."
    )
    assert measured_for("lissa", "head", path) is None and load_measured(tmp_path / "absent.json") is None


def test_a_slope_of_uncorrelated_predictions_is_not_shown_as_a_magnitude(tmp_path):
    path = tmp_path / "measured.json"
    entry = {"job": "ours_ekfac_all", "lds": 0.35, "lds_se": 0.015, "slope": -8.9e-05}
    for pearson, shown in (
        (-0.02, "predicted loss changes do not track those of the retrained models (Pearson -0.02)"),
        (0.34, "predicted loss changes have the wrong sign on average"),
        (None, "predicted loss changes have the wrong sign on average"),  # files from before pearson was kept
    ):
        methods = {"ekfac/all": entry | ({"pearson": pearson} if pearson is not None else {})}
        path.write_text(json.dumps({"workload": "w", "n_models": 50, "methods": methods}))
        text = measured_for("ekfac", "all", path).details()
        assert shown in text and text.count("predicted loss changes") == 1
        plain = measured_for("ekfac", "all", path).describe()
        assert "Pearson" not in plain and ("use its order" in plain) == (pearson == -0.02)


def test_method_label_shows_the_measured_agreement_only(tmp_path):
    from influence_core.measured import method_label

    path = tmp_path / "measured.json"
    path.write_text(
        json.dumps(
            {
                "workload": "w",
                "n_models": 50,
                "methods": {
                    "ekfac/all": {"job": "ours_ekfac_all", "lds": 0.2149, "lds_se": 0.01},
                    "kfac/all": {"job": "ours_kfac_all", "lds": None, "lds_se": None},
                },
            }
        )
    )
    assert method_label("ekfac", "all", path) == "ekfac · agreement with retraining: fair"
    assert method_label("kfac", "all", path) == "kfac"  # not measured by LDS: the plain name
    assert method_label("direct", "head", path) == "direct"
    assert method_label("ekfac", "all", tmp_path / "absent.json") == "ekfac"


def _measured_file(path, lds: dict[str, float]):
    methods = {key: {"job": key, "lds": value, "lds_se": 0.015} for key, value in lds.items()}
    path.write_text(json.dumps({"workload": "tulip vs rose, 64 px", "n_models": 50, "methods": methods}))
    return path


def test_rankings_upgrade_to_the_best_measured_whole_network_method_when_affordable(tmp_path, monkeypatch, demo_run):
    """At the default settings the explorer ranks with the whole-network method of best LDS when that beats the
    default's LDS and is estimated affordable; a choice the user made, a better head, or a run too large for the
    CPU keep the current settings."""
    path = _measured_file(
        tmp_path / "m.json",
        {"direct/head": 0.073, "ekfac/all": 0.083, "kfac/all": 0.079, "tracin/all": 0.2, "ekfac/head": 0.06},
    )
    monkeypatch.setattr(measured, "MEASURED_FILE", path)
    up = ranking_upgrade(demo_run, DEFAULT_SETTINGS, device="cpu")
    assert up is not None  # tracin is not a method of the influence engine: never picked
    assert up.settings == InfluenceSettings(method=EKFAC(), scope=Scope.ALL, checkpoints=False)
    assert (up.measured.lds, up.current.lds) == (0.083, 0.073)
    assert up.estimated_s == upgrade.estimated_cpu_seconds(demo_run)
    assert "(LDS 0.083 ± 0.015 against 0.073 ± 0.015 for the last layer, measured on tulip vs rose)" in up.describe()

    assert ranking_upgrade(demo_run, InfluenceSettings(method=CG()), device="cpu") is None
    monkeypatch.setattr(upgrade, "AFFORDABLE_CPU_SECONDS", up.estimated_s / 2)
    assert ranking_upgrade(demo_run, DEFAULT_SETTINGS, device="cpu") is None
    monkeypatch.setattr(upgrade, "AFFORDABLE_CPU_SECONDS", up.estimated_s * 2)
    _measured_file(path, {"direct/head": 0.09, "ekfac/all": 0.083})
    assert ranking_upgrade(demo_run, DEFAULT_SETTINGS, device="cpu") is None
    monkeypatch.setattr(measured, "MEASURED_FILE", tmp_path / "absent.json")
    assert ranking_upgrade(demo_run, DEFAULT_SETTINGS, device="cpu") is None


def test_cpu_estimate_counts_output_columns_in_the_fit_only(demo_run, monkeypatch):
    """The explorer's cost model: more classes add backward passes to the fit (on its subset of training images),
    not to the pass that scores every image; above 16 classes the columns stop growing (15 leading ones)."""
    from influence_core.influence.kfac.inverse import DEFAULT_FIT_EXAMPLES
    from influence_core.run import Run

    pixels = demo_run.config["image_size"] ** 2 / 1e6
    fitted = min(len(demo_run.labels("train")), DEFAULT_FIT_EXAMPLES) * pixels
    per_column = upgrade.CPU_FIT_SECONDS_PER_MEGAPIXEL_COLUMN * fitted
    estimates = {}
    for n_classes in (2, 10, 17, 200):
        monkeypatch.setattr(Run, "n_classes", property(lambda self, n=n_classes: n))
        estimates[n_classes] = upgrade.estimated_cpu_seconds(demo_run)
    assert estimates[10] - estimates[2] == pytest.approx(8 * per_column)  # 9 columns against 1
    assert estimates[17] - estimates[2] == pytest.approx(14 * per_column)  # 15 leading columns
    assert estimates[200] == pytest.approx(estimates[17])
    all_pixels = (len(demo_run.labels("train")) + len(demo_run.labels("test"))) * pixels
    scoring = upgrade.CPU_SCORE_SECONDS_PER_MEGAPIXEL * all_pixels
    assert estimates[2] == pytest.approx(upgrade.CPU_FIT_SECONDS + per_column + scoring)


def test_the_full_estimators_lds_is_shown_beside_the_defaults(tmp_path):
    path = tmp_path / "measured.json"
    entry = {"job": "ours_kfac_all", "lds": 0.4052, "lds_se": 0.0133, "full_lds": 0.4117}
    path.write_text(json.dumps({"workload": "w", "n_models": 50, "methods": {"kfac/all": entry}}))
    text = measured_for("kfac", "all", path).details()
    assert "(every eigenvector, example and position) 0.412 against 0.405" in text


def test_every_measured_lds_is_of_the_methods_defaults():
    """The shipped measurements' ``lds`` of ``<method>/<scope>`` comes from job ``ours_<method>_<scope>``, which
    ``benchmarks/lds_methods.py`` runs with no options on the head (the app runs every method at its defaults)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from lds_methods import HEAD_JOBS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert all(options == {} for options in HEAD_JOBS.values())
    for key, m in load_measured().items():
        assert m.job == f"ours_{key[0]}_{key[1]}" or not m.job.startswith("ours_"), m.job
