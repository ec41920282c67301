"""Measured accuracy is data written next to the benchmark results, and the app's notes come from it."""

import json

from influence_core.measured import MEASURED_FILE, load_measured, measured_for
from influence_core.pipeline import DEFAULT_SETTINGS, InfluenceSettings


def test_notes_come_from_the_benchmarks_file():
    table = load_measured()
    assert table is not None, f"{MEASURED_FILE} is part of the checkout"
    assert DEFAULT_SETTINGS.accuracy_note() == table[("direct", "head")].describe()
    cg_all = InfluenceSettings(method="cg", scope="all").accuracy_note()
    assert cg_all.startswith("Approximate: influence functions assume") and cg_all.endswith("cg on scope all.")


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
    text = measured_for("ekfac", "all", path).describe()
    assert text.startswith("Approximate. Measured: LDS 0.21 ± 0.02 (50 retrained models; goldfish vs lemon)")
    assert "magnitudes ×2 the measured loss changes" in text
    assert measured_for("kfac", "all", path).describe() == "Measured: 23× a forward+backward pass."
    assert measured_for("lissa", "head", path) is None and load_measured(tmp_path / "absent.json") is None


def test_method_label_shows_the_measured_lds_only(tmp_path):
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
    assert method_label("ekfac", "all", path) == "ekfac · LDS 0.21"
    assert method_label("kfac", "all", path) == "kfac"  # not measured by LDS: the plain name
    assert method_label("direct", "head", path) == "direct"
    assert method_label("ekfac", "all", tmp_path / "absent.json") == "ekfac"
