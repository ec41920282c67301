"""TRAK (``traker`` 0.3) on a workload: random projections of per-example gradients, on the head (fc) or all.

Run inside ``benchmarks/.venvs/trak``::

    python benchmarks/peer_trak.py WORKLOAD_DIR OUT_DIR [--scope head|all] [--device cpu|cuda] [--time-cap SECONDS]
                                   [--proj-dim 2048] [--models DIR]

TRAK's features and scores go to ``OUT_DIR/trak/``. On the CPU the projection is TRAK's ``BasicProjector`` (its CUDA
projector needs the ``fast_jl`` extension and a GPU): it draws the Rademacher matrix block by block for each batch,
so its cost grows with parameters × ``--proj-dim``. ``--scope head`` passes ``fc``'s parameters as TRAK's ``grad_wrt``, so it
projects the head's gradients alone. Stages (see workload.py): ``fit`` = featurizing the training set
(``featurize`` + ``finalize_features``, uncapped), ``scores`` = scoring the test set against it.

Ensemble: TRAK's published scores average over several independently trained models. ``--models DIR`` adds the
state_dicts ``DIR/*.pt`` (same architecture) to the workload's model; the cost is one training per extra model
plus one featurization each, and ``record["n_models"]`` says how many were used.

Convention: TRAK's score of a training example is positive when it raises the model output (the margin) on the
test example, i.e. helpful, as ours (``sign_factor`` +1). Its values are not in loss units (a projected,
whitened gradient product); only the ranking is comparable, which is what the LDS scores. There is no
self-influence output.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from trak import TRAKer
from trak.projectors import BasicProjector, ProjectionType
from workload import (
    build_model,
    environment,
    load_workload,
    peak_memory,
    pick_device,
    pipeline_record,
    runner_parser,
    stage_record,
    write_result,
)


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for a in range(0, len(y), size):
        yield [x[a : a + size], y[a : a + size]]


def main() -> None:
    parser = runner_parser(__doc__.splitlines()[0], ("trak",))
    parser.add_argument(
        "--proj-dim",
        type=int,
        default=2048,
        help="random projection dimension (TRAK's default; capped at half the training set, since TRAK inverts the "
        "projected features' Gram matrix)",
    )
    parser.add_argument("--models", type=Path, default=None, help="folder of extra state_dicts for the ensemble")
    args = parser.parse_args()
    device = pick_device(args.device)
    w = load_workload(args.workload_dir, device)
    s = w.settings
    scope = args.scope or s.scope
    models = [w.model]
    if args.models is not None:
        for path in sorted(args.models.glob("*.pt")):
            m = build_model(s.num_classes)
            m.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
            models.append(m.to(device).eval())
    tracked = [name for name, _ in w.model.named_parameters() if scope == "all" or name.startswith("fc.")]
    grad_dim = sum(p.numel() for name, p in w.model.named_parameters() if name in tracked)
    n_train, n_test = len(w.y_train), len(w.y_test)
    proj_dim = min(args.proj_dim, grad_dim, n_train // 2)  # TRAK inverts ΦᵀΦ: singular when proj_dim ≥ n_train
    record = {
        "peer": "trak",
        "version": version("traker"),
        "method": "trak",
        "scope": scope,
        "n_train": n_train,
        "n_test": n_test,
        "n_models": len(models),
        "proj_dim": proj_dim,
        "sign_factor": 1.0,
        "n_params": grad_dim,
        "note": f"TRAK over {len(models)} model(s), projection dimension {proj_dim}; values are not loss changes",
        **environment(device),
    }
    projector = BasicProjector(
        grad_dim=grad_dim,
        proj_dim=proj_dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=device,
        dtype=torch.float32,
        block_size=min(100, max(1, proj_dim // 2)),  # ≥ 2 blocks: traker 0.3.2's one-block path reads a freed matrix
    )
    traker = TRAKer(
        model=w.model,
        task="image_classification",
        train_set_size=n_train,
        save_dir=str(args.out_dir / "trak"),
        device=device,
        projector=projector,
        proj_dim=proj_dim,
        use_half_precision=False,
        grad_wrt=tracked,
    )
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        traker.load_checkpoint({k: v for k, v in m.state_dict().items()}, model_id=i)
        for batch in batches(w.x_train, w.y_train, s.batch_size):
            traker.featurize(batch=batch, num_samples=len(batch[1]))
    traker.finalize_features()
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i, m in enumerate(models):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=m.state_dict(), model_id=i, num_targets=n_test)
        for batch in batches(w.x_test, w.y_test, s.batch_size):
            traker.score(batch=batch, num_samples=len(batch[1]))
    scores = np.asarray(traker.finalize_scores(exp_name="test"), np.float32)  # (n_train, n_test)
    scores_s = time.perf_counter() - t1
    record["matrix"] = pipeline_record(fit_s, scores=stage_record(n_test, n_test, scores_s))
    write_result(args.out_dir, {**record, **peak_memory(device)}, influence=scores.T)


if __name__ == "__main__":
    main()
