"""The influence engine: scopes, streaming over data, test factors, influence matrices and saliency."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from ..errors import InfluenceLensError
from ..storage import resolve_device
from .base import METHODS, Batch, EigenbasisInverse, Grads, InverseCurvature, Progress
from .ops import (CURVATURES, GRAD_CHUNK_BYTES, SOLVE_BYTES, concat, detached, iter_per_sample_grads, row_dot,
                  rows_per_chunk, split)


FACTOR_BYTES = 2**30
"""Test factors stay float32 up to this many bytes, or a third of the device's available memory if that is more;
larger ones are kept as float16, scaled per test point and tensor (converting them back costs time: on the
2-core CPU it was ~30 % of scoring ResNet18's whole network)."""


def factor_budget(device: torch.device) -> int:
    """Bytes of float32 test factors kept as they are on ``device`` (see :data:`FACTOR_BYTES`)."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(FACTOR_BYTES, available // 3)


@dataclass
class TestFactors:
    """``(H + λI)⁻¹ ∇ℓ(z_test)`` for ``n`` test points: ``factors[name]`` has shape ``(n, *param.shape)``.

    With ``in_basis`` (methods that are diagonal in a per-layer eigenbasis, :class:`EigenbasisInverse`) the
    keys are the method's blocks and the values the solved vectors' coordinates in that basis.
    Computed once by :meth:`InfluenceModel.test_factors`; tied to the regularization it was solved with.
    Blocks over :func:`factor_budget` (``all`` scope on a ResNet: 45 MB per test point) are stored as float16
    values in ``[-1, 1]`` times ``scales[name]`` ``(n,)`` (relative precision ~5e-4); read them with :meth:`rows`.
    """

    factors: Grads
    regularization: float
    scales: dict[str, torch.Tensor] | None = None
    in_basis: bool = False
    __test__ = False  # not a pytest test class, despite the name

    def __len__(self) -> int:
        return next(iter(self.factors.values())).shape[0]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Factors ``start:stop`` of parameter ``name`` as a float32 ``(rows, numel)`` matrix."""
        part = self.factors[name][start:stop]
        part = part.reshape(part.shape[0], -1).float()
        return part if self.scales is None else part * self.scales[name][start:stop, None]

    @classmethod
    def join(cls, parts: list["TestFactors"]) -> "TestFactors":
        """Test factors of consecutive test chunks (computed apart, e.g. on several workers) as one block."""
        first = parts[0]
        if any(p.regularization != first.regularization or p.in_basis != first.in_basis
               or (p.scales is None) != (first.scales is None) for p in parts):
            raise InfluenceLensError("These test factors were computed with different settings.",
                                     "compute every chunk with the same influence model")
        scales = concat([p.scales for p in parts]) if first.scales is not None else None
        return cls(concat([p.factors for p in parts]), first.regularization, scales, first.in_basis)

    @staticmethod
    def compress(factors: Grads) -> tuple[Grads, dict[str, torch.Tensor]]:
        scales = {n: f.reshape(f.shape[0], -1).abs().amax(1).clamp_min(1e-30) for n, f in factors.items()}
        shape = lambda f: (-1,) + (1,) * (f.dim() - 1)  # noqa: E731
        return {n: (f / scales[n].view(shape(f))).half() for n, f in factors.items()}, scales


@contextmanager
def full_fp32():
    """No TF32 inside (cuDNN convolutions, CUDA matmuls): influences amplify low-curvature directions, where TF32's
    ~1e-3 relative error became a 1.5 % difference between two exact-in-float32 paths on an H200 (2e-4 without)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _fp32(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with full_fp32():
            return method(*args, **kwargs)
    return wrapper


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise InfluenceLensError(f"The model ({type(model).__name__}) has no nn.Linear layer to use as its head.",
                                 "use a classifier that ends in an nn.Linear layer")
    return found[-1]


class InfluenceModel:
    """Influence functions ``I(z, z_test) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z)`` for an image classifier.

    ``scope`` picks the parameters: ``"head"`` (the last ``nn.Linear``, on cached backbone features — the
    backbone runs once per image set), ``"all"`` (every Conv2d and Linear weight and bias) or a list of
    module names (their parameters). ``method`` is a key of :data:`METHODS` (``direct``, ``cg``, ``lissa``,
    ``arnoldi``, ``kfac``, ``ekfac``); ``method_options`` go to its constructor.
    ``regularization`` is ``λ``; ``curvature`` is ``"gauss-newton"`` or ``"hessian"``. ``progress(stage,
    done, total)`` is called during long loops (stages: ``features``, the method's own fit stages, ``test factors``,
    ``influences``, ``self-influence``, ``saliency``). The model is moved to ``device`` and kept in eval mode.

    Computations run in full float32 on CUDA (TF32 off, see :func:`full_fp32`). Inputs are ``x (n, C, H, W)``
    float32 and ``y (n,)`` int64 tensors (CPU is fine); they are streamed to the device in chunks of
    ``batch_size``. Head features are cached per tensor object, so pass the same
    ``x_train`` tensor to ``fit``, ``influences`` and ``self_influence`` to run the backbone once.
    """

    def __init__(self, model: nn.Module, scope: str | list[str] = "head", method: str = "direct",
                 curvature: str = "gauss-newton", regularization: float = 1e-3, device: str | torch.device = "auto",
                 batch_size: int = 64, progress: Progress | None = None, **method_options):
        if method not in METHODS:
            raise InfluenceLensError(f"Unknown influence method {method!r}.",
                                     f"use one of {', '.join(sorted(METHODS))}")
        if curvature not in CURVATURES:
            raise InfluenceLensError(f"Unknown curvature {curvature!r}.", f"use one of {', '.join(CURVATURES)}")
        if not regularization > 0:
            raise InfluenceLensError(f"regularization must be positive, got {regularization!r}.", "use e.g. 1e-3")
        if int(batch_size) < 1:
            raise InfluenceLensError(f"batch_size must be at least 1, got {batch_size!r}.", "use e.g. 64")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.scope, self.method, self.curvature = scope, method, curvature
        self.regularization, self.batch_size, self.progress = float(regularization), int(batch_size), progress
        self.method_options = method_options
        self.head_name, self.head = _last_linear(self.model)
        self.params, self.full_names = self._select_params(scope)
        self.inverse: InverseCurvature = METHODS[method](regularization=regularization, curvature=curvature,
                                                         **method_options)
        self._fitted = False
        self._feature_cache: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    # ----------------------------------------------------------------- scope
    def _select_params(self, scope) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
        """The block's parameters (names as the block's model sees them) and their names in the full model."""
        if scope == "head":
            params = dict(self.head.named_parameters())
            return params, {n: f"{self.head_name}.{n}" if self.head_name else n for n in params}
        modules = dict(self.model.named_modules())
        if scope == "all":
            chosen = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        elif isinstance(scope, (list, tuple)) and scope and all(isinstance(n, str) for n in scope):
            missing = [n for n in scope if n not in modules]
            if missing:
                examples = ", ".join(n for n in list(modules)[1:6])
                raise InfluenceLensError(f"Scope names modules the model does not have: {', '.join(missing)}.",
                                         f"use module names from model.named_modules(), e.g. {examples}")
            chosen = list(scope)
        else:
            raise InfluenceLensError(f"Unknown scope {scope!r}.", "use 'head', 'all' or a list of module names")
        params = {}
        for name in chosen:
            for pname, p in modules[name].named_parameters(prefix=name, recurse=True):
                params.setdefault(pname, p)
        if not params:
            raise InfluenceLensError(f"Scope {scope!r} selects no parameters.", "pick modules that have weights")
        return params, {n: n for n in params}

    @property
    def _block_model(self) -> nn.Module:
        return self.head if self.scope == "head" else self.model

    @property
    def _in_basis(self) -> bool:
        """Whether influences are scored in the method's eigenbasis (see :class:`EigenbasisInverse`)."""
        return isinstance(self.inverse, EigenbasisInverse)

    # ----------------------------------------------------------------- data
    def _check(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate inputs (every public call passes here, so it also re-asserts eval mode)."""
        self.model.eval()
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dim() != 4 or not x.is_floating_point():
            raise InfluenceLensError(f"Images must be a float tensor of shape (n, C, H, W), got {tuple(x.shape)} "
                                     f"{x.dtype}.", "pass x as float32 (n, C, H, W)")
        if y.dim() != 1 or len(y) != len(x) or y.dtype not in (torch.int64, torch.int32):
            raise InfluenceLensError(f"Labels must be an integer tensor of shape ({len(x)},), got {tuple(y.shape)} "
                                     f"{y.dtype}.", "pass y as int64 (n,)")
        return x, y.long()

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def _inputs(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """What the block's model takes for ``x[rows]``, on the device: images, or head features ``(b, d)``."""
        if self.scope == "head":
            return self._features(x)[rows]
        return x[rows].to(self.device, torch.float32)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Head inputs ``(n, d)`` for images ``x``; the backbone runs once per tensor (cached by identity)."""
        for ref, version, feats in self._feature_cache:
            if ref is x and ref._version == version:
                return feats
        captured = []
        handle = self.head.register_forward_hook(lambda m, inp, out: captured.append((inp[0].detach(), out.detach())))
        parts = []
        try:
            with torch.no_grad():
                for i, rows in enumerate(self._chunks(len(x))):
                    logits = self.model(x[rows].to(self.device, torch.float32))
                    feats, head_out = captured.pop()
                    if i == 0 and not torch.allclose(head_out, logits, atol=1e-5, rtol=1e-4):
                        raise InfluenceLensError(
                            f"The model's output is not the output of its last nn.Linear ({self.head_name!r}); "
                            "the head scope needs logits = head(features).",
                            "use scope 'all' or a list of module names")
                    parts.append(feats.reshape(len(feats), -1))
                    self._report("features", rows.stop, len(x))
        finally:
            handle.remove()
        feats = torch.cat(parts)
        self._feature_cache = self._feature_cache[-2:] + [(x, x._version, feats)]
        return feats

    def _batches(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Iterator[Batch]]:
        def batches():
            for rows in self._chunks(len(x)):
                yield self._inputs(x, rows), y[rows].to(self.device)
        return batches

    def _grads(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> Iterator[tuple[slice, Grads]]:
        """Per-sample gradients ``∇ℓ_i`` of the block, in memory-bounded chunks: ``(rows, grads)``."""
        for rows in self._chunks(len(x)):
            inputs, labels = self._inputs(x, rows), y[rows].to(self.device)
            for sub, g in iter_per_sample_grads(self._block_model, self.params, inputs, labels):
                yield slice(rows.start + sub.start, rows.start + sub.stop), g
            self._report(stage, rows.stop, len(x))

    def _basis_grads(self, x: torch.Tensor, y: torch.Tensor, stage: str):
        """Per chunk ``(rows, blocks)``: ``blocks`` yields ``(block, coordinates (b, ...))`` in the eigenbasis."""
        for rows in self._chunks(len(x)):
            yield rows, self.inverse.basis_grads(self._block_model, self.params, self._inputs(x, rows),
                                                 y[rows].to(self.device))
            self._report(stage, rows.stop, len(x))

    def _grad_groups(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> Iterator[tuple[slice, Grads]]:
        """Like :meth:`_grads`, but merged into groups as large as one batched solve takes (for a linear head:
        hundreds of rows, so an iterative method makes one pass per iteration for all of them)."""
        target = rows_per_chunk(self.params, len(x), SOLVE_BYTES)
        pending: list[tuple[slice, Grads]] = []
        for rows, g in self._grads(x, y, stage):
            pending.append((rows, g))
            if sum(r.stop - r.start for r, _ in pending) >= target:
                yield slice(pending[0][0].start, rows.stop), concat([p for _, p in pending])
                pending = []
        if pending:
            yield slice(pending[0][0].start, pending[-1][0].stop), concat([p for _, p in pending])

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise InfluenceLensError("The influence model is not fitted yet.", "call fit(x_train, y_train) first")

    # ----------------------------------------------------------------- public API
    @_fp32
    def fit(self, x_train, y_train) -> "InfluenceModel":
        """Fit ``(H + λI)⁻¹`` on the training set ``x_train (n, C, H, W)``, ``y_train (n,)``."""
        x, y = self._check(x_train, y_train)
        if len(x) == 0:
            raise InfluenceLensError("The training set is empty.", "pass at least one training image")
        self.inverse.fit(self._block_model, self.params, self._batches(x, y), len(x), self.progress)
        self._fitted = True
        return self

    def _solve(self, grads: Grads) -> Grads:
        """Solve for ``k`` stacked vectors in memory-bounded groups of rows."""
        size = rows_per_chunk(self.params, next(iter(grads.values())).shape[0], SOLVE_BYTES)
        return concat([self.inverse.solve(part) for part in split(grads, size)])

    @_fp32
    def test_factors(self, x_test, y_test) -> TestFactors:
        """``(H + λI)⁻¹ ∇ℓ(z_test)`` for every test point, solved once (right-hand sides batched as memory
        allows; test gradients are streamed, never all held at once)."""
        self._require_fitted()
        x, y = self._check(x_test, y_test)
        compress = len(x) * 4 * sum(p.numel() for p in self.params.values()) > factor_budget(self.device)
        parts, scales = [], []
        for solved in self._solved(x, y, "test factors"):
            if compress:
                solved, scale = TestFactors.compress(solved)
                scales.append(scale)
            parts.append(solved)
        return TestFactors(concat(parts), self.regularization, concat(scales) if compress else None, self._in_basis)

    def _solved(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> Iterator[Grads]:
        """``(H + λI)⁻¹ ∇ℓ_i`` chunk by chunk, in parameter space or (``_in_basis``) as eigenbasis coordinates."""
        if self._in_basis:
            inverse = self.inverse.inverse_diagonal()
            for _, blocks in self._basis_grads(x, y, stage):
                yield {key: r * inverse[key] for key, r in blocks}
        else:
            for _, g in self._grad_groups(x, y, stage):
                yield self._solve(g)

    @_fp32
    def influences(self, factors: TestFactors, x_train, y_train) -> np.ndarray:
        """``I[t, i] = F_tᵀ ∇ℓ(z_i)``: ``(n_test, n_train)`` float32, positive = helpful (removing ``z_i``
        raises test point ``t``'s loss by about ``I[t, i] / n_train``). Training gradients are streamed."""
        self._check_factors(factors)
        x, y = self._check(x_train, y_train)
        k = len(factors)
        out = torch.zeros(k, len(x), dtype=torch.float32)
        if factors.in_basis:
            chunks = self._basis_grads(x, y, "influences")
        else:
            chunks = ((rows, g.items()) for rows, g in self._grads(x, y, "influences"))
        for rows, blocks in chunks:
            for n, gn in blocks:
                gn = gn.reshape(gn.shape[0], -1).T
                step = k if factors.scales is None else max(1, GRAD_CHUNK_BYTES // (4 * gn.shape[0]))
                for start in range(0, k, step):
                    out[start:start + step, rows] += (factors.rows(n, start, start + step) @ gn).cpu()
        return out.numpy()

    @_fp32
    def self_influence(self, x_train, y_train) -> np.ndarray:
        """``I(z_i, z_i) = ∇ℓ_iᵀ (H + λI)⁻¹ ∇ℓ_i`` for every training point: ``(n,)`` float32."""
        self._require_fitted()
        x, y = self._check(x_train, y_train)
        out = torch.empty(len(x), dtype=torch.float32)
        if self._in_basis:
            inverse = self.inverse.inverse_diagonal()
            for rows, blocks in self._basis_grads(x, y, "self-influence"):
                out[rows] = sum((r.square() * inverse[key]).flatten(1).sum(1) for key, r in blocks).cpu()
        else:
            for rows, g in self._grad_groups(x, y, "self-influence"):
                out[rows] = row_dot(g, self._solve(g)).cpu()
        return out.numpy()

    @_fp32
    def saliency(self, x_test, y_test, x_train, y_train) -> np.ndarray:
        """Perturbation influence ``∂I(z_i, z_test)/∂x_i`` summed (signed) over colour channels: ``(k, H, W)``.

        Positive at a pixel means brightening that pixel in all channels makes ``z_i`` more helpful for
        ``z_test``. ``x_test``/``y_test`` hold one test point (``(1, C, H, W)`` or ``(C, H, W)``); the test
        factor is a constant and the gradient goes back through ``∇_θ ℓ(z_i)`` (double backward).
        """
        x_test, y_test = torch.as_tensor(x_test), torch.as_tensor(y_test)
        if x_test.dim() == 3:
            x_test, y_test = x_test[None], y_test.reshape(1)
        x_test, y_test = self._check(x_test, y_test)
        if len(x_test) != 1:
            raise InfluenceLensError(f"saliency takes one test point, got {len(x_test)}.", "pass x_test[i:i+1]")
        self._require_fitted()
        (_, g), = self._grads(x_test, y_test, "test factors")
        solved = self._solve(g)  # in parameter space: the double backward runs through parameter gradients
        x, y = self._check(x_train, y_train)
        full_params = {self.full_names[n]: p for n, p in detached(self.params).items()}
        test_factor = {self.full_names[n]: solved[n][0] for n in self.params}

        def influence_sum(images, labels):
            def loss(p):
                return F.cross_entropy(functional_call(self.model, p, (images,)), labels, reduction="sum")
            g = grad(loss)(full_params)
            return sum((g[n] * test_factor[n]).sum() for n in g)

        out = []
        for rows in self._chunks(len(x)):
            with torch.no_grad():  # torch.func still differentiates; no graph towards the other parameters
                pixels = grad(influence_sum)(x[rows].to(self.device, torch.float32), y[rows].to(self.device))
            out.append(pixels.sum(1).cpu())
            self._report("saliency", rows.stop, len(x))
        return torch.cat(out).numpy().astype(np.float32)

    def set_regularization(self, value: float) -> None:
        """Change ``λ``; ``direct`` and ``arnoldi`` reuse their decomposition, nothing is refitted."""
        if not value > 0:
            raise InfluenceLensError(f"regularization must be positive, got {value!r}.", "use e.g. 1e-3")
        self.regularization = float(value)
        self.inverse.set_regularization(value)

    def _check_factors(self, factors: TestFactors) -> None:
        self._require_fitted()
        if not isinstance(factors, TestFactors):
            raise InfluenceLensError("influences() takes the TestFactors returned by test_factors().",
                                     "call F = im.test_factors(x_test, y_test) first")
        if factors.in_basis != self._in_basis:
            raise InfluenceLensError("These test factors come from an influence model with another method.",
                                     "call test_factors() on this influence model")
        if factors.regularization != self.regularization:
            raise InfluenceLensError(
                f"These test factors were solved with λ = {factors.regularization:g}, but λ is now "
                f"{self.regularization:g}.", "call test_factors() again after set_regularization()")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted curvature tensors of the method (empty for ``cg``/``lissa``, which keep none)."""
        self._require_fitted()
        return self.inverse.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a fitted curvature from :meth:`state_dict` instead of calling :meth:`fit`."""
        if not state:
            raise InfluenceLensError(f"Method {self.method!r} keeps no cached curvature state.",
                                     "call fit(x_train, y_train) instead of load_state_dict()")
        self.inverse.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        self._fitted = True
