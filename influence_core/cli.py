"""influence-core: train, compute influences and report, from the command line.

Every user-fixable problem prints one line ``error: <problem> Fix: <fix>`` (exit code 2), never a traceback;
a full disk, read-only file system or missing permission is one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .errors import InfluenceLensError
from .progress import TqdmProgress
from .storage import check_output_dir, write_error

DATA_SELECTION = {"dataset": "demo", "classes": None, "split": (0.8, 0.1, 0.1), "seed": 0, "downsample": 1.0}
"""The ``train`` options that decide which samples land in the training set, with their defaults."""

NO_WAIT_HELP = "fail at once if another process is writing the run directory (default: wait for it, with a message)"


def _train(args) -> None:
    from .training import TrainConfig, train

    check_output_dir(args.run_dir)
    clean = _clean_run(args)
    selection = _data_selection(args, clean)
    config = TrainConfig(
        **selection,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        train_layers=args.train_layers,
        augment_flip=not args.no_flip,
        augment_shift=args.augment_shift,
        n_checkpoints=args.checkpoints,
        corrupt_fraction=args.corrupt_fraction,
        corrupt_mode=args.corrupt_mode,
        weights=args.weights,
        on_bad_image=args.on_bad_image,
    )
    if clean is not None:
        from .pipeline import clean_run_scores

        dataclasses.replace(config, corrupt_mode="random").check()  # cheap checks before the clean run's influence
        bar = TqdmProgress()
        try:
            scores = clean_run_scores(clean, device=args.device, progress=bar)
        finally:
            bar.close()
        config = dataclasses.replace(config, corrupt_scores=scores.tolist())
    bar = TqdmProgress()
    try:
        train(config, args.run_dir, device=args.device, retrain=args.retrain, progress=bar, wait=not args.no_wait)
    finally:
        bar.close()


def _clean_run(args):
    """The run given by ``--scores-from`` (only with ``--corrupt-mode top-influence``), or None."""
    from .run import Run

    if args.scores_from is None:
        return None
    if args.corrupt_mode != "top-influence":
        raise InfluenceLensError(
            "--scores-from is only used by --corrupt-mode top-influence.",
            "add --corrupt-mode top-influence, or leave --scores-from out",
        )
    return Run(args.scores_from)


def _data_selection(args, clean) -> dict:
    """``DATA_SELECTION`` from the options given, else from the clean run (whose training set top-influence
    corruption must reuse, sample for sample), else the defaults."""
    given = {name: getattr(args, name) for name in DATA_SELECTION if getattr(args, name) is not None}
    given = given | ({"split": _split_arg(given["split"])} if "split" in given else {})
    if clean is None:
        return DATA_SELECTION | given
    cfg = clean.config
    inherited = {
        "dataset": cfg["dataset"],
        "classes": cfg["class_keys"],
        "split": cfg["split"] if isinstance(cfg["split"], str) else tuple(cfg["split"]),
        "seed": cfg["seed"],
        "downsample": cfg["downsample"],
    }
    for name, value in given.items():
        if name == "classes":
            same = _lower(value) in (_lower(cfg["class_keys"]), _lower(cfg["classes"]))
        else:
            same = value == inherited[name]
        if not same:
            raise InfluenceLensError(
                f"--{name} {value} differs from the clean run {clean.path} ({inherited[name]}): top-influence "
                "corruption flips the clean run's own training samples.",
                f"leave --{name} out; with --scores-from the data selection comes from the clean run",
            )
    return inherited


def _lower(names: list[str]) -> list[str]:
    return [n.strip().lower() for n in names]


def _split_arg(values: list[str]) -> tuple[float, float, float] | str:
    """``--split official`` or three fractions."""
    if values == ["official"]:
        return "official"
    try:
        fractions = tuple(float(v) for v in values)
    except ValueError:
        fractions = ()
    if len(fractions) != 3:
        raise InfluenceLensError(
            f"--split takes three fractions or 'official', not {' '.join(values)}.",
            "for example --split 0.8 0.1 0.1, or --split official for fashion-mnist",
        )
    return fractions


def _influence(args) -> None:
    from .influence.calculator import DaskCalculator
    from .pipeline import compute_influence, parse_settings
    from .run import Run

    settings = parse_settings(args.method, args.option, args.scope, args.damping, args.curvature)
    calculator = None
    if args.scheduler is not None or args.workers is not None:
        calculator = DaskCalculator(scheduler=args.scheduler, workers=args.workers)
    bar = TqdmProgress()
    try:
        result = compute_influence(
            Run(args.run_dir),
            settings,
            device=args.device,
            progress=bar,
            recompute=args.recompute,
            wait=not args.no_wait,
            calculator=calculator,
        )
    finally:
        bar.close()
    print(f"influence ({settings.describe()}) cached in {result.path}", file=sys.stderr)


def _second_pass(args) -> None:
    from .analysis import detection_metrics
    from .run import Run
    from .second_pass import check_share, compute_second_pass

    check_share(args.share)
    run = Run(args.run_dir)
    bar = TqdmProgress()
    try:
        second = compute_second_pass(run, args.share, device=args.device, progress=bar)
    finally:
        bar.close()
    flipped = run.flipped()
    print(
        f"second pass: left out {second.left_out.sum()} suspects ({second.share:.0%}), retrained in "
        f"{second.seconds:.0f} s; test accuracy {second.accuracy_test:.3f} (the run: "
        f"{run.metrics['accuracy_test']:.3f}); cached in {run.paths.second_pass}",
        file=sys.stderr,
    )
    if flipped.any():
        first = detection_metrics(run.dynamics["loss"].mean(0), flipped)["auroc"]
        second_auroc = detection_metrics(second.loss, flipped)["auroc"]
        print(
            f"flipped labels: {(second.left_out & flipped).sum()} of {flipped.sum()} left out; AUROC "
            f"{first:.3f} (mean_loss) -> {second_auroc:.3f} (loss_without_suspects)",
            file=sys.stderr,
        )


def _report(args) -> None:
    from .report import run_report, to_json
    from .run import Run

    if args.html:
        from .html_report import write_html_report

        path = write_html_report(Run(args.run_dir), args.html)
        print(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)", file=sys.stderr)
        return
    report = run_report(Run(args.run_dir))
    for entry, why in report.get("ignored_influence", {}).items():
        print(
            f"note: the cached influence result {entry} is not used ({why}); "
            f"compute it again with influence-core influence --run-dir {args.run_dir}",
            file=sys.stderr,
        )
    if args.json:
        print(to_json(report))
        return
    for key, value in report.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def _apply_reviews(args) -> None:
    from .fixes import apply_reviews, lineage
    from .report import to_json
    from .run import Run

    check_output_dir(args.out)
    bar = TqdmProgress()
    try:
        child = apply_reviews(
            Run(args.run_dir),
            args.out,
            decisions_csv=args.decisions,
            device=args.device,
            progress=bar,
            wait=not args.no_wait,
        )
    finally:
        bar.close()
    record = lineage(child) or {}
    summary = {
        "run_dir": str(child.path),
        "parent": record.get("parent"),
        "relabelled": record.get("relabelled"),
        "excluded": record.get("excluded"),
        "n_train": len(child.ids("train")),
        "accuracy_test": child.metrics["accuracy_test"],
        "f1_test": child.metrics["f1_test"],
    }
    if args.json:
        print(to_json(summary))
    else:
        print(
            f"corrected run in {child.path}: {summary['relabelled']} relabelled, {summary['excluded']} excluded; "
            f"test accuracy {summary['accuracy_test']:.3f}, F1 {summary['f1_test']:.3f}",
            file=sys.stderr,
        )


def _compare(args) -> None:
    from .compare import compare_runs
    from .report import to_json
    from .run import Run

    result = compare_runs(Run(args.run_dir), Run(args.against) if args.against else None)
    if args.json:
        print(to_json(result))
        return
    for name in ("accuracy", "f1"):
        d = result["difference"][name]
        print(
            f"{name}: {d['before']:.3f} -> {d['after']:.3f} ({d['difference']:+.3f}, 95 % interval "
            f"{d['low']:+.3f} to {d['high']:+.3f})"
        )
    print(f"test predictions fixed: {len(result['fixed'])}, broken: {len(result['broken'])}")
    if result["flips"]:
        f = result["flips"]
        print(
            f"flipped labels: {f['before']} before; {f['corrected']} corrected, {f['excluded']} excluded, {f['left']} left"
        )


def _export(args) -> None:
    from .export import export_corrected
    from .run import Run

    manifest = export_corrected(Run(args.run_dir), args.out)
    print(f"corrected training set written to {manifest.parent} (list: {manifest.name})", file=sys.stderr)


def _label_issues(args) -> None:
    from .display import export_csv
    from .export import label_issues
    from .run import Run
    from .storage import atomic_write_bytes

    table = label_issues(Run(args.run_dir), share=args.share)
    if args.out is None:
        print(export_csv(table), end="")
    else:
        atomic_write_bytes(args.out, export_csv(table).encode())
        print(
            f"{int(table['is_label_issue'].sum())} label issues flagged; table written to {args.out}", file=sys.stderr
        )


def _repoint(args) -> None:
    from .run import repoint

    run = repoint(args.run_dir, args.dataset)
    print(f"{run.path} now reads its data from {run.config['dataset']}", file=sys.stderr)


def _check(args) -> None:
    from . import counterfactual as cf
    from .pipeline import DEFAULT_SETTINGS, compute_influence
    from .run import Run

    run = Run(args.run_dir)
    cf.require_test_image(run, args.test_index)
    bar = TqdmProgress()
    try:
        result = compute_influence(run, DEFAULT_SETTINGS, device=args.device, progress=bar)
        directions = [args.direction] if args.direction else [None, "random"]  # the image's own, then the control
        done: list[cf.Check] = []
        for direction in directions:
            k = args.k if args.k is not None or not done else done[0].k  # the control removes as many
            done.append(cf.run_check(result, args.test_index, k, direction, device=args.device, progress=bar))
    finally:
        bar.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in done], indent=2))
        return
    for c in done:
        print(c.describe(run.classes))
        if c.direction != "random" or args.direction:
            print(f"  k: {c.k_reason}" + (f"; {c.units_note}" if c.units_note else ""))
    print(f"checks kept for this run: {cf.summary(cf.checks(run))}")


def _classes(args) -> None:
    from .data import available_classes

    for i, (key, name) in enumerate(available_classes(args.dataset)):
        print(f"{i}\t{key}\t{name}")


def build_parser() -> argparse.ArgumentParser:
    from .influence import Curvature, Scope, default_damping, scope_text
    from .pipeline import DEFAULT_SETTINGS, METHOD_CHOICES
    from .second_pass import DEFAULT_SHARE
    from .training import RECOMMENDED_EPOCHS

    p = argparse.ArgumentParser(prog="influence-core", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or fetch from the cache) a ResNet18 and write a run directory")
    t.add_argument("--dataset", help="demo | tiny-imagenet:PATH | folder:PATH | fashion-mnist:PATH (default: demo)")
    t.add_argument(
        "--classes", nargs="+", metavar="NAME", help="classes by id, name (unique prefix) or index; default: all"
    )
    t.add_argument("--run-dir", required=True)
    t.add_argument("--epochs", type=int, default=RECOMMENDED_EPOCHS)
    t.add_argument(
        "--train-layers",
        choices=["head", "all"],
        default="all",
        help="head: frozen backbone, train fc only; all: full network (default)",
    )
    t.add_argument("--corrupt-fraction", type=float, default=0.0, help="flip this fraction of training labels")
    t.add_argument(
        "--corrupt-mode",
        choices=["random", "top-influence"],
        default="random",
        help="random: flip random labels; top-influence: per class, flip the points with the highest "
        "mean test influence in the clean run given by --scores-from (the reference notebook's)",
    )
    t.add_argument(
        "--scores-from",
        metavar="CLEAN_RUN_DIR",
        help="clean run (no flips) whose default influence ranks the points for top-influence "
        "(computed if missing); its dataset, classes, split, seed and downsampling are reused",
    )
    t.add_argument("--seed", type=int, help="seed of the split, shuffling and flips (default: 0)")
    t.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")
    t.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    t.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    t.add_argument("--image-size", type=int, help="side in pixels (default: 64 for images, 32 for digits)")
    t.add_argument(
        "--split",
        nargs="+",
        metavar="FRACTION",
        help="TRAIN VAL TEST fractions (default: 0.8 0.1 0.1), or 'official' (the dataset's own "
        "train/test parts, no val)",
    )
    t.add_argument("--downsample", type=float, help="keep this fraction of each class (default: 1)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--checkpoints", type=int, default=4, help="evenly spaced checkpoints kept during training")
    t.add_argument(
        "--weights",
        default="auto",
        help="auto (ImageNet weights from the torch hub cache if present) | scratch | imagenet "
        "(torchvision's ImageNet weights, downloaded once into the torch hub cache) | PATH",
    )
    t.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    t.add_argument(
        "--augment-shift",
        type=float,
        metavar="SHARE",
        help="shift each training image at random by up to this share of its side (default: 0.25, 16 px at 64 px, "
        "for tiny-imagenet and folders; 0, no shifts, for digits and fashion-mnist)",
    )
    t.add_argument(
        "--on-bad-image",
        choices=["skip", "error"],
        default="skip",
        help="skip unreadable images (listed) or stop at the first",
    )
    t.set_defaults(func=_train)

    i = sub.add_parser("influence", help="compute and cache influences for a run")
    i.add_argument("--run-dir", required=True)
    i.add_argument("--method", choices=METHOD_CHOICES, default=DEFAULT_SETTINGS.method.name)
    i.add_argument(
        "--scope",
        default=scope_text(DEFAULT_SETTINGS.scope),
        help="head | all | comma-separated module names (e.g. layer4.1.conv2,fc)",
    )
    i.add_argument(
        "--damping",
        "--regularization",
        default=None,
        help="λ in (H + λI)⁻¹ (--regularization is the same flag): a number (absolute, e.g. 1e-3), top:FRACTION (FRACTION × the largest curvature "
        "eigenvalue of each block, e.g. top:1e-5) or rel:FRACTION (× the mean eigenvalue, e.g. rel:0.1); default: "
        f"{default_damping(Scope.HEAD)} on the head, {default_damping(Scope.ALL)} on larger scopes (chosen by the "
        "linear datamodeling score, see the README)",
    )
    i.add_argument("--curvature", choices=list(Curvature), default=DEFAULT_SETTINGS.curvature)
    i.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (e.g. --option fit_examples=512 --option rank=1024 for kfac; "
        "none for None), read as the option's type; the app's measured accuracy is for the defaults",
    )
    i.add_argument("--device", default="auto")
    i.add_argument("--recompute", action="store_true", help="ignore the influence cache")
    i.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    i.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="score on this Dask cluster (tcp://HOST:8786; run dir on a shared file system)",
    )
    i.add_argument("--workers", type=int, metavar="N", help="score on a local Dask cluster of N worker processes")
    i.set_defaults(func=_influence)

    s = sub.add_parser(
        "second-pass",
        help="retrain without the top suspects by training loss and score every label again (one more training)",
    )
    s.add_argument("--run-dir", required=True)
    s.add_argument(
        "--share",
        type=float,
        default=DEFAULT_SHARE,
        help=f"share of the training set to leave out: the top suspects by mean training loss (default: {DEFAULT_SHARE})",
    )
    s.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")
    s.set_defaults(func=_second_pass)

    r = sub.add_parser("report", help="summarise a run (metrics, detection, timings)")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument(
        "--html",
        metavar="OUT.html",
        help="write one self-contained HTML file instead (figures, thumbnails, checks; opens offline)",
    )
    r.set_defaults(func=_report)

    a = sub.add_parser(
        "apply-reviews",
        help="train a corrected child run: mislabeled images relabelled, excluded images left out (same recipe)",
    )
    a.add_argument("--run-dir", required=True, help="the reviewed run")
    a.add_argument("--out", required=True, help="folder of the corrected run (a cache hit when it holds it already)")
    a.add_argument(
        "--decisions",
        metavar="FILE.csv",
        help="record these decisions first (columns id, decision, corrected_label, reviewer: the app's Decisions CSV)",
    )
    a.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")
    a.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=_apply_reviews)

    cmp = sub.add_parser("compare", help="before and after: a corrected run against the run it was made from")
    cmp.add_argument("--run-dir", required=True, help="the corrected (child) run")
    cmp.add_argument("--against", help="the run to compare with (default: the child's parent)")
    cmp.add_argument("--json", action="store_true", help="print one JSON object")
    cmp.set_defaults(func=_compare)

    e = sub.add_parser("export", help="write the corrected training set as an image folder with a manifest.csv")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True, help="a new folder (train on it with --dataset folder:FOLDER)")
    e.set_defaults(func=_export)

    li = sub.add_parser("label-issues", help="the ranked suspects as a table in cleanlab's column names")
    li.add_argument("--run-dir", required=True)
    li.add_argument("--out", help="CSV file to write (default: print)")
    li.add_argument("--share", type=float, default=0.1, help="share of the training set flagged (default: 0.1)")
    li.set_defaults(func=_label_issues)

    rp = sub.add_parser(
        "repoint",
        help="point a run at the new place of its dataset (after the data moved); checks that it holds the same images",
    )
    rp.add_argument("--run-dir", required=True)
    rp.add_argument("--dataset", required=True, help="the data's new place, e.g. tiny-imagenet:PATH or folder:PATH")
    rp.set_defaults(func=_repoint)

    k = sub.add_parser(
        "check",
        help="check a test image's ranking by retraining without its top-k training images (one training each)",
    )
    k.add_argument("--run-dir", required=True)
    k.add_argument("--test-index", type=int, required=True, help="position of the test image in the test split")
    k.add_argument(
        "--k",
        type=int,
        help="training images to remove (default: the smallest k predicted to flip the prediction, at most 5 %% of "
        "the training set)",
    )
    k.add_argument(
        "--direction",
        choices=["helpful", "harmful", "random"],
        help="remove the most helpful, most harmful, or random images of the same labels (default: helpful for a "
        "right prediction, harmful for a wrong one, then the random control)",
    )
    k.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")
    k.add_argument("--json", action="store_true", help="print the checks as JSON")
    k.set_defaults(func=_check)

    c = sub.add_parser("classes", help="list the classes a dataset offers")
    c.add_argument("--dataset", required=True)
    c.set_defaults(func=_classes)
    return p


class _StderrHandler(logging.Handler):
    """Prints the library's status lines to the current ``sys.stderr``, one message per line."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _show_library_messages() -> None:
    package = logging.getLogger("influence_core")
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        package.addHandler(_StderrHandler())
    package.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_messages()
    try:
        args.func(args)
    except InfluenceLensError as e:
        return _fail(e)
    except OSError as e:  # a write outside the atomic helpers (a folder, numpy output) on a full or read-only disk
        error = write_error(e)
        if error is None:
            raise
        return _fail(error)
    except KeyboardInterrupt:
        print("interrupted: finished files are kept, nothing half-written was saved", file=sys.stderr)
        return 130
    return 0


def _fail(error: InfluenceLensError) -> int:
    """Print ``error`` as one line on stderr; the exit code of a user-fixable problem."""
    fix = f" Fix: {error.fix}" if error.fix else ""
    print(f"error: {error.problem}{fix}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
