"""``influence-core``: train, compute influences and report, from the command line.

Every user-fixable problem prints one ``error:`` message with its fix (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import InfluenceLensError
from .progress import TqdmProgress

NO_WAIT_HELP = ("fail at once if another process is writing the run directory "
                "(default: wait for it, with a message)")


def _train(args) -> None:
    from .training import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset, classes=args.classes, image_size=args.image_size, split=tuple(args.split),
        downsample=args.downsample, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay, train_layers=args.train_layers, augment_flip=not args.no_flip,
        n_checkpoints=args.checkpoints, corrupt_fraction=args.corrupt_fraction, weights=args.weights,
        on_bad_image=args.on_bad_image)
    bar = TqdmProgress()
    try:
        train(config, args.run_dir, device=args.device, retrain=args.retrain, progress=bar, wait=not args.no_wait)
    finally:
        bar.close()


def _influence(args) -> None:
    from .pipeline import InfluenceSettings, compute_influence
    from .run import Run

    settings = InfluenceSettings(method=args.method, scope=args.scope, regularization=args.regularization,
                                 curvature=args.curvature)
    cluster = None
    if args.scheduler is not None or args.workers is not None:
        from .distributed import ClusterSpec

        cluster = ClusterSpec(scheduler=args.scheduler, workers=args.workers)
    bar = TqdmProgress()
    try:
        result = compute_influence(Run(args.run_dir), settings, device=args.device, progress=bar,
                                   recompute=args.recompute, wait=not args.no_wait, cluster=cluster)
    finally:
        bar.close()
    print(f"influence ({settings.describe()}) cached in {result.path}", file=sys.stderr)


def _report(args) -> None:
    from .report import run_report
    from .run import Run

    report = run_report(Run(args.run_dir))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def _classes(args) -> None:
    from .data import available_classes

    for i, (key, name) in enumerate(available_classes(args.dataset)):
        print(f"{i}\t{key}\t{name}")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_SETTINGS, METHOD_CHOICES

    p = argparse.ArgumentParser(prog="influence-core", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or fetch from the cache) a ResNet18 and write a run directory")
    t.add_argument("--dataset", default="demo",
                   help="demo | tiny-imagenet:PATH | folder:PATH | fashion-mnist:PATH (default: demo)")
    t.add_argument("--classes", nargs="+", metavar="NAME",
                   help="classes by id, name (unique prefix) or index; default: all")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--train-layers", choices=["head", "all"], default="all",
                   help="head: frozen backbone, train fc only; all: full network (default)")
    t.add_argument("--corrupt-fraction", type=float, default=0.0, help="flip this fraction of training labels")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")
    t.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    t.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    t.add_argument("--image-size", type=int, help="side in pixels (default: 64 for images, 32 for digits)")
    t.add_argument("--split", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    t.add_argument("--downsample", type=float, default=1.0, help="keep this fraction of each class")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--checkpoints", type=int, default=4, help="evenly spaced checkpoints kept during training")
    t.add_argument("--weights", default="auto",
                   help="auto (ImageNet weights from the torch hub cache if present) | scratch | PATH")
    t.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    t.add_argument("--on-bad-image", choices=["skip", "error"], default="skip",
                   help="skip unreadable images (listed) or stop at the first")
    t.set_defaults(func=_train)

    i = sub.add_parser("influence", help="compute and cache influences for a run")
    i.add_argument("--run-dir", required=True)
    i.add_argument("--method", choices=METHOD_CHOICES, default=DEFAULT_SETTINGS.method)
    i.add_argument("--scope", default=DEFAULT_SETTINGS.scope,
                   help="head | all | comma-separated module names (e.g. layer4.1.conv2,fc)")
    i.add_argument("--regularization", type=float, default=DEFAULT_SETTINGS.regularization, help="λ in (H + λI)⁻¹")
    i.add_argument("--curvature", choices=["gauss-newton", "hessian"], default=DEFAULT_SETTINGS.curvature)
    i.add_argument("--device", default="auto")
    i.add_argument("--recompute", action="store_true", help="ignore the influence cache")
                                   recompute=args.recompute, wait=not args.no_wait, cluster=cluster)
    i.set_defaults(func=_influence)

    r = sub.add_parser("report", help="summarise a run (metrics, detection, timings)")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_report)

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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished files are kept, nothing half-written was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
