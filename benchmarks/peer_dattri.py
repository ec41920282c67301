"""dattri 0.3 on a workload: its TRAK or TracIn attributor, on the head (fc) or all.

Run inside ``benchmarks/.venvs/dattri``::

    python benchmarks/peer_dattri.py WORKLOAD_DIR OUT_DIR --method trak|tracin [--scope head|all] [--device cpu|cuda]
                                     [--proj-dim 512]

``trak``: ``TRAKAttributor`` on the workload's one model (its ``cache`` over the training set is the ``fit`` stage,
``attribute`` over the test set the ``scores`` stage); ``tracin``: ``TracInAttributor`` at the final model only
(weight 1, unnormalised gradients: a projected gradient dot product, dattri's Grad-Dot), whose ``attribute`` is the
whole computation. ``--scope head`` passes ``fc``'s parameters as dattri's ``layer_name``. Projections use dattri's
CPU projector unless a GPU is given (``proj_dim`` capped at half the training set for TRAK, which inverts the
projected features' Gram matrix).

Status: on 2 CPU cores its TRAK on the head of a 264-image 32 px workload spent about 200 s per batch of 64
training images in ``cache`` (per-example gradients through the whole ResNet18, then dattri's CPU projector) and was
stopped before finishing; no result of this runner has been checked against ours yet.

Convention: both scores are positive for a training example that lowers the test example's loss (TRAK: raises its
probability of the right label), i.e. helpful, as ours (``sign_factor`` +1); the values are not loss changes, only
the ranking is comparable. No self-influence output.
"""

from __future__ import annotations

import time
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.task import AttributionTask
from torch.utils.data import DataLoader, TensorDataset
from workload import (
    environment,
    load_workload,
    peak_memory,
    pick_device,
    pipeline_record,
    runner_parser,
    stage_record,
    write_result,
)


def main() -> None:
    parser = runner_parser(__doc__.splitlines()[0], ("trak", "tracin"))
    parser.add_argument("--proj-dim", type=int, default=512, help="random projection dimension (dattri's default)")
    args = parser.parse_args()
    device = pick_device(args.device)
    w = load_workload(args.workload_dir, device)
    s = w.settings
    scope = args.scope or s.scope
    model = w.model
    layers = None if scope == "all" else ["fc.weight", "fc.bias"]
    n_params = sum(p.numel() for name, p in model.named_parameters() if layers is None or name in layers)
    n_train, n_test = len(w.y_train), len(w.y_test)
    proj_dim = min(args.proj_dim, n_params, n_train // 2 if args.method == "trak" else n_params)

    def loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    def right_probability(params, data):  # dattri 0.3 passes the parameters as a dict here (not flattened)
        x, y = data
        return torch.exp(-F.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0)))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    train = DataLoader(TensorDataset(w.x_train, w.y_train), batch_size=s.batch_size, shuffle=False)
    test = DataLoader(TensorDataset(w.x_test, w.y_test), batch_size=s.batch_size, shuffle=False)
    projector = {"proj_dim": proj_dim, "device": device}
    record = {
        "peer": "dattri",
        "version": version("dattri"),
        "method": args.method,
        "scope": scope,
        "n_train": n_train,
        "n_test": n_test,
        "proj_dim": proj_dim,
        "sign_factor": 1.0,
        "n_params": n_params,
        "note": f"dattri {args.method} at the final model, projection dimension {proj_dim}; values are not loss "
        "changes",
        **environment(device),
    }
    t0 = time.perf_counter()
    if args.method == "trak":
        attributor = TRAKAttributor(
            task=task,
            correct_probability_func=right_probability,
            projector_kwargs=projector,
            layer_name=layers,
            device=device,
        )
        attributor.cache(train)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        with torch.no_grad():
            scores = attributor.attribute(test)
    else:
        attributor = TracInAttributor(
            task=task,
            weight_list=torch.ones(1),
            normalized_grad=False,
            projector_kwargs=projector,
            layer_name=layers,
            device=device,
        )
        fit_s, t1 = 0.0, time.perf_counter()
        with torch.no_grad():
            scores = attributor.attribute(train, test)
    scores_s = time.perf_counter() - t1
    matrix = np.asarray(scores.detach().cpu(), np.float32)  # (n_train, n_test)
    record["matrix"] = pipeline_record(fit_s, scores=stage_record(n_test, n_test, scores_s))
    write_result(args.out_dir, {**record, **peak_memory(device)}, influence=matrix.T)


if __name__ == "__main__":
    main()
