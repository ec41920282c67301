"""Full-network retraining check: remove the training points an influence matrix ranks most helpful or most
harmful for a test image (and a random group), retrain from scratch, and compare the measured change of that
image's test loss with the change each job's matrix predicts.

    .venv/bin/python benchmarks/retrain_fidelity.py RUN_DIR JOBS_DIR OUT_DIR [--n-test-images 3]
        [--group-size 20] [--selector ours_kfac_all] [--fallback-selector ours_direct_head] [--seed 0]
        [--device cpu] [--epochs N  (smoke tests only: overrides the run's epochs)]

Prediction (influence_core's convention, positive = helpful): removing the set G of training points changes
test point t's loss by about ``Σ_{i∈G} I[t, i] / n_train``. Every retrain uses the run's recipe
(``TrainConfig.from_run``, same seed: the same initial weights, and the full set's shuffling and augmentation
draws with the removed points left out of their batches, so the retrain is the run minus them) with no
intermediate checkpoints; its test losses are cached in ``OUT_DIR/retrain/<name>/result.json`` (keyed by the
run, the recipe and the removed points) and its model is deleted once measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from influence_core import Run, TrainConfig
from influence_core.errors import InfluenceLensError
from influence_core.storage import atomic_write_json, read_json, resolve_device, stable_hash
from influence_core.training import retrain_without  # the run's own training, minus the removed points

KEY_JOBS = ("ours_direct_head", "ours_kfac_all", "ours_ekfac_all", "kronfluence_ekfac_all")
"""Jobs shown in the raw table besides the selector (when present)."""


def per_sample_loss(model, x: torch.Tensor, y: torch.Tensor, dev: torch.device) -> np.ndarray:
    """(n,) float64 per-sample cross-entropy of ``model`` (eval mode) on ``x`` (n, 3, H, W), ``y`` (n,)."""
    model.to(dev).eval()
    with torch.no_grad():
        return np.concatenate(
            [
                F.cross_entropy(model(xb.to(dev)), yb.to(dev), reduction="none").cpu().numpy()
                for xb, yb in zip(x.split(256), y.split(256), strict=True)
            ]
        ).astype(np.float64)


def retrain(run: Run, config: TrainConfig, removed: np.ndarray, work_dir: Path, dev: torch.device) -> dict:
    """Train from scratch without the training points ``removed`` (indices); {"test_loss": (n_test,), "seconds"}.

    Cached in ``work_dir/result.json``; the retrained model is not kept."""
    key = stable_hash("retrain-v2", run.key, dataclasses.asdict(config), np.sort(removed).astype(np.int64))
    cache = work_dir / "result.json"
    if cache.is_file() and (hit := read_json(cache))["key"] == key:
        return hit | {"cached": True}
    exclude = np.zeros(len(run.labels("train")), bool)
    exclude[removed] = True
    t0 = time.perf_counter()
    model, _ = retrain_without(run, exclude, config=config, device=str(dev))
    x_te, y_te = run.tensors("test")
    result = {
        "key": key,
        "n_removed": int(len(removed)),
        "seconds": round(time.perf_counter() - t0, 1),
        "test_loss": per_sample_loss(model, x_te[:], y_te, dev).tolist(),
    }
    atomic_write_json(cache, result)
    return result | {"cached": False}


def _matrices(jobs_dir: Path) -> dict[str, np.ndarray]:
    """Every job's (k, j) influence matrix (memory-mapped), by job name."""
    return {p.parent.name: np.load(p, mmap_mode="r") for p in sorted(Path(jobs_dir).glob("*/influence.npy"))}


def _summary(pred: np.ndarray, meas: np.ndarray) -> dict:
    """Pearson r, least-squares slope through the origin (measured on predicted) and sign agreement."""
    ok = len(pred) > 1 and pred.std() > 0 and meas.std() > 0
    return {
        "pairs": len(pred),
        "pearson": float(np.corrcoef(pred, meas)[0, 1]) if ok else None,
        "slope": float(pred @ meas / (pred @ pred)) if pred.any() else None,
        "sign_agreement": float(np.mean(np.sign(pred) == np.sign(meas))) if len(pred) else None,
    }


