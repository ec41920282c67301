"""A simulated review session: how many flipped labels a reviewer finds, and what the model gains, per round.

    .venv/bin/python benchmarks/review_session.py --dataset tiny-imagenet:../shared/data/tiny-imagenet-200 \
        --classes goldfish lemon [--rounds 6] [--round-share 0.05] [--epochs 15] [--out benchmarks/out/review_session]

One run of the product's recipe with 10 % of the training labels flipped (``influence-core train --corrupt-fraction
0.1``); an oracle reviewer (the true labels) reviews the queue in rounds of ``--round-share`` of the training set:
a flipped image is marked *mislabeled* with its true class, any other *keep*.

* **static**: one ranking, the run's second pass (today's best signal), reviewed top down; the decisions of the
  first rounds up to 20 % are applied once (one child run) for its test accuracy.
* **iterative**: round 1 reviews the same top of that ranking; after each round the decisions are applied
  (``apply_reviews``: a child run of the previous one, as the app's *Retrain with N decisions*), and the rest of the
  queue is ranked by the child's own training dynamics (mean training loss over the epochs on its cleaner labels).
* **true labels**: the same recipe on the true labels, the upper bound of the test accuracy.
* **round two, other signals**: what the second round (the 10 % point) would have found had the rest of the queue
  been ranked by each of a few other signals of the same runs (:func:`round_two_alternatives`; the child's own
  second pass costs one more training, its cross-validated loss two half-size ones). ``--round-two-only`` adds
  them to a pair's existing JSON from its runs.

Writes ``<results>/<pair>.json`` (every round: share reviewed, flips found, test accuracy, seconds);
``benchmarks/summarize.py`` turns the pairs' files into the table of the generated benchmark pages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from influence_core import TrainConfig, train
from influence_core.analysis import rank_suspects
from influence_core.data import parse_spec
from influence_core.fixes import apply_reviews, true_labels_config
from influence_core.paths import RunPaths
from influence_core.review import ReviewStore
from influence_core.run import Run
from influence_core.second_pass import compute_second_pass, label_losses, load_second_pass
from influence_core.training import retrain_without

REVIEWER = "oracle"
STATIC_ROUNDS = 6
"""Rounds of the static ranking's flips-found curve (30 % at 5 % a round)."""


def oracle_review(run: Run, ids: list[str]) -> None:
    """Record the oracle's decision on each of ``ids`` in ``run``'s store: mislabeled (true class) or keep."""
    store = ReviewStore.for_run(run)
    part = run.part("train").set_index("id")
    for sample_id in ids:
        label, true = int(part.loc[sample_id, "label"]), int(part.loc[sample_id, "true_label"])
        if label != true:
            store.record(sample_id, "mislabeled", REVIEWER, run.classes[true], idempotency_key=uuid.uuid4().hex)
        else:
            store.record(sample_id, "keep", REVIEWER, idempotency_key=uuid.uuid4().hex)


def found_share(reviewed: list[str], flipped_ids: set[str]) -> float:
    return len(flipped_ids.intersection(reviewed)) / max(len(flipped_ids), 1)


def cross_validated_loss(run: Run, folds: int = 2, seed: int = 0) -> np.ndarray:
    """(n_train,) float32 loss of each training image's given label under the model trained without its fold
    (``folds`` trainings of ``run``'s recipe, each on the other folds; folds drawn per class with ``seed``)."""
    labels = np.asarray(run.labels("train"))
    fold = np.empty(len(labels), int)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(len(members)) % folds
    x, y = run.tensors("train")
    loss = np.zeros(len(labels), np.float32)
    for f in range(folds):
        model, _ = retrain_without(run, fold == f)
        loss[fold == f] = label_losses(model, x[fold == f], y[fold == f])
    return loss


