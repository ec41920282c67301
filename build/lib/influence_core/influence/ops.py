"""Per-sample gradients and curvature-vector products shared by the engine and the methods.

Everything here follows the conventions of :mod:`.base`: ``ℓ_i`` is the per-sample cross-entropy (not
divided by ``n``), curvature products are means over the *training* set weighted per sample, and a set of
``k`` vectors travels as a :data:`~.base.Grads` dict whose tensors have a leading axis of size ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from ..progress import Progress
from .choices import Curvature

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(x, y)``: inputs ``(b, ...)`` float32 and labels ``(b,)`` int64, on the engine's device."""
Batches = Callable[[], Iterable[Batch]]
"""Returns a fresh iterator over the training set in chunks (called once per pass)."""
Grads = dict[str, torch.Tensor]
"""``k`` stacked vectors per parameter: ``grads[name]`` has shape ``(k, *param.shape)``."""

GRAD_CHUNK_BYTES = 256 * 2**20
"""Budget (bytes) for one chunk of per-sample gradients or of stacked vectors; keeps ``all`` scope bounded."""
SOLVE_BYTES = 96 * 2**20
"""Budget (bytes) for one group of right-hand sides solved together (iterative solvers keep ~10 copies)."""
TANGENT_BYTES = 64 * 2**20
"""Budget (bytes) for the vectors pushed through one vmapped curvature product: one at a time for a ResNet,
all at once for small blocks (activation memory grows with their number)."""

TRACE_PROBES = 16
"""Rademacher probes of the Hutchinson estimate of ``trace(H)`` (relative damping of the matrix-free methods)."""


def fit_subset(n_samples: int, keep: int, seed: int) -> torch.Tensor:
    """Sorted indices ``(keep,)`` int64 of a random subset of ``range(n_samples)`` drawn with ``seed``."""
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return order[:keep].sort().values


def subset_batches(batches: Batches, rows: torch.Tensor) -> Batches:
    """``batches`` restricted to the training rows ``rows`` (indices), regrouped into chunks of the original chunk
    size so that a sample costs what it did (the skipped rows are still read, not computed on)."""

    def subset() -> Iterator[Batch]:
        start, size = 0, 0
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for x, y in batches():
            size = size or len(x)
            mask = torch.isin(torch.arange(start, start + len(x)), rows).to(x.device)
            start += len(x)
            xs.append(x[mask])
            ys.append(y[mask])
            if sum(len(part) for part in xs) >= size:
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                yield x_all[:size], y_all[:size]
                xs, ys = [x_all[size:]], [y_all[size:]]
        if sum(len(part) for part in xs):
            yield torch.cat(xs), torch.cat(ys)

    return subset


def detached(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in params.items()}


