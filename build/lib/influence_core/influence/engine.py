"""The influence engine: scopes, streaming over data, test factors, influence matrices and saliency."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from ..errors import InfluenceLensError
from ..progress import Progress
from ..storage import resolve_device
from .base import EigenbasisInverse, InverseCurvature, Method, weighted_squares
from .choices import Curvature, Damping, Scope, ScopeArg, default_damping, parse_scope
from .direct import Direct
from .ops import (
    GRAD_CHUNK_BYTES,
    SOLVE_BYTES,
    Batches,
    Grads,
    concat,
    detached,
    iter_per_sample_grads,
    row_dot,
    rows_per_chunk,
    split,
)

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


class ImageSource(Protocol):
    """Images that need not be in memory at once: ``len(x)`` and ``x[a:b]`` → float32 ``(b − a, C, H, W)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


Images = torch.Tensor | ImageSource


@dataclass
class InfluenceFactors:
    """``(H + λI)⁻¹ ∇ℓ(z_test)`` for ``n`` test points: ``factors[name]`` has shape ``(n, *param.shape)``.

    With ``in_basis`` (methods that are diagonal in a per-layer eigenbasis, :class:`EigenbasisInverse`) the
    keys are the method's blocks and the values the solved vectors' coordinates in that basis.
    Computed once by :meth:`InfluenceModel.test_factors`; tied to the damping it was solved with.
    Factors over :func:`factor_budget` (``all`` scope on a ResNet18: 45 MB per test point in parameter space,
    8.6 MB in EK-FAC's default projected bases) are stored as float16
    values in ``[-1, 1]`` times ``scales[name]`` ``(n,)``; read them with :meth:`rows`. That changed a
    whole-network influence matrix by 1.5e-3 (relative, measured; see the README).
    """

    factors: Grads
    damping: Damping
    scales: dict[str, torch.Tensor] | None = None
    in_basis: bool = False

    def __len__(self) -> int:
        return next(iter(self.factors.values())).shape[0]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Factors ``start:stop`` of parameter ``name`` as a float32 ``(rows, numel)`` matrix."""
        part = self.factors[name][start:stop]
        part = part.reshape(part.shape[0], -1).float()
        return part if self.scales is None else part * self.scales[name][start:stop, None]

    @classmethod
    def join(cls, parts: list[InfluenceFactors]) -> InfluenceFactors:
        """Test factors of consecutive test chunks (computed apart, e.g. on several workers) as one block."""
        first = parts[0]
        if any(
            p.damping != first.damping or p.in_basis != first.in_basis or (p.scales is None) != (first.scales is None)
            for p in parts
        ):
            raise InfluenceLensError(
                "These test factors were computed with different settings.",
                "compute every chunk with the same influence model",
            )
        scales = concat([p.scales for p in parts if p.scales is not None]) if first.scales is not None else None
        return cls(concat([p.factors for p in parts]), first.damping, scales, first.in_basis)

    @staticmethod
    def compress(factors: Grads) -> tuple[Grads, dict[str, torch.Tensor]]:
        scales = {n: f.reshape(f.shape[0], -1).abs().amax(1).clamp_min(1e-30) for n, f in factors.items()}
        return {n: (f / scales[n].view((-1,) + (1,) * (f.dim() - 1))).half() for n, f in factors.items()}, scales


@contextmanager
def full_fp32():
    """No TF32 inside (cuDNN convolutions, CUDA matmuls): influences amplify low-curvature directions, where TF32's
    ~1e-3 relative error became a 1.5 % difference between two exact-in-float32 paths on an H200 (2e-4 without)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
        ):
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
        raise InfluenceLensError(
            f"The model ({type(model).__name__}) has no nn.Linear layer to use as its head.",
            "use scope 'all' or a list of module names, or a classifier that ends in nn.Linear",
        )
    return found[-1]


DEFAULT_METHOD = Direct()


