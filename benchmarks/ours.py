"""Influence Lens on a trained run, one method and scope per process, in the peers' result format.

Run in the product's venv (``run.py`` starts one process per method so that peak memory is per method)::

    python benchmarks/ours.py RUN_DIR OUT_DIR --method direct|cg|lissa|arnoldi|kfac|ekfac|floor
                              [--scope head|all] [--regularization DAMPING] [--time-cap SECONDS] [--batch-size B]
                              [--option KEY=VALUE ...]   (method options, e.g. rank=100 for arnoldi)

Stages, timed like the peers' (see workload.py): ``fit`` (uncapped; the head scope's backbone pass is
part of it), ``factors`` (test factors (H+λI)⁻¹∇ℓ_test, capped), ``scores`` (factors × training
gradients, capped) and ``self`` (self-influence, capped). A stage cut short at the cap is linearly
extrapolated and marked ``"extrapolated": true``. Writes ``OUT_DIR/result.json``, ``influence.npy``
(k, j) and ``self_influence.npy`` (s,). ``--regularization`` takes the CLI's damping text (``1e-3``, ``top:1e-5``,
``rel:0.1``); without it the scope's default. ``result.json`` records the damping and the λ it resolved to per
block (``block_damping``, written as ``block_regularization``), so peers can be given the same absolute λ.

``--method floor`` times instead one forward pass and one forward+backward pass (mean CE loss, every
parameter) of the final model over train+test, eval mode, in batches of ``--batch-size``: the cost floor
that influence times are divided by.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from workload import capped_loop, environment, peak_memory, pipeline_record, stage_record, write_result

from influence_core import Run
from influence_core.influence import (
    METHODS,
    Damping,
    InfluenceFactors,
    InfluenceModel,
    Method,
    Scope,
)

CHUNKS = {Scope.HEAD: (None, None), Scope.ALL: (None, 64)}
"""(test, train) points per capped step; ``None`` = one step over all points (head scope is fast, and the
head's training features are computed once in ``fit``, so slicing would re-run the backbone; test factors
are solved in one call, as the product does)."""


def training_rows(x: torch.Tensor, y: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(x[a:b], y[a:b])``, or ``(None, None)`` — the fitted training set, features cached — for all of it."""
    return (None, None) if (a, b) == (0, len(x)) else (x[a:b], y[a:b])


def floor(run: Run, batch_size: int) -> dict:
    """Seconds of one forward and one forward+backward pass over train+test (eval mode)."""
    model = run.load_model()
    x = torch.cat([run.tensors("train")[0][:], run.tensors("test")[0][:]])
    y = torch.cat([run.tensors("train")[1], run.tensors("test")[1]])
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, len(x), batch_size):
            model(x[a : a + batch_size])
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in range(0, len(x), batch_size):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[a : a + batch_size]), y[a : a + batch_size]).backward()
    backward_s = time.perf_counter() - t0
    return {"n_images": len(x), "forward_s": round(forward_s, 3), "forward_backward_s": round(backward_s, 3)}


def influence(
    run: Run, method: str, scope: str, regularization: Damping | None, cap: float, batch_size: int, options: dict
):
    """(record, influence (k, j), self_influence (s,)) of one method and scope on the final checkpoint."""
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    x_train, x_test = x_train[:], x_test[:]  # whole tensors: this workload fits in memory
    t0 = time.perf_counter()
    im = InfluenceModel(
        run.load_model(),
        method=Method.named(method, **options),
        scope=scope,
        damping=regularization,
        device="cpu",
        batch_size=batch_size,
    )
    im.fit(x_train, y_train)
    fit_s = time.perf_counter() - t0
    test_chunk, train_chunk = (c or n for c, n in zip(CHUNKS[scope], (len(x_test), len(x_train)), strict=True))

    factors = []

    def factor_step(a: int, b: int) -> np.ndarray:
        factors.append(im.test_factors(x_test[a:b], y_test[a:b]))
        return np.zeros(b - a)

    done, factors_s = capped_loop(factor_step, len(x_test), test_chunk, cap)

    joined = InfluenceFactors.join(factors)  # one pass over the training gradients for all test points

    def score_step(a: int, b: int) -> np.ndarray:
        return im.influences_from_factors(joined, *training_rows(x_train, y_train, a, b)).T  # (b - a, k)

    scores, scores_s = capped_loop(score_step, len(x_train), train_chunk, cap)
    self_inf, self_s = capped_loop(
        lambda a, b: im.self_influence(*training_rows(x_train, y_train, a, b)), len(x_train), train_chunk, cap
    )
    record = {
        "regularization": str(im.damping),
        "block_regularization": im.block_damping(),
        "n_params": sum(p.numel() for p in im.params_.values()),
        "matrix": pipeline_record(
            fit_s,
            factors=stage_record(len(done), len(x_test), factors_s),
            scores=stage_record(len(scores), len(x_train), scores_s),
        ),
        "self_influence": pipeline_record(fit_s, self=stage_record(len(self_inf), len(x_train), self_s)),
    }
    return record, scores.T, self_inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--method", choices=(*METHODS, "floor"), default="direct")
    parser.add_argument("--scope", choices=list(Scope), type=Scope, default=Scope.HEAD)
    parser.add_argument(
        "--regularization",
        type=Damping.parse,
        default=None,
        help="damping, e.g. 1e-3 or top:1e-5; default: the scope's",
    )
    parser.add_argument("--time-cap", type=float, default=600.0, help="seconds per capped stage")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (int, float, none or string), repeatable",
    )
    args = parser.parse_args()
    options = Method.parse(args.method, args.option).options() if args.method in METHODS else {}
    run = Run(args.run_dir)
    record = {
        "peer": "influence-lens",
        "version": "this repo",
        "method": args.method,
        "scope": args.scope,
        "options": options,
        **environment("cpu"),
    }
    if args.method == "floor":
        write_result(args.out_dir, {**record, **floor(run, args.batch_size), **peak_memory("cpu")})
        return
    out, matrix, self_inf = influence(
        run, args.method, args.scope, args.regularization, args.time_cap, args.batch_size, options
    )
    write_result(args.out_dir, {**record, **out, **peak_memory("cpu")}, influence=matrix, self_influence=self_inf)


if __name__ == "__main__":
    main()
