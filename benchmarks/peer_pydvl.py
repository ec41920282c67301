"""pyDVL 0.10 on a workload: ``CgInfluence`` (scope head or all) or ``DirectInfluence`` (head only).

Run inside ``benchmarks/.venvs/pydvl``::

    python benchmarks/peer_pydvl.py WORKLOAD_DIR OUT_DIR --method cg|direct [--scope head|all]
                                    [--device cpu|cuda] [--time-cap SECONDS] [--regularization λ]

Scope ``head`` runs pyDVL on a copy of ``fc`` fed with precomputed penultimate features (the gradient and
Hessian of ``fc``'s parameters are the same as in the full network); scope ``all`` runs it on the whole
ResNet18 with only Conv2d/Linear parameters requiring grad (pyDVL differentiates what requires grad).
``DirectInfluence`` on scope ``all`` materialises an n_params² Hessian and is reported as infeasible.

Stages, each capped at the time cap and linearly extrapolated when cut short (see workload.py):
``fit`` (pyDVL ``fit`` on the training loader, plus feature extraction for the head scope); ``factors``
(``influence_factors`` = (H+λI)⁻¹∇ℓ for the test points, one CG solve each); ``scores``
(``influences_from_factors`` against every training point; together the two equal
``influences(x_test, y_test, x_train, y_train, mode=InfluenceMode.Up)``); ``self`` (factors of each
training point dotted with its own gradient).

Convention: pyDVL 0.10's ``mode="up"`` influence is ∇ℓ_testᵀ (H+λI)⁻¹ ∇ℓ_train with H the mean Hessian of
``F.cross_entropy`` over the fit loader — already the product's convention (factor +1), checked against
an exact solve in ``check_peer_conventions.py``. That check also shows that ``CgInfluence`` averages
*batch means*, over-weighting an uneven last batch, so the fit loader's batch size divides n_train,
and that ``influences_from_factors`` tests ``mode is InfluenceMode.Up``: the string ``"up"`` silently
yields perturbation influences there, so the enum is passed.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F
from pydvl.influence import InfluenceMode
from pydvl.influence.torch import CgInfluence, DirectInfluence
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from workload import (
    capped_loop,
    environment,
    infeasible_record,
    load_workload,
    peak_memory,
    penultimate_features,
    pick_device,
    pipeline_record,
    runner_parser,
    scope_modules,
    stage_record,
    write_result,
)

GRAD_CHUNK_ALL = 8
"""Training points per per-sample-gradient chunk on scope all: 8 × 11.2M params × 4 B ≈ 0.36 GiB."""


def even_batch_size(n: int, at_most: int) -> int:
    """Largest divisor of ``n`` not above ``at_most`` (CgInfluence weights every batch equally)."""
    return max(b for b in range(1, min(n, at_most) + 1) if n % b == 0)


def direct_fits_in_memory(n_params: int) -> bool:
    """DirectInfluence keeps a few dense n_params² float32 matrices; allow them half the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 4 * n_params**2 * 4 <= ram / 2


def solve_record(done: int, total: int, seconds: float, factor: float) -> dict:
    """:func:`stage_record` of a stage of CG solves, its time scaled by ``factor`` when it ran a shortened probe."""
    record = stage_record(done, total, seconds)
    if factor != 1:
        record.update(seconds_full=round(record["seconds_full"] * factor, 3), extrapolated=True, time_factor=factor)
    return record