def retrain_fidelity(
    run: Run,
    jobs_dir,
    out_dir,
    selector: str = "ours_kfac_all",
    fallback_selector: str = "ours_direct_head",
    n_test_images: int = 3,
    group_size: int = 20,
    seed: int = 0,
    device: str = "cpu",
    log=print,
    epochs: int | None = None,
) -> dict:
    """Measured vs predicted test-loss changes for helpful / harmful / random removal groups; a JSON-able dict.

    The selector is ``selector``'s matrix if it covers every training column, else ``fallback_selector``'s.
    Test images: ``n_test_images`` indices drawn without replacement (``default_rng(seed)``) from the rows the
    selector covers, in increasing order. Groups for image t: the selector's ``group_size`` largest
    ``I[t, :]`` (helpful), its smallest (harmful), and a random group (``default_rng([seed, t])``).
    ``epochs`` overrides the recipe's (smoke tests only)."""
    out_dir, dev = Path(out_dir), resolve_device(device)
    mats = _matrices(jobs_dir)
    n_train, test_ids = len(run.labels("train")), run.ids("test")
    used = next((s for s in (selector, fallback_selector) if s in mats and mats[s].shape[1] == n_train), None)
    if used is None:
        raise InfluenceLensError(
            f"Neither {selector} nor {fallback_selector} has an influence matrix over all "
            f"{n_train} training points in {jobs_dir}.",
            "run one of those jobs uncapped",
        )
    sel = mats[used]
    chosen = np.sort(np.random.default_rng(seed).choice(sel.shape[0], min(n_test_images, sel.shape[0]), replace=False))
    groups = []  # (test index, kind, removed training indices)
    for t in chosen.tolist():
        order = np.argsort(-np.asarray(sel[t], np.float64), kind="stable")
        groups += [
            (t, "helpful", order[:group_size]),
            (t, "harmful", order[::-1][:group_size]),
            (t, "random", np.random.default_rng([seed, t]).choice(n_train, group_size, replace=False)),
        ]

    config = dataclasses.replace(TrainConfig.from_run(run), n_checkpoints=0, **({"epochs": epochs} if epochs else {}))
    plan = [("baseline", np.zeros(0, np.int64))] + [(f"test{t}_{kind}", g) for t, kind, g in groups]
    losses, seconds = {}, {}
    for i, (name, removed) in enumerate(plan, 1):
        r = retrain(run, config, removed, out_dir / "retrain" / name, dev)
        losses[name], seconds[name] = np.asarray(r["test_loss"]), r["seconds"]
        log(f"retrain {i}/{len(plan)} {name}: " + ("cached" if r["cached"] else f"{r['seconds']:.0f} s"))
    x_te, y_te = run.tensors("test")
    original = per_sample_loss(run.load_model(), x_te[:], y_te, dev)

    rows = []
    for t, kind, g in groups:
        pred = {
            job: float(np.asarray(m[t, g], np.float64).sum() / n_train)
            for job, m in mats.items()
            if t < m.shape[0] and g.max() < m.shape[1]
        }
        rows.append(
            {
                "test_index": t,
                "test_id": test_ids[t],
                "group": kind,
                "removed": g.tolist(),
                "measured": float(losses[f"test{t}_{kind}"][t] - losses["baseline"][t]),
                "predicted": pred,
            }
        )
    summary = {}
    for job in mats:
        pairs = np.array([(r["predicted"][job], r["measured"]) for r in rows if job in r["predicted"]]).reshape(-1, 2)
        if len(pairs):
            summary[job] = _summary(pairs[:, 0], pairs[:, 1])
    return {
        "selector": selector,
        "selector_used": used,
        "n_train": n_train,
        "group_size": group_size,
        "seed": seed,
        "epochs": config.epochs,
        "n_retrains": len(plan),
        "retrain_seconds": seconds,
        "test_images": [
            {
                "test_index": t,
                "test_id": test_ids[t],
                "loss_original": float(original[t]),
                "loss_baseline": float(losses["baseline"][t]),
            }
            for t in chosen.tolist()
        ],
        "baseline_vs_original_max_abs": float(np.abs(losses["baseline"] - original).max()),
        "rows": rows,
        "summary": summary,
    }


