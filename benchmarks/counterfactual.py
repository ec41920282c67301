"""Counterfactual benchmark: remove the k training images a method ranks as supporting a test image's prediction,
retrain with the product's recipe, and count how often the prediction flips (against removing as many random
images of the same labels).

    .venv/bin/python benchmarks/counterfactual.py [--quick] [--tests 30] [--ks 5 10 20 40]
        [--methods direct:head kfac:all ekfac:all] [--device auto] [workload options of lds.py]

For each test image (half of them predicted right, half wrong, as far as the test set has them) and each k, the
removed images are the top k in the image's own direction (:func:`influence_core.counterfactual.reference_direction`:
the most helpful for a right prediction, the most harmful for a wrong one, i.e. those supporting the prediction on
two classes), and the control removes as many random training images with the same labels. Every retraining is the
run's own recipe minus those images (``training.retrain_without``), kept as a check in the run directory
(``checks/``), so an interrupted benchmark resumes where it stopped.

Reported per method and k: the share of predictions flipped and the mean drop of the prediction's margin (logit
of the predicted class minus the other; on two classes ``±`` the label's margin), and per test image the smallest
k of those tried that flips it (TRAK's / Ilyas et al.'s brittleness measure; None when none does). Writes
``OUT/counterfactual.json`` (``--quick``: ``OUT/counterfactual-quick.json``).

Cost: one training per (method, test image, k) and per (test image, k) for the control: at the defaults
(3 methods + random, 30 images, 4 k) 480 trainings of the product's recipe: with a training of a tiny-imagenet
pair taking minutes on 2 CPU cores, half a day or more there, so it is meant for a GPU machine. ``--quick`` (2 test images, k = 5, 32 px, 2 epochs, 30 % of the images) shows the
pipeline end to end in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lds.py beside this file

import lds  # noqa: E402

from influence_core import counterfactual as cf  # noqa: E402
from influence_core import train  # noqa: E402
from influence_core.pipeline import InfluenceSettings, compute_influence, parse_settings  # noqa: E402
from influence_core.storage import atomic_write_json  # noqa: E402

log = logging.getLogger("counterfactual")
BENCH = Path(__file__).resolve().parent
DEFAULT_METHODS = ("direct:head", "kfac:all", "ekfac:all")
"""``method:scope`` at their defaults: the explorer's last-layer default and the whole-network methods."""


def settings_of(spec: str) -> InfluenceSettings:
    method, _, scope = spec.partition(":")
    return parse_settings(method, scope=scope or "head", checkpoints=False)


