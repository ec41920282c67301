"""The linear datamodeling score (influence_core.evaluation) on synthetic cases whose answer is known, and the
measurements file that benchmarks/lds.py writes from it (influence_core.measured)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from influence_core import evaluation
from influence_core import measured as writer


@pytest.fixture(scope="module")
def datamodel():
    """A linear datamodel: 80 models on random halves of 300 training points, 40 test points, small noise."""
    rng = np.random.default_rng(0)
    n_models, n_train, n_test = 80, 300, 40
    theta = rng.normal(size=(n_test, n_train))
    masks = rng.random((n_models, n_train)) < 0.5
    measured = masks @ theta.T + 0.01 * rng.normal(size=(n_models, n_test))
    return theta, masks, measured


def test_true_datamodel_scores_one(datamodel):
    theta, masks, measured = datamodel
    r = evaluation.lds(theta, masks, measured)
    assert r["lds"] > 0.99 and r["n_test"] == 40 and r["n_models"] == 80
    assert r["se"] < 0.01


def test_sign_flip_scores_minus_one(datamodel):
    theta, masks, measured = datamodel
    assert evaluation.lds(-theta, masks, measured)["lds"] < -0.99


def test_shuffled_influences_score_zero(datamodel):
    theta, masks, measured = datamodel
    shuffled = theta[:, np.random.default_rng(1).permutation(theta.shape[1])]
    r = evaluation.lds(shuffled, masks, measured)
    assert abs(r["lds"]) < 3 * r["se"] + 0.05


def test_per_test_spearman_matches_scipy(datamodel):
    from scipy.stats import spearmanr

    theta, masks, measured = datamodel
    noisy = theta + np.random.default_rng(2).normal(scale=3.0, size=theta.shape)
    r = evaluation.lds(noisy, masks, measured)
    expected = [spearmanr(masks @ noisy[t], measured[:, t]).statistic for t in range(theta.shape[0])]
    np.testing.assert_allclose(r["per_test"], expected, atol=1e-12)
    assert 0.2 < r["lds"] < 0.95  # a partly right matrix scores in between


def test_constant_test_point_is_left_out(datamodel):
    theta, masks, measured = datamodel
    measured = measured.copy()
    measured[:, 0] = 1.0
    r = evaluation.lds(theta, masks, measured)
    assert np.isnan(r["per_test"][0]) and r["n_test"] == 39


def test_scoring_takes_seconds():
    rng = np.random.default_rng(0)
    masks = rng.random((100, 880)) < 0.5
    t = time.perf_counter()
    evaluation.lds(rng.normal(size=(110, 880)), masks, rng.normal(size=(100, 110)))
    assert time.perf_counter() - t < 2.0


def test_margin_is_logit_minus_logsumexp_of_others():
    logits = np.array([[2.0, 0.0, 1.0], [0.5, 0.5, 3.0]])
    y = np.array([0, 2])
    expected = [2.0 - np.log(np.exp(0.0) + np.exp(1.0)), 3.0 - np.log(2 * np.exp(0.5))]
    np.testing.assert_allclose(evaluation.true_label_margin(logits, y), expected, rtol=1e-12)


def test_subsets_are_seeded_halves():
    a, b = evaluation.subset_indices(3, 880, 0.5), evaluation.subset_indices(4, 880, 0.5)
    assert len(a) == 440 and len(np.unique(a)) == 440 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, evaluation.subset_indices(3, 880, 0.5))
    assert not np.array_equal(a, b)


def test_measured_file_round_trip(tmp_path):
    from influence_core.measured import load_measured, measured_for

    assert load_measured(tmp_path / "absent.json") is None
    assert measured_for("ekfac", "all", tmp_path / "absent.json") is None
    scores = {
        job: {"margin": {"lds": lds, "se": 0.02}, "magnitude": {"slope": slope, "pearson": 0.5}}
        for job, lds, slope in (
            ("ours_ekfac_all", 0.2, 0.01),
            ("ours_ekfac_all_lambda0.1", 0.3, 0.1),
            ("tracin_all", 0.25, None),
            ("ours_direct_head", 0.1, 5.0),
        )
    }
    result = {
        "n_models": 50,
        "scores": scores,
        "workload": {"classes": ["n01443537", "n07749582"], "image_size": 32, "epochs": 15, "corrupt_fraction": 0.1},
    }
    writer.write_measured(result, tmp_path / "measured.json")
    table = load_measured(tmp_path / "measured.json")
    assert set(table) == {("ekfac", "all"), ("tracin", "all"), ("direct", "head")}  # λ-scan rows stay out
    m = measured_for("ekfac", "all", tmp_path / "measured.json")
    assert (m.lds, m.lds_se, m.n_models, m.job, m.pearson) == (0.2, 0.02, 50, "ours_ekfac_all", 0.5)
    assert "LDS 0.20 ± 0.02 (50 retrained models" in m.details() and "×100" in m.details()


def test_writing_measured_keeps_notes_costs_scope_notes_and_unscored_methods(tmp_path):
    from influence_core.measured import load_measured, scope_details, scope_note

    path = tmp_path / "measured.json"
    path.write_text(
        json.dumps(
            {
                "workload": "old",
                "n_models": 0,
                "methods": {
                    "ekfac/all": {"job": "ours_ekfac_all", "lds": None, "cost_x_floor": 31.0, "note": "Approx."},
                    "cg/head": {"job": "ours_cg_head", "lds": None, "note": "Exact up to tolerance."},
                },
                "scope_notes": {"all": "Whole network: approximate."},
            }
        )
    )
    scores = {
        "ours_ekfac_all": {"margin": {"lds": 0.2, "se": 0.02}, "magnitude": {"slope": 0.5}},
        "ours_ekfac_all_rel0.1": {"margin": {"lds": 0.3, "se": 0.02}, "magnitude": {"slope": 1.0}},
    }
    result = {
        "n_models": 50,
        "scores": scores,
        "workload": {"classes": ["goldfish", "lemon"], "image_size": 64, "epochs": 15, "corrupt_fraction": 0.1},
    }
    writer.write_measured(result, path)
    table = load_measured(path)
    assert set(table) == {("ekfac", "all"), ("cg", "head")}  # the damping-scan row stays out; cg/head is kept
    ekfac = table[("ekfac", "all")]
    assert (ekfac.lds, ekfac.cost_x_floor, ekfac.note) == (0.2, 31.0, "Approx.")
    assert table[("cg", "head")].note == "Exact up to tolerance." and table[("cg", "head")].lds is None
    assert scope_note("all", path) == scope_details("all", path) == "Whole network: approximate."


def test_costs_come_from_a_benchmark_run_and_leave_the_rest(tmp_path):
    from influence_core.measured import load_measured

    path = tmp_path / "measured.json"
    methods = {
        "kfac/all": {"job": "ours_kfac_all", "lds": 0.4, "cost_x_floor": 3.0, "note": "Approx."},
        "cg/head": {"job": "ours_cg_head", "lds": 0.3, "cost_x_floor": 0.5},
    }
    path.write_text(json.dumps({"workload": "w", "n_models": 50, "methods": methods}))
    report = {
        "date": "2026-11-30 17:12 UTC",
        "floor": {"forward_backward_s": 4.0},
        "jobs": {"ours_kfac_all": {"matrix": {"seconds_full": 20.0}}, "ours_cg_head": {"matrix": {}}},
    }
    (tmp_path / "results.json").write_text(json.dumps(report))
    data = writer.update_costs(path, tmp_path / "results.json")
    table = load_measured(path)
    assert (table[("kfac", "all")].cost_x_floor, table[("kfac", "all")].lds, table[("kfac", "all")].note) == (
        5.0,
        0.4,
        "Approx.",
    )
    assert table[("cg", "head")].cost_x_floor == 0.5  # no timing in that run: the earlier cost stays
    assert "2026-11-30 17:12 UTC" in data["costs_from"] and "4.00 s" in data["costs_from"]


def test_paired_difference_is_the_mean_per_test_point_gap_with_its_error():
    reference = np.array([0.1, 0.2, np.nan, 0.4])
    same = evaluation.paired_difference(reference.copy(), reference)
    assert same["mean"] == 0 and same["se"] == 0 and same["n_test"] == 3  # the undefined test point is left out
    shifted = evaluation.paired_difference(reference + np.array([0.01, 0.03, 0.0, 0.02]), reference)
    assert shifted["mean"] == pytest.approx(0.02) and shifted["se"] == pytest.approx(0.01 / np.sqrt(3))


def test_only_default_jobs_of_ours_name_a_method_for_the_app():
    """Variants (λ scan, full rank, fit size, test subsets) and peers' jobs must not pose as a product default."""
    scope = writer.job_method_scope
    assert scope("ours_ekfac_all") == ("ekfac", "all") and scope("tracin_all") == ("tracin", "all")
    assert scope("ours_direct_head") == ("direct", "head")
    for variant in (
        "ours_ekfac_all_full",
        "ours_ekfac_all_lambda0.1",
        "ours_ekfac_all_rel0.01",
        "ours_ekfac_all_fit256",
        "ours_ekfac_all_fitall",
        "ours_kfac_all_rank256",
        "ours_kfac_all_rankfull",
        "ours_kfac_all_pos16",
        "ours_kfac_all_posall",
        "tracin_all_first22",
        "kronfluence_ekfac_all",
        "pydvl_cg_head",
    ):
        assert scope(variant) is None, variant