def main() -> None:
    parser = runner_parser(__doc__.splitlines()[0], ("cg", "direct"))
    parser.add_argument(
        "--maxiter",
        type=int,
        default=None,
        help="CG: run this many iterations per solve instead of the workload's cg_maxiter and "
        "scale the solve stages' times up by cg_maxiter / maxiter (extrapolated)",
    )
    parser.add_argument(
        "--fit-examples",
        type=int,
        default=None,
        help="CG: Hessian-vector products over the first M training points only; solve times "
        "scaled up by n / M (extrapolated)",
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    w = load_workload(args.workload_dir, device)
    s = w.settings
    scope, cap = args.scope or s.scope, args.time_cap or s.time_cap_s
    damping = s.regularization if args.regularization is None else args.regularization
    record = {
        "peer": "pydvl",
        "version": version("pyDVL"),
        "method": args.method,
        "scope": scope,
        "regularization": damping,
        "n_train": len(w.y_train),
        "n_test": len(w.y_test),
        "sign_factor": 1.0,
        **environment(device),
    }

    t0 = time.perf_counter()
    if scope == "head":
        model: nn.Module = w.model.fc
        x_train = penultimate_features(w.model, w.x_train, s.batch_size)
        x_test = penultimate_features(w.model, w.x_test, s.batch_size)
    else:
        model, x_train, x_test = w.model, w.x_train, w.x_test
        tracked = set(scope_modules(model, scope))
        for name, module in model.named_modules():
            for p in module.parameters(recurse=False):
                p.requires_grad_(name in tracked)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record["n_params"] = n_params

    if args.method == "direct" and not direct_fits_in_memory(n_params):
        record["matrix"] = record["self_influence"] = infeasible_record(
            f"DirectInfluence materialises the n_params² = {n_params}² Hessian "
            f"({4 * n_params**2 / 2**30:.0f} GiB in float32)"
        )
        write_result(args.out_dir, record)
        return

    n_fit = len(x_train)
    probe_factor = 1.0  # solve-time multiplier of a shortened CG probe
    if args.method == "cg":
        maxiter = args.maxiter or s.cg_maxiter
        n_fit = min(n_fit, args.fit_examples or n_fit)
        probe_factor = s.cg_maxiter / maxiter * len(x_train) / n_fit
        infl = CgInfluence(
            model,
            F.cross_entropy,
            regularization=damping,
            rtol=s.cg_tol,
            atol=0.0,
            maxiter=maxiter,
            warn_on_max_iteration=False,
        )
        if probe_factor != 1:
            record["note"] = (
                f"CG probe: {maxiter} of {s.cg_maxiter} iterations per solve, Hessian over "
                f"{n_fit} of {len(x_train)} points; solve times × {probe_factor:g} (an upper bound "
                "if CG would converge sooner); outputs not converged"
            )
    else:
        infl = DirectInfluence(model, F.cross_entropy, regularization=damping)
    loader = DataLoader(
        TensorDataset(x_train[:n_fit], w.y_train[:n_fit]), batch_size=even_batch_size(n_fit, s.batch_size)
    )
    infl.fit(loader)
    fit_s = time.perf_counter() - t0

    # CG solves one right-hand side at a time anyway; chunks of 1 keep the cap's overshoot small.
    solve_chunk = 1 if args.method == "cg" else s.batch_size
    grad_chunk = GRAD_CHUNK_ALL if scope == "all" else s.batch_size
    factors, factors_s = capped_loop(
        lambda a, b: infl.influence_factors(x_test[a:b], w.y_test[a:b]).detach().cpu().numpy(),
        len(x_test),
        solve_chunk,
        cap,
    )
    factors_t = torch.from_numpy(factors).to(device)

    def scores_step(a: int, b: int) -> np.ndarray:
        out = infl.influences_from_factors(factors_t, x_train[a:b], w.y_train[a:b], mode=InfluenceMode.Up)
        return out.detach().cpu().numpy().T  # (b - a, k)

    scores, scores_s = capped_loop(scores_step, len(x_train), grad_chunk, cap)
    record["matrix"] = pipeline_record(
        fit_s,
        factors=solve_record(len(factors), len(x_test), factors_s, probe_factor),
        scores=stage_record(len(scores), len(x_train), scores_s),
    )
    # influence: (k test rows, columns done); written now so that a run killed later keeps it.
    write_result(args.out_dir, {**record, **peak_memory(device)}, influence=scores.T)

    def self_step(a: int, b: int) -> np.ndarray:
        f = infl.influence_factors(x_train[a:b], w.y_train[a:b])
        out = infl.influences_from_factors(f, x_train[a:b], w.y_train[a:b], mode=InfluenceMode.Up)
        return torch.diagonal(out).detach().cpu().numpy()

    self_inf, self_s = capped_loop(self_step, len(x_train), solve_chunk, cap)
    record["self_influence"] = pipeline_record(
        fit_s, self=solve_record(len(self_inf), len(x_train), self_s, probe_factor)
    )
    write_result(args.out_dir, {**record, **peak_memory(device)}, influence=scores.T, self_influence=self_inf)


if __name__ == "__main__":
    main()