def chosen_tests(labels: np.ndarray, predicted: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` test positions, half predicted wrong (all of them if fewer) and the rest right, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(labels != predicted), np.flatnonzero(labels == predicted)
    n_wrong = min(len(wrong), n // 2)
    picked = [*rng.permutation(wrong)[:n_wrong], *rng.permutation(right)[: n - n_wrong]]
    return sorted(int(t) for t in picked)


def prediction_margin_drop(check: cf.Check) -> float:
    """How much the margin of the run's predicted class fell: the label's margin drop for a right prediction, its
    rise for a wrong one (exact on two classes)."""
    right = check.before_margin > 0
    return -check.margin_change if right else check.margin_change


def summarise(found: list[cf.Check], ks: list[int]) -> dict:
    """Share flipped and mean margin drop per k, the smallest flipping k per test image, and for methods in loss
    units how often the predicted sign of the loss change was right."""
    by_k = {}
    for k in ks:
        at_k = [c for c in found if c.k == k]
        if at_k:
            by_k[str(k)] = {
                "n": len(at_k),
                "flipped": float(np.mean([c.flipped for c in at_k])),
                "margin_drop": float(np.mean([prediction_margin_drop(c) for c in at_k])),
            }
    tests = sorted({c.test for c in found})
    smallest = {
        str(t): min((c.k for c in found if c.test == t and c.flipped), default=None) for t in tests
    }  # None: no k tried flips it
    predicted = [c for c in found if c.predicted_loss_change is not None]
    out: dict = {"by_k": by_k, "smallest_flipping_k": smallest}
    if predicted:
        out["loss_sign_right"] = float(
            np.mean([np.sign(c.predicted_loss_change) == np.sign(c.loss_change) for c in predicted])
        )
        out["predicted_flip_right"] = float(np.mean([c.predicted_flip == c.flipped for c in predicted]))
    return out


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="[counterfactual %(asctime)s] %(message)s", stream=sys.stdout)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lds.add_workload_options(p)
    p.set_defaults(out=BENCH / "out" / "counterfactual")
    p.add_argument("--quick", action="store_true", help="2 test images, k = 5, 32 px, 2 epochs, 30 %% of the images")
    p.add_argument("--tests", type=int, default=30)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD:SCOPE")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    config = lds.workload_config(args)
    if args.quick:
        config = dataclasses.replace(config, image_size=32, epochs=2, downsample=0.3, n_checkpoints=0)
        args.tests, args.ks = 2, [5]
    name = "counterfactual-quick" if args.quick else "counterfactual"
    t0 = time.perf_counter()
    run = train(
        config, args.out / f"run-{config.image_size}px-{config.epochs}ep-{config.downsample:g}", device=args.device
    )
    log.info("run: %s (test accuracy %.3f)", run.path, run.metrics["accuracy_test"])
    labels, probs = run.labels("test"), run.predictions["probs_test"]
    tests = chosen_tests(labels, probs.argmax(1), args.tests, args.seed)
    results, control_result = {}, None
    for spec in args.methods:
        result = compute_influence(run, settings_of(spec), device=args.device)
        control_result = control_result or result  # the control's labels follow the first method's top k
        found = []
        for t in tests:
            for k in args.ks:
                direction = cf.reference_direction(probs[t], int(labels[t]))
                found.append(cf.run_check(result, t, k, direction, device=args.device))  # logs what it found
        results[spec] = summarise(found, args.ks) | {"units_note": cf.loss_units_note(result)}
    assert control_result is not None
    controls = [cf.run_check(control_result, t, k, "random", device=args.device) for t in tests for k in args.ks]
    results["random"] = summarise(controls, args.ks)
    report = {
        "workload": f"{' vs '.join(config.classes or [])}, {config.image_size} px, {config.epochs} epochs, "
        f"{config.downsample:.0%} of the images, {config.corrupt_fraction:.0%} of the labels flipped, ResNet18 from "
        "scratch",
        "n_train": len(run.labels("train")),
        "test_images": tests,
        "right_predictions": int((probs.argmax(1) == labels)[tests].sum()),
        "ks": args.ks,
        "methods": results,
        "trainings": len(cf.checks(run)),
        "seconds": round(time.perf_counter() - t0, 1),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "quick": args.quick,
    }
    atomic_write_json(args.out / f"{name}.json", report)
    print(markdown(report))


def markdown(report: dict) -> str:
    """The share flipped (mean margin drop) per method and k, as a Markdown table."""
    ks = report["ks"]
    lines = [
        f"Counterfactual: {report['workload']}; {len(report['test_images'])} test images "
        f"({report['right_predictions']} predicted right)",
        "",
        "| method | "
        + " | ".join(f"k = {k}: flipped (margin drop)" for k in ks)
        + " | images flipped by some k (smallest k each) |",
        "|---" * (len(ks) + 2) + "|",
    ]
    for spec, found in report["methods"].items():
        cells = [
            f"{found['by_k'][str(k)]['flipped']:.0%} ({found['by_k'][str(k)]['margin_drop']:+.2f})"
            if str(k) in found["by_k"]
            else "—"
            for k in ks
        ]
        smallest = list(found["smallest_flipping_k"].values())
        flipped = [k for k in smallest if k is not None]
        cells.append(
            f"{len(flipped)} of {len(smallest)}" + (f" ({', '.join(map(str, sorted(flipped)))})" if flipped else "")
        )
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