def test_writing_measured_gives_head_jobs_their_error_against_the_exact_head(tmp_path):
    """A head job's fidelity is the relative Frobenius error of its matrix against ``ours_direct_head`` in the
    same matrices folder (same run, same damping); whole-network jobs get none from it."""
    from influence_core.measured import load_measured

    matrices = tmp_path / "matrices"
    matrices.mkdir()
    exact = np.arange(1.0, 13.0).reshape(3, 4)
    np.save(matrices / "ours_direct_head.npy", exact)
    np.save(matrices / "ours_ekfac_head.npy", exact * 1.1)  # 10 % too large everywhere: relative error 0.1
    np.save(matrices / "ours_ekfac_all.npy", exact * 3)
    scores = {
        job: {"margin": {"lds": 0.3, "se": 0.02}, "magnitude": {"slope": 1.0, "pearson": 0.5}}
        for job in ("ours_direct_head", "ours_ekfac_head", "ours_ekfac_all")
    }
    result = {
        "n_models": 50,
        "scores": scores,
        "workload": {"classes": ["goldfish", "lemon"], "image_size": 64, "epochs": 15, "corrupt_fraction": 0.1},
    }
    path = tmp_path / "measured.json"
    writer.write_measured(result, path, matrices=matrices)
    table = load_measured(path)
    assert table[("ekfac", "head")].fidelity == "rel. err 0.1 vs exact direct (head, same damping)"
    assert table[("direct", "head")].fidelity is None and table[("ekfac", "all")].fidelity is None
