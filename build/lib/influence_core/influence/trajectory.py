"""Influence along the training trajectory: TracInCP and SOURCE over a run's kept checkpoints.

Training is cut into segments that end at the kept checkpoints (``epoch_<e>.pt`` …, ``final.pt``); segment ℓ
spans optimizer steps ``[s_ℓ, s_{ℓ+1})`` and its learning rates sum to ``Λ_ℓ = Σ_s η_s`` (from the run's cosine
schedule). Both methods give ``I[t, i]`` in the product's convention (positive = helpful, removing training point
``i`` raises test point ``t``'s loss by about ``I[t, i] / n_train``), read as plain gradient descent on the mean
training loss with step sizes ``step_scale · η_s``:

* **TracInCP** (Pruthi et al. 2020): ``I[t, i] = Σ_ℓ step_scale · Λ_ℓ ∇ℓ_t(θ_ℓ)ᵀ ∇ℓ_i(θ_ℓ)``, gradients at the
  checkpoint ``θ_ℓ`` that ends segment ℓ. Removing ``z_i`` takes ``η_s / n ∇ℓ_i`` out of every step (in
  expectation over the batches), which changes the test loss by ``Σ_s η_s ∇ℓ_tᵀ ∇ℓ_i / n`` to first order.
* **SOURCE** (Bae et al., NeurIPS 2024, "Training Data Attribution via Approximate Unrolling"): inside each
  segment the dynamics are taken as stationary — Hessian ``H_ℓ`` and the removed point's gradient ``ḡ_ℓ`` constant —
  so the unrolled response is closed-form. With ``S_ℓ = exp(−step_scale Λ_ℓ H_ℓ)``::

      I[t, i] = Σ_ℓ ∇ℓ_t(θ_final)ᵀ (Π_{ℓ'>ℓ} S_ℓ') (I − S_ℓ) H_ℓ⁻¹ ḡ_ℓ(z_i)

  (``(I − S_ℓ) H_ℓ⁻¹`` is ``step_scale Λ_ℓ`` in flat directions and ``H_ℓ⁻¹`` in steep ones, so no damping is
  needed). ``H_ℓ`` is the EK-FAC Gauss-Newton matrix fitted at ``θ_ℓ`` (block-diagonal over Conv2d/Linear layers,
  Kronecker eigenbases with fitted eigenvalues).

Approximations, stated: (1) the optimizer is read as plain gradient descent: the product trains with Adam,
whose per-parameter preconditioner and momentum are not kept in the checkpoints; ``step_scale`` (default 1) stands
for the ratio of Adam's effective step to the learning rate and only rescales TracInCP, while it changes SOURCE's
trade-off between flat and steep directions; (2) per segment, SOURCE's averaged Hessian and averaged gradient are
the ones at the checkpoint that ends it (the paper averages over several checkpoints per segment);
(3) ``(I − ηH)^K`` is replaced by ``exp(−ΣηH)`` (exact for small steps, as in the paper); (4) H is EK-FAC's,
as in the paper; (5) BatchNorm runs in eval mode (running statistics) for every gradient; (6) SOURCE's
self-influence drops the propagation to the end: ``Σ_ℓ ḡ_ℓ(z)ᵀ (I − S_ℓ) H_ℓ⁻¹ ḡ_ℓ(z)``.
Tested against autograd through a short plain-SGD training (``tests/test_trajectory.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import InfluenceLensError
from ..paths import InfluencePaths
from ..progress import Progress
from ..storage import atomic_write_json, file_hash, resolve_device, stable_hash
from .kfac import EKFAC

log = logging.getLogger(__name__)

TRAJECTORY_METHODS = ("tracin", "source")
CACHE_VERSION = "trajectory-v2"
Grads = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------- schedule
def learning_rates(lr: float, schedule: str, total_steps: int) -> np.ndarray:
    """(total_steps,) float64 step sizes of the product's training loop: step ``s`` uses
    ``lr (1 + cos(π s / total_steps)) / 2`` (``CosineAnnealingLR`` to zero) or ``lr`` (``constant``)."""
    if schedule == "constant":
        return np.full(total_steps, float(lr))
    return lr * (1 + np.cos(np.pi * np.arange(total_steps) / total_steps)) / 2


@dataclass(frozen=True)
class Segment:
    """A stretch of training that ends at a kept checkpoint: steps ``[start_step, stop_step)``, their summed
    learning rate ``lr_sum`` (``Λ``, in the optimizer's lr units), and the checkpoint at its end."""

    checkpoint: Path
    start_step: int
    stop_step: int
    lr_sum: float


def run_segments(run) -> list[Segment]:
    """The segments of a run (``influence_core.Run``) between its kept checkpoints, from its config."""
    cfg = run.config
    n_train = len(run.labels("train"))
    steps_per_epoch = math.ceil(n_train / cfg["batch_size"])
    rates = learning_rates(cfg["lr"], cfg.get("lr_schedule", "cosine"), cfg["epochs"] * steps_per_epoch)
    segments, start = [], 0
    for path in run.checkpoint_paths():
        epoch = cfg["epochs"] if path.stem == "final" else int(path.stem.split("_")[1])
        stop = epoch * steps_per_epoch
        segments.append(Segment(path, start, stop, float(rates[start:stop].sum())))
        start = stop
    return segments


# --------------------------------------------------------------------------------------------- gradients
def scope_parameters(model: nn.Module, scope: str | list[str]) -> dict[str, nn.Parameter]:
    """Parameters of ``scope``: ``"head"`` (the last nn.Linear), ``"all"`` (every Conv2d and Linear) or module
    names; keys are names in ``model``."""
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if scope == "head":
        chosen = [n for n in layers if isinstance(modules[n], nn.Linear)][-1:]
    elif scope == "all":
        chosen = layers
    else:
        chosen = list(scope)
        missing = [n for n in chosen if n not in modules]
        if missing:
            raise InfluenceLensError(
                f"Scope names modules the model does not have: {', '.join(missing)}.",
                "use names from model.named_modules()",
            )
    params = {f"{n}.{p}": t for n in chosen for p, t in modules[n].named_parameters(recurse=False)}
    if not params:
        raise InfluenceLensError(f"Scope {scope!r} selects no parameters.", "pick Conv2d or Linear modules")
    return params


def per_sample_grads(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[slice, Grads]]:
    """``(rows, grads)`` chunks: ``grads[name]`` ``(b, *param.shape)`` float32, the per-sample cross-entropy
    gradients of ``model`` (eval mode) for ``x[rows]`` ``(b, C, H, W)``, ``y[rows]``."""
    values = {n: p.detach() for n, p in params.items()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    for start in range(0, len(x), batch_size):
        rows = slice(start, min(start + batch_size, len(x)))
        with torch.no_grad():
            yield rows, per_sample(values, x[rows].to(device, torch.float32), y[rows].to(device))


def _dot(a: Grads, b: Grads) -> torch.Tensor:
    """``(k, m)`` inner products of ``k`` stacked vectors ``a`` with ``m`` stacked vectors ``b``."""
    products = [a[n].reshape(len(a[n]), -1) @ b[n].reshape(len(b[n]), -1).T for n in a]
    return torch.stack(products).sum(0)


# --------------------------------------------------------------------------------------------- curvature
@dataclass
class KroneckerEigen:
    """An EK-FAC fit of one checkpoint: per layer, ``H ≈ (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ`` on the layer's
    ``[W | b]`` matrix ``(out, d)``; directions outside the bases' span have eigenvalue 0.

    ``layers``: ``(weight name | None, bias name | None, q_a (d, r_A), q_g (out, r_G), eigenvalues (r_G, r_A))``.
    """

    layers: list[tuple[str | None, str | None, torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def fit(
        cls, model: nn.Module, scope, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
    ) -> KroneckerEigen:
        """Fit EK-FAC (Gauss-Newton) on ``x``, ``y`` through the influence engine and keep its eigenbases."""
        from .engine import InfluenceModel

        if scope == "head":  # by module name, so that the fitted blocks carry the model's parameter names
            scope = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
        im = InfluenceModel(model, scope=scope, method=EKFAC(), batch_size=batch_size, device=device)
        state = im.fit(x, y).state_dict()
        layers = []
        for key in sorted({k.rpartition("|")[0] for k in state}):
            w, b = key.split("|")
            layers.append(
                (
                    w or None,
                    b or None,
                    state[f"{key}|Q_A"].float(),
                    state[f"{key}|Q_G"].float(),
                    state[f"{key}|eigenvalues"].float().clamp_min(0),
                )
            )
        return cls(layers)

    def apply(self, vectors: Grads, functions: list[Callable[[torch.Tensor], torch.Tensor]]) -> list[Grads]:
        """``f(H) v`` for each ``f`` in ``functions`` (elementwise functions of the eigenvalues) and ``k`` stacked
        vectors ``v`` (``vectors[name]`` ``(k, *param.shape)``); the basis rotation is shared by all ``f``."""
        outs: list[Grads] = [{} for _ in functions]
        for w, b, q_a, q_g, evals in self.layers:
            parts = ([vectors[w].flatten(2) if vectors[w].dim() > 2 else vectors[w]] if w else []) + (
                [vectors[b][..., None]] if b else []
            )
            m = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (k, out, d)
            rotated = q_g.T @ m @ q_a
            zero = torch.zeros((), dtype=evals.dtype)
            for out, f in zip(outs, functions, strict=True):
                f0 = f(zero)
                res = f0 * m + q_g @ ((f(evals) - f0) * rotated) @ q_a.T
                if w:
                    d_w = res.shape[2] - (1 if b else 0)
                    out[w] = res[..., :d_w].reshape(vectors[w].shape)
                if b:
                    out[b] = res[..., -1].contiguous()
        return outs


def unrolled_gain(horizon: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``λ ↦ (1 − exp(−horizon λ)) / λ`` (``horizon`` at λ = 0): SOURCE's segment operator ``(I − S) H⁻¹``."""

    def f(lam: torch.Tensor) -> torch.Tensor:
        safe = torch.where(lam > 0, lam, torch.ones_like(lam))
        return torch.where(lam * horizon > 1e-8, -torch.expm1(-horizon * lam) / safe, horizon * (1 - lam * horizon / 2))

    return f


def decay(horizon: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``λ ↦ exp(−horizon λ)``: how much of an earlier perturbation a segment keeps (SOURCE's ``S``)."""
    return lambda lam: torch.exp(-horizon * lam)


# --------------------------------------------------------------------------------------------- methods
class TrajectoryInfluence:
    """TracInCP or SOURCE over checkpoints (see the module docstring).

    ``models``: the model at the end of each segment, in training order (the last is the final model);
    ``lr_sums``: ``Λ_ℓ`` per segment; ``method``: ``"tracin"`` or ``"source"``; ``scope`` as in the engine
    (``"all"``, ``"head"`` or module names); ``step_scale`` multiplies every step size. Inputs are ``x (n, C, H,
    W)`` float32, ``y (n,)`` int64. ``test_chunk`` bounds how many test points' parameter-sized vectors are held at
    once (44 MB each for ResNet18's whole network); each chunk makes one pass over the training set per segment.
    ``curvature_fit(model, scope, x, y, batch_size, device)`` returns an object with :meth:`KroneckerEigen.apply`
    (default :meth:`KroneckerEigen.fit`; tests pass an exact one).
    """

    def __init__(
        self,
        models: list[nn.Module],
        lr_sums: list[float],
        method: str = "source",
        scope: str | list[str] = "all",
        step_scale: float = 1.0,
        batch_size: int = 16,
        test_chunk: int = 64,
        device: str | torch.device = "auto",
        progress: Progress | None = None,
        curvature_fit: Callable[..., KroneckerEigen] | None = None,
    ):
        if method not in TRAJECTORY_METHODS:
            raise InfluenceLensError(f"Unknown trajectory method {method!r}.", f"use one of {TRAJECTORY_METHODS}")
        if len(models) != len(lr_sums) or not models:
            raise InfluenceLensError(
                "Trajectory influence needs one step-size sum per checkpoint.",
                "pass models and lr_sums of the same, nonzero length",
            )
        if not step_scale > 0:
            raise InfluenceLensError(f"step_scale must be positive, got {step_scale!r}.", "use e.g. 1")
        self.device = resolve_device(device)
        self.models = [m.to(self.device).eval() for m in models]
        self.horizons = [step_scale * float(s) for s in lr_sums]
        self.method, self.scope, self.batch_size, self.test_chunk = method, scope, batch_size, test_chunk
        self.progress = progress
        self.params = [scope_parameters(m, scope) for m in self.models]
        self.curvature_fit = curvature_fit or KroneckerEigen.fit
        self.curvatures: list[KroneckerEigen] | None = None

    def fit(self, x_train, y_train) -> TrajectoryInfluence:
        """SOURCE: fit EK-FAC at every checkpoint on ``x_train``, ``y_train`` (TracInCP needs no fit)."""
        if self.method == "source":
            self.curvatures = []
            for k, model in enumerate(self.models):
                self.curvatures.append(
                    self.curvature_fit(model, self.scope, x_train, y_train, self.batch_size, self.device)
                )
                self._report("curvature", k + 1, len(self.models))
        return self

    def _require_fit(self) -> None:
        if self.method == "source":
            self._fitted_curvatures()

    def _fitted_curvatures(self) -> list[KroneckerEigen]:
        if self.curvatures is None:
            raise InfluenceLensError("SOURCE needs its curvature first.", "call fit(x_train, y_train)")
        return self.curvatures

    def _test_vectors(self, x: torch.Tensor, y: torch.Tensor) -> list[Grads]:
        """Per segment, the test-side vectors ``v_ℓ`` ``(k, *param.shape)`` with ``I[t, i] = Σ_ℓ v_ℓ,tᵀ g_ℓ,i``."""

        def grads_at(k: int) -> Grads:
            parts = [g for _, g in per_sample_grads(self.models[k], self.params[k], x, y, self.batch_size, self.device)]
            return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

        if self.method == "tracin":
            return [{n: h * g for n, g in grads_at(k).items()} for k, h in enumerate(self.horizons)]
        vectors: list[Grads] = [{} for _ in self.models]
        u = grads_at(len(self.models) - 1)  # ∇ℓ_t at the final model, carried back through later segments
        for k in reversed(range(len(self.models))):
            curvature = self._fitted_curvatures()[k]
            vectors[k], u = curvature.apply(u, [unrolled_gain(self.horizons[k]), decay(self.horizons[k])])
        return vectors

    def influences(self, x_test, y_test, x_train, y_train) -> np.ndarray:
        """``(n_test, n_train)`` float32, positive = helpful; training gradients are streamed per segment."""
        self._require_fit()
        out = np.zeros((len(x_test), len(x_train)), np.float32)
        for t0 in range(0, len(x_test), self.test_chunk):
            rows_t = slice(t0, min(t0 + self.test_chunk, len(x_test)))
            vectors = self._test_vectors(x_test[rows_t], y_test[rows_t])
            for k, (model, params) in enumerate(zip(self.models, self.params, strict=True)):
                for rows, g in per_sample_grads(model, params, x_train, y_train, self.batch_size, self.device):
                    out[rows_t, rows] += _dot(vectors[k], g).cpu().numpy()
                    self._report(f"influences, checkpoint {k + 1}/{len(self.models)}", rows.stop, len(x_train))
        return out

    def segment_self_influence(self, x_train, y_train) -> np.ndarray:
        """``(n_segments, n_train)`` float32: each segment's term of the self-influence (they sum to it)."""
        self._require_fit()
        out = np.zeros((len(self.models), len(x_train)), np.float32)
        for k, (model, params) in enumerate(zip(self.models, self.params, strict=True)):
            for rows, g in per_sample_grads(model, params, x_train, y_train, self.batch_size, self.device):
                if self.method == "tracin":
                    v = {n: self.horizons[k] * t for n, t in g.items()}
                else:
                    (v,) = self._fitted_curvatures()[k].apply(g, [unrolled_gain(self.horizons[k])])
                out[k, rows] = torch.stack([(v[n] * g[n]).flatten(1).sum(1) for n in g]).sum(0).cpu().numpy()
                self._report(f"self-influence, checkpoint {k + 1}/{len(self.models)}", rows.stop, len(x_train))
        return out

    def self_influence(self, x_train, y_train) -> np.ndarray:
        """``(n_train,)`` float32: TracInCP ``Σ_ℓ Λ_ℓ |∇ℓ_i(θ_ℓ)|²``; SOURCE see the module docstring (6)."""
        return self.segment_self_influence(x_train, y_train).sum(0)

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)


# --------------------------------------------------------------------------------------------- cached runs
@dataclass(frozen=True)
class TrajectorySettings:
    """What decides a cached trajectory result besides the run: method, scope, step scale, fit size."""

    method: str = "tracin"
    scope: str = "all"
    step_scale: float = 1.0

    def scope_arg(self) -> str | list[str]:
        return self.scope if self.scope in ("head", "all") else [s.strip() for s in self.scope.split(",")]


def trajectory_cache_key(run, settings: TrajectorySettings) -> str:
    """The cache entry name of ``settings``'s result for ``run``: the segments' checkpoints, the train and test ids
    and labels, the settings and (SOURCE) the defaults of the EK-FAC it fits per segment."""
    return stable_hash(
        CACHE_VERSION,
        [file_hash(s.checkpoint) for s in run_segments(run)],
        *run.influence_inputs(),
        dataclasses.asdict(settings),
        EKFAC().fingerprint() if settings.method == "source" else None,
    )


def compute_trajectory(
    run,
    settings: TrajectorySettings = TrajectorySettings(),
    device: str = "auto",
    progress: Progress | None = None,
    recompute: bool = False,
) -> InfluencePaths:
    """Compute (or fetch) a trajectory method's results for ``run`` (an ``influence_core.Run``) and cache them in
    ``run_dir/influence/<key>/`` in the format of ``influence_core.pipeline`` (zarr matrix, summaries,
    ``self_influence.npy``; ``checkpoint_self_influence.npy`` holds each segment's term, (n_segments, n_train)),
    so that ``pipeline.InfluenceResult(run, path)`` reads it. Written to a temporary folder, then renamed; the
    caller holds the run's lock (as ``pipeline.compute_influence`` does)."""
    from ..results import SummaryBuilder, column_blocks, create_matrix, summarise_block, write_histograms

    segments = run_segments(run)
    key = trajectory_cache_key(run, settings)
    paths = run.paths.influence_entry(key)
    if not recompute and paths.is_complete():
        return paths
    x_train, y_train = (t[:] for t in run.tensors("train"))
    x_test, y_test = (t[:] for t in run.tensors("test"))
    tmp = InfluencePaths(run.paths.influence_temp(key, os.getpid()))
    shutil.rmtree(tmp.root, ignore_errors=True)
    tmp.root.mkdir(parents=True)
    try:
        timings = {}
        t = time.perf_counter()
        ti = TrajectoryInfluence(
            [run.load_model(s.checkpoint) for s in segments],
            [s.lr_sum for s in segments],
            settings.method,
            settings.scope_arg(),
            settings.step_scale,
            device=device,
            progress=progress,
        ).fit(x_train, y_train)
        timings["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        segment_si = ti.segment_self_influence(x_train, y_train)
        timings["self_influence"] = time.perf_counter() - t
        t = time.perf_counter()
        matrix = ti.influences(x_test, y_test, x_train, y_train)
        timings["test_x_train_matrix"] = time.perf_counter() - t
        create_matrix(tmp, *matrix.shape)[:] = matrix
        summaries = SummaryBuilder(matrix.shape[0], matrix.shape[1], run.n_classes)
        self_influence = segment_si.sum(0)
        for a, b in column_blocks(matrix.shape[1]):
            summaries.add(summarise_block(matrix[:, a:b], a, y_test.numpy(), run.n_classes, self_influence[a:b]))
        summaries.write(tmp)
        write_histograms(tmp, y_train.numpy(), run.n_classes)
        np.save(tmp.checkpoint_self_influence, segment_si)
        atomic_write_json(
            tmp.meta,
            {
                "settings": dataclasses.asdict(settings) | {"kind": "trajectory"},
                "checkpoints": [s.checkpoint.name for s in segments],
                "lr_sums": [s.lr_sum for s in segments],
                "n_train": len(y_train),
                "n_test": len(y_test),
                "timings_s": timings,
                "created": time.time(),
                "device": str(ti.device),
            },
        )
        shutil.rmtree(paths.root, ignore_errors=True)
        os.replace(tmp.root, paths.root)
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
    log.info("trajectory influence (%s, %s) computed in %.1f s", settings.method, settings.scope, sum(timings.values()))
    return paths