def _f(v, fmt=".3g") -> str:
    return "–" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    """The section "## Fidelity to retraining (full network)" of the benchmark report."""
    rows, imgs = result["rows"], result["test_images"]
    rand = [abs(r["measured"]) for r in rows if r["group"] == "random"]
    chosen = [abs(r["measured"]) for r in rows if r["group"] != "random"]
    jobs = list(dict.fromkeys([result["selector_used"], *(j for j in KEY_JOBS if j in result["summary"])]))
    text = (
        f"For {len(imgs)} test images we removed {result['group_size']} of the {result['n_train']} training points — "
        f"the most helpful and the most harmful by `{result['selector_used']}`, and a random group — and retrained "
        f"the whole network from scratch with the run's recipe ({result['epochs']} epochs, same seed): "
        f"{result['n_retrains']} retrains, including a baseline on all the data. Measured Δloss = the image's test "
        f"loss without the group − the baseline's; predicted Δloss = Σ_(i∈G) I[t, i] / n_train. Retrains keep the "
        f"full set's batch order and drop the removed points from their batches; training is still chaotic, so "
        f"measured changes include noise: random groups moved the loss by "
        f"{_f(np.mean(rand) if rand else None)} on average (helpful/harmful groups: "
        f"{_f(np.mean(chosen) if chosen else None)}). "
        + (
            "The baseline retrain reproduces the original model's test losses exactly."
            if result["baseline_vs_original_max_abs"] == 0
            else "The baseline retrain's test losses differ from "
            f"the original model's by up to {result['baseline_vs_original_max_abs']:.3g}."
        )
    )
    per_job = [
        [j, s["pairs"], _f(s["pearson"], ".3f"), _f(s["slope"]), _f(s["sign_agreement"], ".2f")]
        for j, s in sorted(
            result["summary"].items(), key=lambda kv: (kv[1]["pearson"] is None, -(kv[1]["pearson"] or 0))
        )
    ]
    base = {i["test_index"]: i["loss_baseline"] for i in imgs}
    raw = [
        [
            f"{r['test_index']} ({Path(r['test_id']).name})",
            r["group"],
            f"{base[r['test_index']]:.3f}",
            f"{r['measured']:+.4f}",
            *(_f(r["predicted"].get(j), "+.4f") for j in jobs),
        ]
        for r in rows
    ]
    return (
        "\n\n".join(
            [
                "## Fidelity to retraining (full network)",
                text,
                table(["job", "pairs", "Pearson r", "slope (measured on predicted)", "sign agreement"], per_job),
                table(
                    ["test image", "group", "baseline loss", "measured Δloss", *(f"predicted `{j}`" for j in jobs)], raw
                ),
            ]
        )
        + "\n"
    )


def table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows]])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("jobs_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n-test-images", type=int, default=3)
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--selector", default="ours_kfac_all")
    p.add_argument("--fallback-selector", default="ours_direct_head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=None, help="override the run's epochs (smoke tests only)")
    a = p.parse_args(argv)
    result = retrain_fidelity(
        Run(a.run_dir),
        a.jobs_dir,
        a.out_dir,
        a.selector,
        a.fallback_selector,
        a.n_test_images,
        a.group_size,
        a.seed,
        a.device,
        epochs=a.epochs,
        log=lambda m: print(f"[retrain {time.strftime('%H:%M:%S')}] {m}", flush=True),
    )
    atomic_write_json(a.out_dir / "retrain_fidelity.json", result)
    print(markdown(result))


if __name__ == "__main__":
    main()