def round_two_alternatives(pair_dir: Path, round_share: float) -> dict:
    """Flips found after two rounds (round one: the top of the parent's second pass, as both flows) had the second
    round been ranked by each signal below, from the cached runs ``parent`` and ``iterative-1`` of ``pair_dir``.

    Returns ``{"flips_found": {signal: share of the flips}, "child_second_pass_seconds": s,
    "cross_validation_seconds": s}``."""
    parent, child = Run(pair_dir / "parent"), Run(pair_dir / "iterative-1")
    parent_second = load_second_pass(parent)
    if parent_second is None or child.ids("train") != parent.ids("train"):
        raise SystemExit(f"{pair_dir}: run the whole session first (benchmarks/review_session.py)")
    n = len(parent.ids("train"))
    per_round = int(np.ceil(round_share * n))
    flipped = parent.flipped()
    reviewed = np.zeros(n, bool)
    reviewed[rank_suspects(parent_second.loss)[:per_round]] = True
    child_second = compute_second_pass(child)  # cached in the run: its seconds are those of the first call
    loss = child.dynamics["loss"]
    unreviewed = np.flatnonzero(~reviewed)
    t0 = time.perf_counter()
    cross_validated = cross_validated_loss(child)
    cross_validation_seconds = time.perf_counter() - t0

    def fraction(score: np.ndarray) -> np.ndarray:
        return rankdata(score) / n  # (n,) in (0, 1], higher = more suspicious

    signals = {
        "the child's mean training loss (the iterative flow)": loss.mean(0),
        "the parent's second pass (the static flow)": parent_second.loss,
        "the child's own second pass (one more training a round)": child_second.loss,
        "the child's loss after its last epoch": loss[-1],
        "the child's mean loss over its first 5 epochs": loss[:5].mean(0),
        "mean rank: the parent's second pass and the child's mean loss": fraction(parent_second.loss)
        + fraction(loss.mean(0)),
        "mean rank: both second passes": fraction(parent_second.loss) + fraction(child_second.loss),
        "the child's 2-fold cross-validated loss (two half-size trainings a round)": cross_validated,
    }
    found = {}
    for name, score in signals.items():
        pick = unreviewed[rank_suspects(score[unreviewed])[:per_round]]
        found[name] = float((flipped[reviewed].sum() + flipped[pick].sum()) / max(flipped.sum(), 1))
    return {
        "flips_found": found,
        "child_second_pass_seconds": child_second.seconds,
        "cross_validation_seconds": cross_validation_seconds,
    }


