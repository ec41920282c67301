"""Kronfluence 1.0 on a workload: strategy ``ekfac`` or ``identity``, tracking scope head (fc) or all.

Run inside ``benchmarks/.venvs/kronfluence``::

    python benchmarks/peer_kronfluence.py WORKLOAD_DIR OUT_DIR --method ekfac|identity [--scope head|all]
                                          [--device cpu|cuda] [--time-cap SECONDS] [--regularization λ] [--fit-examples M]

Kronfluence's factors and score chunks go to ``OUT_DIR/kronfluence/``; dataloaders use no worker
processes. Stages (see workload.py): ``fit`` = ``fit_all_factors`` (uncapped; for ``ekfac`` its
eigendecomposition, with the ``covariance`` and ``lambda`` data passes as stages of their own, run on the
first ``--fit-examples`` points and extrapolated to all when that is fewer); ``scores`` =
``compute_pairwise_scores`` for all test points against consecutive chunks of training points
(``train_indices``), stopped at the time cap; ``self`` = ``compute_self_scores`` likewise.

Convention: Kronfluence's pairwise score is ∇f(z_test)ᵀ (G + dI)⁻¹ ∇L(z) with G the curvature averaged
per training example, d = ``damping_factor`` added as is, and no 1/n. With the measurement f = CE loss of
the test point and the training loss L = summed CE, this is the product's convention (factor +1) when we
pass d = λ; ``check_peer_conventions.py`` checks sign, per-example averaging and damping exactly on a
model where EKFAC is exact. Differences that remain by design: EKFAC's G is the Kronecker-factored,
eigenvalue-corrected Fisher with labels sampled from the model (the Gauss-Newton matrix in expectation,
not the Hessian), and ``identity`` drops the curvature and the damping entirely (score = ∇f·∇L).
"""

from __future__ import annotations

import math
import time
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn
from torch.utils.data import TensorDataset
from workload import (
    capped_loop,
    environment,
    load_workload,
    peak_memory,
    pick_device,
    pipeline_record,
    runner_parser,
    scope_modules,
    stage_record,
    write_result,
)

SCORE_CHUNKS = 10
"""Training points are scored in about this many calls, so a capped stage has ~10% granularity."""


class ClassificationTask(Task):
    """Summed CE training loss (labels sampled from the model's softmax when ``sample``); measurement =
    summed CE loss of the query points; influence restricted to the named modules."""

    def __init__(self, tracked_modules: list[str]):
        super().__init__()
        self.tracked_modules = tracked_modules

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(logits.softmax(-1), num_samples=1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def get_influence_tracked_modules(self) -> list[str]:
        return self.tracked_modules


def main() -> None:
    parser = runner_parser(__doc__.splitlines()[0], ("ekfac", "identity"))
    parser.add_argument(
        "--fit-examples",
        type=int,
        default=None,
        help="EK-FAC: fit covariances and eigenvalues on the first M training points only; their "
        "times are extrapolated linearly to all points (default: all)",
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    w = load_workload(args.workload_dir, "cpu")  # Kronfluence moves the model and batches itself
    s = w.settings
    scope, cap = args.scope or s.scope, args.time_cap or s.time_cap_s
    damping = s.regularization if args.regularization is None else args.regularization
    tracked = scope_modules(w.model, scope)
    n_train, n_test = len(w.y_train), len(w.y_test)
    record = {
        "peer": "kronfluence",
        "version": version("kronfluence"),
        "method": args.method,
        "scope": scope,
        "regularization": damping,
        "n_train": n_train,
        "n_test": n_test,
        "sign_factor": 1.0,
        "n_params": sum(p.numel() for name in tracked for p in w.model.get_submodule(name).parameters()),
        **environment(device),
    }
    if args.method == "identity":
        record["note"] = "identity curvature: score = gradient dot product, regularization unused"

    t0 = time.perf_counter()
    task = ClassificationTask(tracked)
    model = prepare_model(w.model, task)
    analyzer = Analyzer(
        analysis_name=f"{scope}_{args.method}",
        model=model,
        task=task,
        cpu=device == "cpu",
        disable_tqdm=True,
        output_dir=str(args.out_dir / "kronfluence"),
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    train_set = TensorDataset(w.x_train, w.y_train)
    test_set = TensorDataset(w.x_test, w.y_test)
    fit_stages = {}
    if args.method == "identity":
        analyzer.fit_all_factors(
            factors_name=args.method,
            dataset=train_set,
            per_device_batch_size=s.batch_size,
            factor_args=FactorArguments(strategy=args.method),
            overwrite_output_dir=True,
        )
    else:  # the data passes timed apart, so that a fit on M < n points can be extrapolated
        m = min(n_train, args.fit_examples or n_train)
        factor_args = FactorArguments(strategy=args.method, covariance_max_examples=m, lambda_max_examples=m)
        kwargs = dict(factors_name=args.method, factor_args=factor_args, overwrite_output_dir=True)
        data = dict(dataset=train_set, per_device_batch_size=s.batch_size)
        for stage, call, n_items in (
            ("covariance", analyzer.fit_covariance_matrices, m),
            ("eigendecomposition", analyzer.perform_eigendecomposition, None),
            ("lambda", analyzer.fit_lambda_matrices, m),
        ):
            t = time.perf_counter()
            call(**kwargs, **(data if n_items else {}))
            if n_items:
                fit_stages[stage] = stage_record(m, n_train, time.perf_counter() - t)
        if m < n_train:
            record["note"] = f"factors fitted on {m} of {n_train} training points (fit time extrapolated)"
    fit_s = time.perf_counter() - t0 - sum(st["measured_s"] for st in fit_stages.values())
    score_args = ScoreArguments(damping_factor=damping)
    chunk = max(s.batch_size, math.ceil(n_train / SCORE_CHUNKS))

    def pairwise_step(a: int, b: int) -> np.ndarray:
        name = f"pairwise_{a}"
        analyzer.compute_pairwise_scores(
            scores_name=name,
            factors_name=args.method,
            query_dataset=test_set,
            train_dataset=train_set,
            per_device_query_batch_size=min(n_test, s.batch_size),
            per_device_train_batch_size=s.batch_size,
            train_indices=list(range(a, b)),
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores(name)["all_modules"].numpy().T  # (b - a, n_test)

    def self_step(a: int, b: int) -> np.ndarray:
        name = f"self_{a}"
        analyzer.compute_self_scores(
            scores_name=name,
            factors_name=args.method,
            train_dataset=train_set,
            per_device_train_batch_size=s.batch_size,
            train_indices=list(range(a, b)),
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_self_scores(name)["all_modules"].numpy()

    scores, scores_s = capped_loop(pairwise_step, n_train, chunk, cap)
    record["matrix"] = pipeline_record(fit_s, **fit_stages, scores=stage_record(len(scores), n_train, scores_s))
    write_result(args.out_dir, {**record, **peak_memory(device)}, influence=scores.T)  # kept if killed later
    self_inf, self_s = capped_loop(self_step, n_train, chunk, cap)
    record["self_influence"] = pipeline_record(fit_s, **fit_stages, self=stage_record(len(self_inf), n_train, self_s))
    write_result(args.out_dir, {**record, **peak_memory(device)}, influence=scores.T, self_influence=self_inf)


if __name__ == "__main__":
    main()