class InfluenceModel:
    """Influence functions ``I(z, z_test) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z)`` for an image classifier, shaped like a
    scikit-learn estimator: the constructor only stores its parameters, :meth:`fit` builds the fitted state
    (trailing-underscore attributes), and anything else before :meth:`fit` is a clear not-fitted error.

    * ``method``: a configured method (``Direct()``, ``CG(maxiter=50)``, ``LiSSA()``, ``Arnoldi(rank=50)``,
      ``KFAC()``, ``EKFAC()``; by name: ``Method.named("ekfac")``).
    * ``scope``: ``"head"`` (the last ``nn.Linear``, on backbone features computed once per image set),
      ``"all"`` (every Conv2d and Linear weight and bias) or module names (their parameters).
    * ``regularization``: ``λ``, a float (absolute) or a :class:`Damping` (e.g. ``Damping.relative_to_top(1e-5)``);
      ``None``: :func:`.choices.default_damping` of the scope (``top:1e-3`` on the head, ``top:1e-5`` beyond).
    * ``curvature``: ``"gauss-newton"`` or ``"hessian"``.
    * ``progress(stage, done, total)`` is called during long loops (stages: ``features``, the method's own fit
      stages, ``test factors``, ``influences``, ``self-influence``, ``saliency``).

    :meth:`fit` moves the model to ``device`` and puts it in eval mode. Computations run in full float32 on CUDA
    (TF32 off, see :func:`full_fp32`). Images ``x`` are a float32 ``(n, C, H, W)`` tensor or an
    :class:`ImageSource` (never materialised: streamed to the device in chunks of ``batch_size``); labels ``y``
    are ``(n,)`` integers. Where ``x``/``y`` are optional, ``None`` means the training set given to :meth:`fit`
    (for the head scope its features were computed there, so the backbone does not run again).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = DEFAULT_METHOD,
        scope: ScopeArg | str | Sequence[str] = Scope.HEAD,
        regularization: float | Damping | None = None,
        curvature: Curvature | str = Curvature.GAUSS_NEWTON,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        progress: Progress | None = None,
    ):
        if not isinstance(method, Method):
            raise InfluenceLensError(
                f"method must be a configured method object, got {method!r}.",
                "pass e.g. EKFAC() or Method.named('ekfac')",
            )
        if int(batch_size) < 1:
            raise InfluenceLensError(f"batch_size must be at least 1, got {batch_size!r}.", "use e.g. 64")
        self.model, self.method, self.scope = model, method, parse_scope(scope)
        self.regularization = default_damping(self.scope) if regularization is None else Damping.of(regularization)
        self.curvature = Curvature.parse(curvature)
        method.check_curvature(self.curvature)
        self.device, self.batch_size, self.progress = device, int(batch_size), progress

    # ----------------------------------------------------------------- fitted state
    def _prepare(self) -> None:
        """Device, eval mode and the scope's parameters: the part of the fitted state that needs no data."""
        self.device_ = resolve_device(self.device)
        self.model.to(self.device_).eval()
        if self.scope == Scope.HEAD:
            self.head_name_, head = _last_linear(self.model)
            self.block_model_: nn.Module = head
            self.params_ = dict(head.named_parameters())
            self.full_names_ = {n: f"{self.head_name_}.{n}" if self.head_name_ else n for n in self.params_}
        else:
            self.block_model_ = self.model
            self.params_ = self._scope_params()
            self.full_names_ = {n: n for n in self.params_}
        self.inverse_: InverseCurvature = self.method.inverse(self.curvature)

    def _scope_params(self) -> dict[str, nn.Parameter]:
        modules = dict(self.model.named_modules())
        if self.scope == Scope.ALL:
            chosen = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        else:
            missing = [n for n in self.scope if n not in modules]
            if missing:
                examples = ", ".join(n for n in list(modules)[1:6])
                raise InfluenceLensError(
                    f"Scope names modules the model does not have: {', '.join(missing)}.",
                    f"use module names from model.named_modules(), e.g. {examples}",
                )
            chosen = list(self.scope)
        params: dict[str, nn.Parameter] = {}
        for name in chosen:
            for pname, p in modules[name].named_parameters(prefix=name, recurse=True):
                params.setdefault(pname, p)
        if not params:
            raise InfluenceLensError(f"Scope {self.scope!r} selects no parameters.", "pick modules that have weights")
        return params

    def _require_fitted(self) -> None:
        if not hasattr(self, "fitted_"):
            raise InfluenceLensError(
                "This InfluenceModel is not fitted yet.", "call fit(x_train, y_train) (or load_state_dict) first"
            )

    @property
    def in_basis_(self) -> bool:
        """Whether influences are scored in the method's eigenbasis (see :class:`EigenbasisInverse`)."""
        return isinstance(self.inverse_, EigenbasisInverse)

    def block_regularization(self) -> dict[str, float]:
        """The ``λ`` each block of the fitted method uses (relative damping resolved): block → λ."""
        self._require_fitted()
        return self.inverse_.block_regularization(self.regularization)

    # ----------------------------------------------------------------- data
    def _check(self, x: Images, y) -> tuple[Images, torch.Tensor]:
        """Validate images and labels without reading more than one image."""
        if isinstance(x, torch.Tensor):
            first = x[:1]
        elif hasattr(x, "__len__") and hasattr(x, "__getitem__"):
            first = x[0:1] if len(x) else torch.empty(0, 1, 1, 1)
        else:
            raise InfluenceLensError(
                f"Images must be a float tensor (n, C, H, W) or an image source with len() and "
                f"slicing, got {type(x).__name__}.",
                "pass x as float32 (n, C, H, W)",
            )
        if not isinstance(first, torch.Tensor) or first.dim() != 4 or not first.is_floating_point():
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise InfluenceLensError(
                f"Images must be float (n, C, H, W), got {shape} {getattr(first, 'dtype', '')}.",
                "pass x as float32 (n, C, H, W)",
            )
        y = torch.as_tensor(y)
        if y.dim() != 1 or len(y) != len(x) or y.dtype not in (torch.int64, torch.int32):
            raise InfluenceLensError(
                f"Labels must be an integer tensor of shape ({len(x)},), got {tuple(y.shape)} {y.dtype}.",
                "pass y as int64 (n,)",
            )
        return x, y.long()

    def _block_data(self, x: Images | None, y) -> tuple[Images, torch.Tensor]:
        """What the block's model takes (images, or head features ``(n, d)`` on the device) and labels."""
        self._require_fitted()
        if x is None and y is None:
            if not hasattr(self, "train_inputs_"):
                raise InfluenceLensError(
                    "This influence model was loaded from a state, not fitted on a training set.",
                    "pass the training images and labels explicitly",
                )
            return self.train_inputs_, self.y_train_
        if x is None or y is None:
            raise InfluenceLensError("Pass both x and y, or neither (the training set).", "pass x and y together")
        x, y = self._check(x, y)
        return (self._features(x) if self.scope == Scope.HEAD else x), y

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def _features(self, x: Images) -> torch.Tensor:
        """Head inputs ``(n, d)`` on the device for images ``x`` (one backbone pass, in chunks)."""
        captured = []
        head = self.block_model_
        handle = head.register_forward_hook(lambda m, inp, out: captured.append((inp[0].detach(), out.detach())))
        parts = []
        try:
            with torch.no_grad():
                for i, rows in enumerate(self._chunks(len(x))):
                    logits = self.model(x[rows].to(self.device_, torch.float32))
                    feats, head_out = captured.pop()
                    if i == 0 and not torch.allclose(head_out, logits, atol=1e-5, rtol=1e-4):
                        raise InfluenceLensError(
                            f"The model's output is not the output of its last nn.Linear ({self.head_name_!r}); "
                            "the head scope needs logits = head(features).",
                            "use scope 'all' or a list of module names",
                        )
                    parts.append(feats.reshape(len(feats), -1))
                    self._report("features", rows.stop, len(x))
        finally:
            handle.remove()
        return torch.cat(parts)

    def _batches(self, x: Images, y: torch.Tensor) -> Batches:
        def batches():
            for rows in self._chunks(len(x)):
                yield x[rows].to(self.device_, torch.float32), y[rows].to(self.device_)

        return batches

    def _grads(self, x: Images, y: torch.Tensor, stage: str) -> Iterator[tuple[slice, Grads]]:
        """Per-sample gradients ``∇ℓ_i`` of the block, in memory-bounded chunks: ``(rows, grads)``."""
        for rows, (inputs, labels) in zip(self._chunks(len(x)), self._batches(x, y)(), strict=True):
            for sub, g in iter_per_sample_grads(self.block_model_, self.params_, inputs, labels):
                yield slice(rows.start + sub.start, rows.start + sub.stop), g
            self._report(stage, rows.stop, len(x))

    def _basis_grads(self, x: Images, y: torch.Tensor, stage: str):
        """Per chunk ``(rows, blocks)``: ``blocks`` yields ``(block, coordinates (b, ...))`` in the eigenbasis."""
        inverse = self.inverse_
        assert isinstance(inverse, EigenbasisInverse)
        return self._per_chunk(x, y, stage, inverse.basis_grads)

    def _per_chunk(self, x: Images, y: torch.Tensor, stage: str, compute, *args):
        """``(rows, compute(block model, params, inputs, labels, *args))`` per memory-bounded chunk of ``x``."""
        for rows, (inputs, labels) in zip(self._chunks(len(x)), self._batches(x, y)(), strict=True):
            yield rows, compute(self.block_model_, self.params_, inputs, labels, *args)
            self._report(stage, rows.stop, len(x))

    def _grad_groups(self, x: Images, y: torch.Tensor, stage: str) -> Iterator[tuple[slice, Grads]]:
        """Like :meth:`_grads`, but merged into groups as large as one batched solve takes (for a linear head:
        hundreds of rows, so an iterative method makes one pass per iteration for all of them)."""
        target = rows_per_chunk(self.params_, len(x), SOLVE_BYTES)
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

    # ----------------------------------------------------------------- public API
    @_fp32
    def fit(self, x_train: Images, y_train) -> InfluenceModel:
        """Fit ``(H + λI)⁻¹`` on the training set ``x_train (n, C, H, W)``, ``y_train (n,)``."""
        x, y = self._check(x_train, y_train)
        if len(x) == 0:
            raise InfluenceLensError("The training set is empty.", "pass at least one training image")
        self._prepare()
        self.train_inputs_ = self._features(x) if self.scope == Scope.HEAD else x
        self.y_train_ = y
        self.inverse_.fit(self.block_model_, self.params_, self._batches(self.train_inputs_, y), len(x), self.progress)
        self.fitted_ = True
        return self

    def _solve(self, grads: Grads) -> Grads:
        """Solve for ``k`` stacked vectors in memory-bounded groups of rows."""
        size = rows_per_chunk(self.params_, next(iter(grads.values())).shape[0], SOLVE_BYTES)
        return concat([self.inverse_.solve(part, self.regularization) for part in split(grads, size)])

    @_fp32
    def test_factors(self, x_test: Images, y_test) -> InfluenceFactors:
        """``(H + λI)⁻¹ ∇ℓ(z_test)`` for every test point, solved once (right-hand sides batched as memory
        allows; test gradients are streamed, never all held at once)."""
        x, y = self._block_data(x_test, y_test)
        compress: bool | None = None  # decided on the first chunk: coordinates per test point (projected bases
        parts, scales = [], []  # have fewer than the scope's parameters)
        for solved in self._solved(x, y, "test factors"):
            if compress is None:
                per_point = sum(f[0].numel() for f in solved.values())
                compress = len(x) * 4 * per_point > factor_budget(self.device_)
            if compress:
                solved, scale = InfluenceFactors.compress(solved)
                scales.append(scale)
            parts.append(solved)
        return InfluenceFactors(
            concat(parts), self.regularization, concat(scales) if compress else None, self.in_basis_
        )

    def _solved(self, x: Images, y: torch.Tensor, stage: str) -> Iterator[Grads]:
        """``(H + λI)⁻¹ ∇ℓ_i`` chunk by chunk, in parameter space or (``in_basis_``) as eigenbasis coordinates."""
        if isinstance(self.inverse_, EigenbasisInverse):
            inverse = self.inverse_.inverse_diagonal(self.regularization)
            for _, blocks in self._basis_grads(x, y, stage):
                yield {key: r * inverse[key] for key, r in blocks}
        else:
            for _, g in self._grad_groups(x, y, stage):
                yield self._solve(g)

    @_fp32
    def influences_from_factors(self, factors: InfluenceFactors, x: Images | None = None, y=None) -> np.ndarray:
        """``I[t, i] = F_tᵀ ∇ℓ(z_i)``: ``(n_test, n)`` float32, positive = helpful (removing ``z_i`` raises test
        point ``t``'s loss by about ``I[t, i] / n_train``). ``x``/``y`` default to the training set; streamed."""
        self._check_factors(factors)
        return self._score(factors, *self._block_data(x, y), with_self=False)[0]

    @_fp32
    def influences_and_self_influence(
        self, factors: InfluenceFactors, x: Images | None = None, y=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`influences_from_factors` ``(n_test, n)`` and :meth:`self_influence` ``(n,)`` of the same points,
        from one pass over them for methods scored in an eigenbasis (K-FAC/EK-FAC; two passes otherwise)."""
        self._check_factors(factors)
        if not factors.in_basis:
            return self.influences_from_factors(factors, x, y), self.self_influence(x, y)
        matrix, self_inf = self._score(factors, *self._block_data(x, y), with_self=True)
        assert self_inf is not None
        return matrix, self_inf

    def _score(
        self, factors: InfluenceFactors, x: Images, y: torch.Tensor, with_self: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The influence matrix against ``x`` (block data), and with ``with_self`` (eigenbasis methods only) the
        self-influence of ``x`` from the same coordinates."""
        k = len(factors)
        out = torch.zeros(k, len(x), dtype=torch.float32)
        self_inf = torch.zeros(len(x), dtype=torch.float32) if with_self else None
        inverse: dict[str, torch.Tensor] = {}
        if with_self:
            assert isinstance(self.inverse_, EigenbasisInverse)
            inverse = self.inverse_.inverse_diagonal(self.regularization)
        if factors.in_basis:
            chunks = self._basis_grads(x, y, "influences")
        else:
            chunks = ((rows, g.items()) for rows, g in self._grads(x, y, "influences"))
        for rows, blocks in chunks:
            for n, gn in blocks:
                if self_inf is not None:
                    self_inf[rows] += weighted_squares(gn, inverse[n]).cpu()
                gn = gn.reshape(gn.shape[0], -1).T
                step = k if factors.scales is None else max(1, GRAD_CHUNK_BYTES // (4 * gn.shape[0]))
                for start in range(0, k, step):
                    out[start : start + step, rows] += (factors.rows(n, start, start + step) @ gn).cpu()
        return out.numpy(), None if self_inf is None else self_inf.numpy()

    def influences(self, x_test: Images, y_test, x: Images | None = None, y=None) -> np.ndarray:
        """:meth:`test_factors` then :meth:`influences_from_factors`: ``(n_test, n)`` float32."""
        return self.influences_from_factors(self.test_factors(x_test, y_test), x, y)

    @_fp32
    def self_influence(self, x: Images | None = None, y=None) -> np.ndarray:
        """``I(z_i, z_i) = ∇ℓ_iᵀ (H + λI)⁻¹ ∇ℓ_i`` for every point (default: the training set): ``(n,)`` float32."""
        x, y = self._block_data(x, y)
        out = torch.empty(len(x), dtype=torch.float32)
        if isinstance(self.inverse_, EigenbasisInverse):
            inverse = self.inverse_.inverse_diagonal(self.regularization)
            for rows, self_inf in self._per_chunk(x, y, "self-influence", self.inverse_.basis_self_influence, inverse):
                out[rows] = self_inf.cpu()
        else:
            for rows, g in self._grad_groups(x, y, "self-influence"):
                out[rows] = row_dot(g, self._solve(g)).cpu()
        return out.numpy()

    @_fp32
    def saliency(self, x_test: Images, y_test, x_train: Images, y_train) -> np.ndarray:
        """Perturbation influence ``∂I(z_i, z_test)/∂x_i`` summed (signed) over colour channels: ``(k, H, W)``.

        Positive at a pixel means brightening that pixel in all channels makes ``z_i`` more helpful for
        ``z_test``. ``x_test``/``y_test`` hold one test point (``(1, C, H, W)`` or ``(C, H, W)``); the test
        factor is a constant and the gradient goes back through ``∇_θ ℓ(z_i)`` (double backward).
        """
        self._require_fitted()
        if isinstance(x_test, torch.Tensor) and x_test.dim() == 3:
            x_test, y_test = x_test[None], torch.as_tensor(y_test).reshape(1)
        x_test, y_test = self._check(x_test, y_test)
        if len(x_test) != 1:
            raise InfluenceLensError(f"saliency takes one test point, got {len(x_test)}.", "pass x_test[i:i+1]")
        ((_, g),) = self._grads(*self._block_data(x_test, y_test), "test factors")
        solved = self._solve(g)  # in parameter space: the double backward runs through parameter gradients
        x, y = self._check(x_train, y_train)
        full_params = {self.full_names_[n]: p for n, p in detached(self.params_).items()}
        test_factor = {self.full_names_[n]: solved[n][0] for n in self.params_}

        def influence_sum(images, labels):
            def loss(p):
                return F.cross_entropy(functional_call(self.model, p, (images,)), labels, reduction="sum")

            g = grad(loss)(full_params)
            return sum((g[n] * test_factor[n]).sum() for n in g)

        out = []
        for rows, (images, labels) in zip(self._chunks(len(x)), self._batches(x, y)(), strict=True):
            with torch.no_grad():  # torch.func still differentiates; no graph towards the other parameters
                pixels = grad(influence_sum)(images, labels)
            out.append(pixels.sum(1).cpu())
            self._report("saliency", rows.stop, len(x))
        return torch.cat(out).numpy().astype(np.float32)

    def set_regularization(self, value: float | Damping) -> None:
        """Change ``λ``; nothing is refitted (test factors computed before must be computed again)."""
        self.regularization = Damping.of(value)

    def _check_factors(self, factors: InfluenceFactors) -> None:
        self._require_fitted()
        if not isinstance(factors, InfluenceFactors):
            raise InfluenceLensError(
                "influences_from_factors() takes the InfluenceFactors of test_factors().",
                "call F = im.test_factors(x_test, y_test) first",
            )
        if factors.in_basis != self.in_basis_:
            raise InfluenceLensError(
                "These test factors come from an influence model with another method.",
                "call test_factors() on this influence model",
            )
        if factors.damping != self.regularization:
            raise InfluenceLensError(
                f"These test factors were solved with λ = {factors.damping}, but λ is now {self.regularization}.",
                "call test_factors() again after set_regularization()",
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted curvature tensors of the method (empty for ``cg``/``lissa``, which keep none)."""
        self._require_fitted()
        return self.inverse_.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> InfluenceModel:
        """Restore a fitted curvature from :meth:`state_dict` instead of calling :meth:`fit` (influences then take
        the training images explicitly)."""
        if not state:
            raise InfluenceLensError(
                f"Method {self.method.name!r} keeps no cached curvature state.",
                "call fit(x_train, y_train) instead of load_state_dict()",
            )
        self._prepare()
        self.inverse_.load_state_dict({k: v.to(self.device_) for k, v in state.items()})
        self.fitted_ = True
        return self