def session(args: argparse.Namespace, pair_dir: Path) -> dict:
    config = TrainConfig(
        dataset=args.dataset,
        classes=args.classes,
        epochs=args.epochs,
        corrupt_fraction=0.1,
        image_size=args.image_size,
        downsample=args.downsample,
    )
    t0 = time.perf_counter()
    parent = train(config, pair_dir / "parent")
    parent_seconds = time.perf_counter() - t0
    ids = parent.ids("train")
    n = len(ids)
    flipped_ids = set(np.asarray(ids)[parent.flipped()])
    per_round = int(np.ceil(args.round_share * n))

    t0 = time.perf_counter()
    second = compute_second_pass(parent)
    static_order = [ids[p] for p in rank_suspects(second.loss)]
    second_seconds = time.perf_counter() - t0

    # static: one ranking reviewed top down
    static = [
        {"reviewed": r * per_round / n, "flips_found": found_share(static_order[: r * per_round], flipped_ids)}
        for r in range(1, max(args.rounds, STATIC_ROUNDS) + 1)  # no training needed: always up to 30 %
    ]
    # its test accuracy once the first 20 % are applied (the static flow applies once)
    static_dir = pair_dir / "static-20pct"
    k20 = int(np.ceil(0.2 * n / per_round)) * per_round
    if not RunPaths(static_dir).train_key.is_file():
        oracle_review(parent, static_order[:k20])
    t0 = time.perf_counter()
    static_child = apply_reviews(parent, static_dir)
    static_accuracy_20 = static_child.metrics["accuracy_test"]
    static_apply_seconds = time.perf_counter() - t0

    # iterative: apply, retrain, re-rank the rest after every round; its own chain of runs, starting from a copy
    # of the parent without the static decisions
    start = pair_dir / "iterative-0"
    if not start.exists():
        shutil.copytree(parent.path, start, ignore=shutil.ignore_patterns("reviews.sqlite*"))
    current = Run(start)
    reviewed: list[str] = []
    order = static_order
    iterative = []
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        seen = set(reviewed)
        batch = [i for i in order if i not in seen][:per_round]
        oracle_review(current, batch)
        reviewed += batch
        current = apply_reviews(current, pair_dir / f"iterative-{r}")
        mean_loss = current.dynamics["loss"].mean(0)
        train_ids = current.ids("train")
        order = [train_ids[p] for p in rank_suspects(mean_loss)]
        iterative.append(
            {
                "reviewed": len(reviewed) / n,
                "flips_found": found_share(reviewed, flipped_ids),
                "accuracy_test": current.metrics["accuracy_test"],
                "f1_test": current.metrics["f1_test"],
                "flips_left_in_training": int(current.flipped().sum()),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  round {r}: {iterative[-1]}", flush=True)

    round_two = round_two_alternatives(pair_dir, args.round_share) if args.rounds >= 2 else None
    true_run = train(true_labels_config(parent), pair_dir / "true-labels") if not args.no_true_labels else None
    return {
        "dataset_kind": parse_spec(args.dataset)[0],
        "classes": args.classes,
        "n_train": n,
        "n_flipped": len(flipped_ids),
        "round_share": args.round_share,
        "parent": {
            "accuracy_test": parent.metrics["accuracy_test"],
            "f1_test": parent.metrics["f1_test"],
            "seconds": parent_seconds,
        },
        "second_pass": {"accuracy_test": second.accuracy_test, "seconds": second_seconds},
        "static": {"rounds": static, "accuracy_test_after_20pct": static_accuracy_20, "seconds": static_apply_seconds},
        "iterative": {"rounds": iterative},
        "round_two": round_two,
        "true_labels": None
        if true_run is None
        else {"accuracy_test": true_run.metrics["accuracy_test"], "f1_test": true_run.metrics["f1_test"]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tiny-imagenet:../shared/data/tiny-imagenet-200")
    p.add_argument("--classes", nargs="+", default=["goldfish", "lemon"])
    p.add_argument("--rounds", type=int, default=6, help="rounds of review (default: 6, i.e. 30 %% at 5 %% a round)")
    p.add_argument("--round-share", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, help="default: the dataset's (64 px for tiny-imagenet)")
    p.add_argument("--downsample", type=float, default=1.0, help="keep this share of each class (smoke runs)")
    p.add_argument("--no-true-labels", action="store_true", help="skip the run on the true labels")
    p.add_argument(
        "--round-two-only",
        action="store_true",
        help="only add the second round's other signals to the pair's existing JSON, from its runs under --out",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/review_session"), help="the runs")
    p.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results/review-session"),
        help="where the pair's JSON goes (benchmarks/summarize.py makes the tables from it)",
    )
    args = p.parse_args()
    slug = "+".join(c.replace(" ", "-") for c in args.classes)
    pair_dir = args.out / slug
    path = args.results / f"{slug}.json"
    if args.round_two_only:
        result = json.loads(path.read_text())
        result["round_two"] = round_two_alternatives(pair_dir, result["round_share"])
    else:
        result = session(args, pair_dir)
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("static", "iterative"):
        rounds = result[name]["rounds"]
        print(name, " ".join(f"{r['reviewed']:.0%}:{r['flips_found']:.0%}" for r in rounds))
    for name, found in (result["round_two"] or {"flips_found": {}})["flips_found"].items():
        print(f"  after 2 rounds by {name}: {found:.0%}")
    print(f"written to {path}; run benchmarks/summarize.py for the tables")


if __name__ == "__main__":
    main()