def n_params(params: Mapping[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def rows_per_chunk(params: Mapping[str, torch.Tensor], limit: int, budget: int = GRAD_CHUNK_BYTES) -> int:
    """How many stacked parameter-sized float32 vectors fit in ``budget`` bytes (at least 1, at most ``limit``)."""
    return max(1, min(limit, budget // (4 * max(1, n_params(params)))))


def flatten(grads: Grads) -> torch.Tensor:
    """``(k, p)`` matrix of ``k`` stacked vectors, parameters in dict order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def shapes(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in params.items()}


def shape_state(shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Parameter shapes as state-dict entries ``"shape.<name>"`` → int64 tensor (inverse: :func:`state_shapes`)."""
    return {f"shape.{n}": torch.tensor(list(s), dtype=torch.int64) for n, s in shapes.items()}


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k[len("shape.") :]: torch.Size(v.tolist()) for k, v in state.items() if k.startswith("shape.")}


def unflatten(flat: torch.Tensor, like: dict[str, torch.Size]) -> Grads:
    """Inverse of :func:`flatten` for ``flat`` of shape ``(k, p)``; ``like`` maps names to per-vector shapes."""
    out, start = {}, 0
    for name, shape in like.items():
        size = math.prod(shape)
        out[name] = flat[:, start : start + size].reshape(flat.shape[0], *shape)
        start += size
    return out


def row_dot(a: Grads, b: Grads) -> torch.Tensor:
    """``(k,)`` row-wise inner products of two stacks of ``k`` vectors."""
    return torch.stack([(a[n].reshape(a[n].shape[0], -1) * b[n].reshape(b[n].shape[0], -1)).sum(1) for n in a]).sum(0)


def split(grads: Grads, size: int) -> Iterator[Grads]:
    """Consecutive slices of ``size`` rows."""
    k = next(iter(grads.values())).shape[0]
    for start in range(0, k, size):
        yield {n: g[start : start + size] for n, g in grads.items()}


def concat(parts: list[Grads]) -> Grads:
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def logit_hessian_product(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(diag p − p pᵀ) u`` for softmax probabilities ``probs (..., C)`` and ``u (..., C)``."""
    return probs * u - probs * (probs * u).sum(-1, keepdim=True)


def _loss_sum(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")


def per_sample_grads(model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> Grads:
    """``∇_θ ℓ_i`` for each sample of the batch: ``grads[name]`` has shape ``(b, *param.shape)``.

    A bare ``nn.Linear`` (the head scope, ``x`` = features ``(b, d)``) uses the closed form
    ``∇_W ℓ = (p − e_y) ⊗ φ``, ``∇_b ℓ = p − e_y``.
    """
    values = detached(params)
    if isinstance(model, nn.Linear):
        with torch.no_grad():
            residual = torch.softmax(functional_call(model, values, (x,)), dim=-1)
            residual[torch.arange(len(y)), y] -= 1.0
            out = {}
            if "weight" in values:
                out["weight"] = residual[:, :, None] * x[:, None, :]
            if "bias" in values:
                out["bias"] = residual
            return out

    def one(p, xi, yi):
        return _loss_sum(model, p, xi[None], yi[None])

    with torch.no_grad():  # no autograd graph towards parameters outside the block
        return vmap(grad(one), in_dims=(None, 0, 0))(values, x, y)


def iter_per_sample_grads(
    model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor
) -> Iterator[tuple[slice, Grads]]:
    """Per-sample gradients of a batch in memory-bounded sub-chunks: ``(rows, grads)`` pairs."""
    step = rows_per_chunk(params, len(y))
    for start in range(0, len(y), step):
        rows = slice(start, min(start + step, len(y)))
        yield rows, per_sample_grads(model, params, x[rows], y[rows])


def curvature_matvec(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Batches,
    n_samples: int,
    curvature: Curvature,
    vectors: Grads,
) -> Grads:
    """``H V`` for ``k`` stacked vectors ``V`` (``(k, *param.shape)`` each): one pass over the training set.

    ``H`` is the mean Hessian or Gauss-Newton matrix; each chunk adds its *sum* over samples and the total
    is divided by ``n_samples`` once, so an uneven last chunk is weighted by its size.
    """
    values = detached(params)
    out = {n: torch.zeros_like(v) for n, v in vectors.items()}
    group = rows_per_chunk(values, next(iter(vectors.values())).shape[0], TANGENT_BYTES)
    for x, y in batches():
        for start in range(0, len(next(iter(out.values()))), group):
            part = {n: v[start : start + group] for n, v in vectors.items()}
            with torch.no_grad():  # torch.func transforms still differentiate; this only drops outside graphs
                chunk = _chunk_matvec(model, values, x, y, curvature, part)
            for n in out:
                out[n][start : start + group] += chunk[n]
    return {n: v / n_samples for n, v in out.items()}


def _chunk_matvec(model, values, x, y, curvature, vectors):
    if isinstance(model, nn.Linear):
        return _linear_matvec(model, values, x, vectors)
    if curvature == "hessian":

        def gradient(p):
            return grad(lambda q: _loss_sum(model, q, x, y))(p)

        return vmap(lambda v: jvp(gradient, (values,), (v,))[1])(vectors)

    def logits(p):
        return functional_call(model, p, (x,))

    out, pullback = vjp(logits, values)[:2]
    probs = torch.softmax(out.detach(), dim=-1)

    def gauss_newton(v):
        u = jvp(logits, (values,), (v,))[1]
        return pullback(logit_hessian_product(probs, u))[0]

    return vmap(gauss_newton)(vectors)


def _linear_matvec(model: nn.Linear, values, x, vectors):
    """Closed-form curvature product for a linear head on features ``x (b, d)``; GN and Hessian coincide."""
    with torch.no_grad():
        probs = torch.softmax(functional_call(model, values, (x,)), dim=-1)
        k = next(iter(vectors.values())).shape[0]
        u = probs.new_zeros(k, *probs.shape)  # (k, b, C): logit directions of the k vectors
        if "weight" in vectors:
            u += torch.einsum("kcd,bd->kbc", vectors["weight"], x)
        if "bias" in vectors:
            u += vectors["bias"][:, None, :]
        w = logit_hessian_product(probs[None], u)
        out = {}
        if "weight" in vectors:
            out["weight"] = torch.einsum("kbc,bd->kcd", w, x)
        if "bias" in vectors:
            out["bias"] = w.sum(1)
        return out


def curvature_matrix(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Batches,
    n_samples: int,
    curvature: Curvature,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The explicit ``(p, p)`` mean curvature matrix (parameters flattened in dict order), float64.

    Gauss-Newton: ``(1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` from exact per-sample logit Jacobians.
    Hessian: products with identity columns, in blocks. A linear head (where both coincide) uses the
    closed form ``(1/n) Σ_i (diag p_i − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ`` with ``φ̃ = [φ, 1]``.
    """
    values = detached(params)
    p = n_params(values)
    device = next(iter(values.values())).device
    if isinstance(model, nn.Linear):
        return _linear_curvature_matrix(model, values, batches, n_samples, progress)
    if curvature == "hessian":
        block = rows_per_chunk(values, 512)
        cols = []
        for start in range(0, p, block):
            rows = torch.arange(min(block, p - start), device=device)
            eye = torch.zeros(len(rows), p, device=device)
            eye[rows, start + rows] = 1.0
            columns = unflatten(eye, shapes(values))
            cols.append(flatten(curvature_matvec(model, params, batches, n_samples, curvature, columns)))
            if progress:
                progress("curvature", min(start + block, p), p)
        matrix = torch.cat(cols).double()
        return (matrix + matrix.T) / 2

    matrix = torch.zeros(p, p, dtype=torch.float64, device=device)
    done = 0

    def logits_one(q, xi):
        return functional_call(model, q, (xi[None],))[0]

    for x, _ in batches():
        step = max(1, min(len(x), rows_per_chunk(values, 2**30) // 16))
        for start in range(0, len(x), step):
            xs = x[start : start + step]
            with torch.no_grad():
                jac = vmap(jacrev(logits_one), in_dims=(None, 0))(values, xs)  # (b, C, *shape)
            jac = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2).double()
            with torch.no_grad():
                probs = torch.softmax(functional_call(model, values, (xs,)), dim=-1).double()
            a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
            matrix += jac.flatten(0, 1).T @ (a @ jac).flatten(0, 1)
        done += len(x)
        if progress:
            progress("curvature", done, n_samples)
    matrix /= n_samples
    return (matrix + matrix.T) / 2


def _linear_curvature_matrix(model: nn.Linear, values, batches, n_samples, progress) -> torch.Tensor:
    classes = model.out_features
    d = model.in_features if "weight" in values else 0
    width = d + ("bias" in values)
    device = next(iter(values.values())).device
    blocks = torch.zeros(classes, classes, width, width, dtype=torch.float64, device=device)
    done = 0
    with torch.no_grad():
        for x, _ in batches():
            probs = torch.softmax(functional_call(model, values, (x,)), dim=-1).double()
            a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (b, C, C)
            phi = x.double()[:, :d]
            if "bias" in values:
                phi = torch.cat([phi, phi.new_ones(len(x), 1)], dim=1)
            for c in range(classes):
                for e in range(c, classes):
                    blocks[c, e] += (phi * a[:, c, e, None]).T @ phi
            done += len(x)
            if progress:
                progress("curvature", done, n_samples)
    for c in range(classes):
        for e in range(c):
            blocks[c, e] = blocks[e, c].T
    # row (c, j) of the [W, b] layout → flat index: weight (c, j) at c·d + j, bias c at C·d + c
    order = torch.cat(
        [torch.arange(classes * d).view(classes, d), classes * d + torch.arange(classes).view(classes, 1)], dim=1
    )[:, :width]
    position = torch.empty(classes * width, dtype=torch.long)
    position[order.flatten()] = torch.arange(classes * width)
    full = blocks.permute(0, 2, 1, 3).reshape(classes * width, classes * width) / n_samples
    return full[position][:, position]


def power_iteration(
    matvec: Callable[[Grads], Grads], like: dict[str, torch.Tensor], steps: int = 20, seed: int = 0
) -> float:
    """Estimate of the largest-magnitude eigenvalue of a symmetric operator (a lower bound on it)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = {n: torch.randn((1, *p.shape), generator=gen).to(p.device) for n, p in like.items()}
    estimate = 0.0
    for _ in range(steps):
        norm = math.sqrt(float(row_dot(v, v)[0]))
        v = {n: t / norm for n, t in v.items()}
        hv = matvec(v)
        estimate = float(row_dot(v, hv)[0])
        v = hv
    return estimate


def hutchinson_mean_eigenvalue(
    matvec: Callable[[Grads], Grads], like: dict[str, torch.Tensor], probes: int = TRACE_PROBES, seed: int = 0
) -> float:
    """``trace(H)/p`` estimated as the mean of ``vᵀ H v / p`` over Rademacher vectors ``v`` (one batched product).

    Unbiased; its relative error is ``√(2(‖H‖_F² − Σ H_ii²)/probes)/trace(H)``, at most ``√(2/probes)``
    (35 % at 16 probes) for a rank-one ``H`` and much less for curvature spread over many directions.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = {n: (torch.randint(0, 2, (probes, *p.shape), generator=gen) * 2.0 - 1.0).to(p) for n, p in like.items()}
    return float(row_dot(v, matvec(v)).mean()) / n_params(like)
