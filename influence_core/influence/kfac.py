"""K-FAC and eigenvalue-corrected K-FAC (EK-FAC) inverse curvature for ``nn.Linear`` and ``nn.Conv2d`` layers.

Conventions (on top of those in :mod:`.base`):

* **Curvature.** Only the Gauss-Newton matrix ``H = (1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` of the mean
  cross-entropy is approximated (for softmax + CE it equals the true Fisher). The Hessian has no Kronecker
  factorisation here, so ``curvature="hessian"`` is refused.
* **Output curvature, option ``labels``.** ``"exact"``: the *pseudo-gradients* ``s_k = √μ_k u_k`` of the logits
  are back-propagated, ``(μ_k, u_k)`` the nonzero eigenpairs of each sample's ``diag p − p pᵀ``; since
  ``Σ_k s_k s_kᵀ = diag p − p pᵀ`` this reproduces the GN exactly with ``C − 1`` backward passes per chunk (the
  curvature's null direction ``1`` is dropped: one pass for a binary problem). ``"sampled"``: ``label_samples`` labels
  ``y ~ p`` per sample, back-propagating ``(p − e_y)/√m`` (Monte-Carlo Fisher, unbiased, noisy).
  ``"auto"`` (default): exact when the model has at most 16 classes, sampled otherwise.
* **Blocks.** One block per tracked module; weight and bias form one matrix ``[W | b]`` of shape
  ``(out, d)`` with ``d = in·kh·kw (+1)`` (a constant-1 column is appended to the layer inputs for the bias).
  The curvature is block-diagonal across layers.
* **Weighting.** Every sum runs over samples (and label columns) and is divided by ``n_samples`` once at
  the end; chunk means are never averaged, so the chunk size does not change the result.
* **Spatial convention (Conv2d, and Linear on inputs with extra axes).** With ``T`` positions per sample
  (unfolded patches ``a_t``, output gradients ``g_t``) the factors are
  ``A = (1/n) Σ_i (1/T) Σ_t a_t a_tᵀ`` (mean over positions) and ``G = (1/n) Σ_i Σ_t g_t g_tᵀ`` (sum over
  positions), i.e. Grosse & Martens' KFC under spatial homogeneity and spatially uncorrelated derivatives.
  For ``T = 1`` (a plain Linear layer) this is ordinary K-FAC, exact when the output curvature does not
  depend on the sample (see the tests).
* **K-FAC.** ``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ``; ``H_layer ≈ (Q_G ⊗ Q_A) diag(λ_G ⊗ λ_A) (…)ᵀ``.
* **EK-FAC.** Same eigenbases, eigenvalues replaced by the second moments of the true per-sample (per label
  column) gradients ``G_i = Σ_t g_t a_tᵀ`` in that basis: ``Λ_jk = (1/n) Σ_i Σ_c ((Q_Gᵀ G_ic Q_A)_jk)²``
  (George et al. 2018). Per-sample gradients exist for one layer and one chunk at a time only.
* **Solve.** ``(H + λI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` per layer, batched over the leading axis.
* **Influences in the eigenbasis** (:meth:`KFAC.basis_grads`). The engine scores ``r_tᵀ diag(1/(Λ+λ)) r_i``
  with ``r_i = Q_Gᵀ ∇_W ℓ_i Q_A`` taken straight from the hooks: ``(g_i Q_G)ᵀ (a_i Q_A)`` for ``g_i (T, out)``,
  ``a_i (T, d)``, rank ≤ ``T``, so a layer with a small feature map (ResNet's last stage: ``T = 4`` at 64 px)
  never forms a parameter-sized per-sample gradient nor multiplies one by ``Q_A``. Done in the input's
  precision (float32) with bases completed to square matrices (eigenvalue 0 on the complement).
* **Rank-deficient factors.** When a factor has seen fewer rows than half its size (few samples, small
  feature maps) it is eigendecomposed through its Gram matrix; ``Q`` then has fewer columns than rows, the
  curvature is exactly zero on the orthogonal complement and the solve adds ``(V − Q_G Q_Gᵀ V Q_A Q_Aᵀ)/λ``.
* Factors are accumulated and decomposed in ``dtype`` (option; default ``"auto"``: float64 for blocks of at most
  ``2**20`` parameters, float32 above — a ResNet18's ``all`` scope fits 3× faster, and EK-FAC re-fits its
  eigenvalues in whatever basis float32 gives). Influences in the eigenbasis are computed in float32.
* **Hooks.** Forward hooks record each tracked module's input and output (the model continues with a clone
  of the output, so in-place ops downstream cannot corrupt it); output gradients ``g`` come from
  ``torch.autograd.grad`` of ``logitsᵀ s`` w.r.t. those outputs, one call per output-curvature column.
  Progress stages: ``"<name>: factors"`` and ``"<name>: eigenvalue correction"`` (samples),
  ``"<name>: eigendecomposition"`` (layers).

Accuracy: exact (to float64 rounding) for one Linear layer with sample-independent output curvature; the
EK-FAC eigenvalues are exactly the diagonal of the true GN block in the Kronecker eigenbasis. Elsewhere
both are approximations (block-diagonal across layers; Kronecker within a layer), which degrade as the
model's predictions become confident and, for K-FAC, when conv derivatives are spatially correlated.
Cost: a solve costs ``O(out·d·(out + d))`` per vector and layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InfluenceLensError
from .base import Batch, EigenbasisInverse, Grads, Progress

_EXACT_MAX_CLASSES = 16
_GRAM_FRACTION = 0.5  # eigendecompose through the Gram matrix while rows <= fraction * dim
_PER_SAMPLE_BUDGET = 1 << 24  # elements of rotated per-sample gradients held at once (per layer)
_ACTIVATION_CACHE = 1 << 26  # elements of rotated layer inputs kept across label columns (EK-FAC pass)
_AUTO_FLOAT64_PARAMS = 1 << 20  # dtype="auto": float64 factors up to this many parameters in the block
_OPTIONS = {"labels", "label_samples", "seed", "dtype"}


# --------------------------------------------------------------------------------------------- layers
@dataclass
class _Layer:
    """A tracked module and what its hooks captured during the current forward pass."""

    module: nn.Module
    module_name: str
    weight_name: str | None
    bias_name: str | None
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def out_dim(self) -> int:
        return self.module.out_features if isinstance(self.module, nn.Linear) else self.module.out_channels

    @property
    def in_dim(self) -> int:
        """Columns of the block matrix ``[W | b]``."""
        m = self.module
        d = 0
        if self.weight_name is not None:
            d = m.weight[0].numel()
        return d + (1 if self.bias_name is not None else 0)

    def activations(self, dtype: torch.dtype) -> torch.Tensor:
        """Layer inputs of the last forward as ``(b, T, d)`` (patches for Conv2d, 1-column for the bias)."""
        a = self._all_patches()
        b, t = a.shape[:2]
        cols = []
        if self.weight_name is not None:
            cols.append(a.to(dtype))
        if self.bias_name is not None:
            cols.append(torch.ones(b, t, 1, dtype=dtype, device=a.device))
        return torch.cat(cols, dim=2) if len(cols) > 1 else cols[0]

    def rotated_inputs(self, q_a: torch.Tensor) -> torch.Tensor:
        """``activations() @ q_a`` as ``(b, T, r_A)`` in ``q_a``'s dtype, without materialising the bias column."""
        a = self._all_patches()
        b, t, d = a.shape
        if self.weight_name is None:
            return q_a[0].expand(b, t, -1)
        out = a.reshape(b * t, d).to(q_a.dtype) @ q_a[:d]  # one contiguous copy of the unfolded patches
        if self.bias_name is not None:
            out += q_a[d]
        return out.reshape(b, t, -1)

    def _all_patches(self) -> torch.Tensor:
        parts = [self._patches(x) for x in self.inputs]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(x.shape[0], -1, x.shape[-1])
        if x.dim() != 4:
            raise InfluenceLensError(f"K-FAC needs batched 4-D inputs for Conv2d {self.module_name!r}, got shape "
                                     f"{tuple(x.shape)}.", "feed (b, C, H, W) tensors")
        padding = m.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same" (stride 1): pad like nn.Conv2d does, then unfold without padding
                pads = []
                for k, dil in zip(reversed(m.kernel_size), reversed(m.dilation)):
                    total = dil * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
                padding = (0, 0)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)  # (b, d, L)
        return cols.transpose(1, 2)

    def output_grads(self, grads: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """Gradients w.r.t. the outputs of the last forward as ``(b, T, out)``."""
        parts = []
        for g, out in zip(grads, self.outputs):
            g = torch.zeros_like(out) if g is None else g
            if isinstance(self.module, nn.Conv2d):
                g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
            else:
                g = g.reshape(g.shape[0], -1, g.shape[-1])
            parts.append(g)
        g = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return g.to(dtype)

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


class _Factor:
    """Accumulates ``Σ x xᵀ`` over rows ``x``; keeps the rows themselves while there are few of them."""

    def __init__(self, dim: int):
        self.dim = dim
        self.rows: list[torch.Tensor] | None = []
        self.n_rows = 0
        self.dense: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``(N, dim)`` rows, already scaled."""
        if self.rows is not None and self.n_rows + len(x) <= _GRAM_FRACTION * self.dim:
            self.rows.append(x)
            self.n_rows += len(x)
            return
        if self.rows is not None:  # switch to a dense accumulator
            self.dense = torch.zeros(self.dim, self.dim, dtype=x.dtype, device=x.device)
            for r in self.rows:
                self.dense.addmm_(r.T, r)
            self.rows = None
        self.dense.addmm_(x.T, x)

    def eig(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs of ``(1/n) Σ x xᵀ``: ``Q (dim, r)`` with orthonormal columns, eigenvalues ``(r,)``.

        ``r = dim`` for dense factors; fewer (nonzero eigenvalues only) for factors kept as rows.
        """
        if self.dense is not None:
            m = (self.dense + self.dense.T) / (2 * n)
            evals, q = torch.linalg.eigh(m)
            return q, evals.clamp_min(0)
        if not self.rows:
            return torch.zeros(self.dim, 0, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device)
        x = torch.cat(self.rows)  # (N, dim)
        gram = x @ x.T / n
        s, u = torch.linalg.eigh((gram + gram.T) / 2)
        keep = s > s.max().clamp_min(0) * 1e-10
        s, u = s[keep], u[:, keep]
        q = (x.T @ u) / torch.sqrt(s * n)
        return q, s


@dataclass
class _Fitted:
    """The fitted inverse of one layer block."""

    weight_name: str | None
    bias_name: str | None
    weight_shape: tuple[int, ...]
    q_a: torch.Tensor  # (d, r_A)
    q_g: torch.Tensor  # (out, r_G)
    eigenvalues: torch.Tensor  # (r_G, r_A)

    @property
    def key(self) -> str:
        return f"{self.weight_name or ''}|{self.bias_name or ''}"

    @property
    def full_rank(self) -> bool:
        return self.q_a.shape[0] == self.q_a.shape[1] and self.q_g.shape[0] == self.q_g.shape[1]

    def completed(self, dtype: torch.dtype) -> "_Fitted":
        """The same inverse with square bases (complement columns get eigenvalue 0), in ``dtype``; cached."""
        cache = self.__dict__.setdefault("_completed", {})
        if dtype not in cache:
            q_a, q_g = _complete_basis(self.q_a), _complete_basis(self.q_g)
            evals = self.eigenvalues.new_zeros(q_g.shape[1], q_a.shape[1])
            evals[: self.eigenvalues.shape[0], : self.eigenvalues.shape[1]] = self.eigenvalues
            cache[dtype] = _Fitted(self.weight_name, self.bias_name, self.weight_shape, q_a.to(dtype),
                                   q_g.to(dtype), evals.to(dtype))
        return cache[dtype]


# --------------------------------------------------------------------------------------------- methods
class KFAC(EigenbasisInverse):
    """K-FAC: ``H ≈ ⊕_layers A ⊗ G`` (block-diagonal over Linear/Conv2d layers), inverted via eigenbases.

    Options: ``labels`` (``"auto"``, ``"exact"``, ``"sampled"``), ``label_samples`` (int, for ``"sampled"``),
    ``seed`` (label sampling), ``dtype`` (factor precision: ``"auto"``, ``"float64"`` or ``"float32"``).
    One pass over the data (EK-FAC: two).
    """

    name = "kfac"
    supports = ("gauss-newton",)
    _correct_eigenvalues = False

    def __init__(self, regularization: float = 1e-3, curvature: str = "gauss-newton", **options):
        if curvature not in self.supports:
            raise InfluenceLensError(
                f"Method {self.name!r} approximates the Gauss-Newton (Fisher) matrix only; curvature {curvature!r} "
                "has no Kronecker-factored form.",
                "use curvature='gauss-newton', or a method that supports 'hessian' (direct, cg, lissa, arnoldi)")
        unknown = set(options) - _OPTIONS
        if unknown:
            raise InfluenceLensError(f"Unknown option(s) for method {self.name!r}: {', '.join(sorted(unknown))}.",
                                     f"use any of {', '.join(sorted(_OPTIONS))}")
        super().__init__(regularization, curvature, **options)
        self.labels = options.get("labels", "auto")
        if self.labels not in ("auto", "exact", "sampled"):
            raise InfluenceLensError(f"Unknown labels option {self.labels!r}.", "use 'auto', 'exact' or 'sampled'")
        self.label_samples = int(options.get("label_samples", 1))
        if self.label_samples < 1:
            raise InfluenceLensError(f"label_samples must be at least 1, got {self.label_samples}.", "use e.g. 1")
        self.seed = int(options.get("seed", 0))
        dtype = options.get("dtype", "auto")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype.replace("torch.", ""), None)
        if dtype not in (torch.float32, torch.float64, "auto"):
            raise InfluenceLensError(f"Unknown dtype {options.get('dtype')!r}.",
                                     "use 'auto', 'float64' or 'float32'")
        self.dtype_option = dtype
        self._fitted: list[_Fitted] = []

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        batches: Callable[[], Iterable[Batch]],
        n_samples: int,
        progress: Progress | None = None,
    ) -> "KFAC":
        """Accumulate the factors (and, for EK-FAC, the corrected eigenvalues) over ``batches()``."""
        if n_samples < 1:
            raise InfluenceLensError("The training set is empty.", "pass at least one training sample")
        layers = _tracked_layers(model, params)
        self.dtype = self.dtype_option
        if self.dtype == "auto":
            small = sum(p.numel() for p in params.values()) <= _AUTO_FLOAT64_PARAMS
            self.dtype = torch.float64 if small else torch.float32
        stage = f"{self.name}: factors"
        with _hooked(layers):
            fa = {id(layer): _Factor(layer.in_dim) for layer in layers}
            fg = {id(layer): _Factor(layer.out_dim) for layer in layers}
            gen: list[torch.Generator] = []

            def accumulate(logits, columns):
                for layer in layers:
                    a = layer.activations(self.dtype)
                    fa[id(layer)].add(a.reshape(-1, a.shape[-1]) / math.sqrt(a.shape[1]))
                for grads in _column_grads(layers, logits, columns):
                    for layer, g in zip(layers, grads):
                        g = layer.output_grads(g, self.dtype)
                        fg[id(layer)].add(g.reshape(-1, g.shape[-1]))

            self._run_pass(model, layers, batches, n_samples, stage, progress, accumulate, gen)

            fitted = []
            for i, layer in enumerate(layers):
                if progress:
                    progress(f"{self.name}: eigendecomposition", i, len(layers))
                device = _device_of(layer)
                q_a, l_a = fa.pop(id(layer)).eig(n_samples, self.dtype, device)
                q_g, l_g = fg.pop(id(layer)).eig(n_samples, self.dtype, device)
                fitted.append(_Fitted(layer.weight_name, layer.bias_name,
                                      tuple(layer.module.weight.shape) if layer.weight_name else (),
                                      q_a, q_g, l_g[:, None] * l_a[None, :]))
            if progress:
                progress(f"{self.name}: eigendecomposition", len(layers), len(layers))

            if self._correct_eigenvalues:
                lam = {id(layer): torch.zeros_like(f.eigenvalues) for layer, f in zip(layers, fitted)}
                basis = {id(layer): f for layer, f in zip(layers, fitted)}

                def correct(logits, columns):
                    cache, budget = {}, _ACTIVATION_CACHE  # layer inputs reused across label columns
                    for grads in _column_grads(layers, logits, columns):
                        for layer, g in zip(layers, grads):
                            f = basis[id(layer)]
                            g = layer.output_grads(g, self.dtype)  # (b, T, out)
                            rotate_first = _rotate_first(g.shape[1], f, len(columns))
                            a = cache.get(id(layer))
                            if a is None:  # (b, T, r_A) rotated, or (b, T, d)
                                a = layer.rotated_inputs(f.q_a) if rotate_first else layer.activations(self.dtype)
                                if len(columns) > 1 and a.numel() <= budget:
                                    cache[id(layer)] = a
                                    budget -= a.numel()
                            if rotate_first and g.shape[1] == 1:  # Σ_i (g_i ⊗ a_i)² without forming them
                                lam[id(layer)].addmm_(((g @ f.q_g)[:, 0] ** 2).T, a[:, 0] ** 2)
                                continue
                            for rot in _rotated_per_sample(g, a, f, rotate_first):
                                lam[id(layer)].add_((rot ** 2).sum(0))

                self._run_pass(model, layers, batches, n_samples, f"{self.name}: eigenvalue correction", progress,
                               correct, gen)
                for layer, f in zip(layers, fitted):
                    f.eigenvalues = lam.pop(id(layer)) / n_samples
        self._fitted = fitted
        return self

    def _run_pass(self, model, layers, batches, n_samples, stage, progress, on_batch, gen) -> None:
        """One pass over the data: forward with hooks, then ``on_batch(logits, columns)``."""
        done = 0
        first = True
        for x, _y in batches():
            for layer in layers:
                layer.clear()
            with torch.enable_grad():
                logits = model(x)
                if logits.dim() != 2:
                    raise InfluenceLensError(f"K-FAC needs logits of shape (b, classes), got {tuple(logits.shape)}.",
                                             "use a classifier that returns (b, C) logits")
                if first:
                    silent = [layer.module_name or "<model>" for layer in layers if not layer.inputs]
                    if silent:
                        raise InfluenceLensError(
                            f"Module(s) {', '.join(silent)} were not called through their forward(), so K-FAC "
                            "cannot see their inputs.", "limit the scope to modules called as module(x)")
                    first = False
                on_batch(logits, self._columns(logits.detach(), gen))
            for layer in layers:
                layer.clear()
            done += x.shape[0]
            if progress:
                progress(stage, done, n_samples)
        if done != n_samples:
            raise ValueError(f"batches() yielded {done} samples but n_samples={n_samples}")

    def _columns(self, logits: torch.Tensor, gen: list[torch.Generator]) -> list[torch.Tensor]:
        """Square-root columns ``s`` of the output curvature, ``Σ s sᵀ = diag p − p pᵀ`` (or a sample of it)."""
        p = torch.softmax(logits.double(), dim=1)
        n_classes = p.shape[1]
        mode = self.labels
        if mode == "auto":
            mode = "exact" if n_classes <= _EXACT_MAX_CLASSES else "sampled"
        if mode == "exact":
            if n_classes == 1:
                return [torch.zeros_like(logits)]
            # ascending eigenvalues of a PSD matrix with null vector 1: the first is 0 and is dropped
            evals, vecs = torch.linalg.eigh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
            roots = evals[:, 1:].clamp_min(0).sqrt()
            return [(vecs[:, :, k + 1] * roots[:, k:k + 1]).to(logits.dtype) for k in range(n_classes - 1)]
        if not gen:
            g = torch.Generator(device=logits.device)
            g.manual_seed(self.seed)
            gen.append(g)
        y = torch.multinomial(p, self.label_samples, replacement=True, generator=gen[0])  # (b, m)
        cols = []
        for j in range(self.label_samples):
            s = p.clone()
            s[torch.arange(len(p), device=p.device), y[:, j]] -= 1
            cols.append((s / math.sqrt(self.label_samples)).to(logits.dtype))
        return cols

    # ------------------------------------------------------------------ solve
    def solve(self, grads: Grads) -> Grads:
        """``(H + λI)⁻¹ g`` per layer block; ``grads[name]`` is ``(k, *param.shape)``, output likewise."""
        self._require_fitted()
        known = {n for f in self._fitted for n in (f.weight_name, f.bias_name) if n is not None}
        extra = set(grads) - known
        missing = known - set(grads)
        if extra or missing:
            raise ValueError(f"solve() got gradients for parameters {sorted(extra)} that were not fitted"
                             f" and lacks {sorted(missing)}")
        lam = self.regularization
        out: Grads = {}
        for f in self._fitted:
            ref = grads[f.weight_name or f.bias_name]
            k, device, dtype = ref.shape[0], ref.device, ref.dtype
            parts = []
            if f.weight_name is not None:
                parts.append(grads[f.weight_name].reshape(k, f.q_g.shape[0], -1))
            if f.bias_name is not None:
                parts.append(grads[f.bias_name].reshape(k, -1, 1))
            v = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
            v = v.to(device=f.q_a.device, dtype=f.q_a.dtype)
            rot = _sandwich(f.q_g.T, v, f.q_a)  # (k, r_G, r_A)
            if f.full_rank:
                x = _sandwich(f.q_g, rot / (f.eigenvalues + lam), f.q_a.T)
            else:  # zero curvature on the complement of the fitted subspace: there the solve is v / λ
                if lam <= 0:
                    raise InfluenceLensError("The fitted curvature is singular and regularization is 0.",
                                             "use a positive regularization")
                x = _sandwich(f.q_g, rot * (1 / (f.eigenvalues + lam) - 1 / lam), f.q_a.T) + v / lam
            x = x.to(device=device, dtype=dtype)
            if f.weight_name is not None:
                out[f.weight_name] = x[..., : x.shape[2] - (f.bias_name is not None)].reshape(k, *f.weight_shape)
            if f.bias_name is not None:
                out[f.bias_name] = x[..., -1].contiguous()
        return {name: out[name] for name in grads}

    # ------------------------------------------------------------------ eigenbasis
    def basis_grads(self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor,
                    y: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Per layer block ``key``: ``Q_Gᵀ [∇_W ℓ_i | ∇_b ℓ_i] Q_A`` for each sample, ``(b, out, d)`` in ``x``'s
        precision (complete bases), from one forward and one backward pass with hooks."""
        self._require_fitted()
        layers = _tracked_layers(model, params)
        by_key = {f.key: f for f in self._fitted}
        keys = [f"{layer.weight_name or ''}|{layer.bias_name or ''}" for layer in layers]
        if set(keys) != set(by_key):
            raise ValueError(f"basis_grads() got layers {sorted(keys)} but fitted {sorted(by_key)}")
        dtype = x.dtype
        with _hooked(layers), torch.enable_grad():
            logits = model(x)
            residual = torch.softmax(logits.detach(), dim=1)  # ∂ Σ_i CE_i / ∂ logits = p − e_y
            residual[torch.arange(len(y), device=y.device), y] -= 1
            grads = next(_column_grads(layers, logits, [residual]))
            for key, layer, g in zip(keys, layers, grads):
                f = by_key[key].completed(dtype)
                g = layer.output_grads(g, dtype)
                if _rotate_first(g.shape[1], f, 1):
                    yield key, (g @ f.q_g).transpose(1, 2) @ layer.rotated_inputs(f.q_a)
                else:
                    yield key, torch.cat(list(_rotated_per_sample(g, layer.activations(dtype), f, False)))

    def inverse_diagonal(self) -> dict[str, torch.Tensor]:
        """``1 / (Λ + λ)`` per layer block ``(out, d)`` (float32; complement directions: ``1/λ``)."""
        self._require_fitted()
        return {f.key: 1 / (f.completed(torch.float32).eigenvalues + self.regularization) for f in self._fitted}

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise InfluenceLensError(f"{type(self).__name__} is not fitted.", "call fit() or load_state_dict() first")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``"<weight name>|<bias name>|<field>"`` → tensor; fields ``Q_A``, ``Q_G``, ``eigenvalues``,
        ``weight_shape``."""
        state = {}
        for f in self._fitted:
            state[f"{f.key}|Q_A"] = f.q_a
            state[f"{f.key}|Q_G"] = f.q_g
            state[f"{f.key}|eigenvalues"] = f.eigenvalues
            state[f"{f.key}|weight_shape"] = torch.tensor(f.weight_shape, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            prefix, _, fname = key.rpartition("|")
            groups.setdefault(prefix, {})[fname] = value
        fitted = []
        for prefix, t in groups.items():
            if set(t) != {"Q_A", "Q_G", "eigenvalues", "weight_shape"} or prefix.count("|") != 1:
                raise InfluenceLensError(f"The cached {self.name} state is incomplete or from another method.",
                                         "delete the cache and fit again")
            w, b = prefix.split("|")
            fitted.append(_Fitted(w or None, b or None, tuple(int(s) for s in t["weight_shape"].tolist()),
                                  t["Q_A"], t["Q_G"], t["eigenvalues"]))
        self._fitted = fitted


class EKFAC(KFAC):
    """EK-FAC: K-FAC eigenbases with eigenvalues fitted to the per-sample gradients (a second data pass).

    Same options as :class:`KFAC`.
    """

    name = "ekfac"
    _correct_eigenvalues = True


# --------------------------------------------------------------------------------------------- helpers
def _tracked_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> list[_Layer]:
    """The Linear/Conv2d modules owning ``params``; anything else in ``params`` is an error."""
    by_id = {id(p): name for name, p in params.items()}
    if len(by_id) != len(params):
        raise ValueError("params holds the same tensor under two names")
    layers, owned = [], set()
    for mname, module in model.named_modules():
        own = {pn: p for pn, p in module.named_parameters(recurse=False) if id(p) in by_id}
        if not own:
            continue
        names = ", ".join(by_id[id(p)] for p in own.values())
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise InfluenceLensError(
                f"K-FAC/EK-FAC support only nn.Linear and nn.Conv2d layers, but parameter(s) {names} belong to "
                f"{mname or '<model>'!r} ({type(module).__name__}).",
                "limit the scope to Linear/Conv2d modules, or use another method (direct, cg, lissa, arnoldi)")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise InfluenceLensError(
                f"K-FAC/EK-FAC support Conv2d with groups=1 and zero padding only; {mname!r} has groups="
                f"{module.groups}, padding_mode={module.padding_mode!r}.",
                "exclude that layer from the scope, or use another method (direct, cg, lissa, arnoldi)")
        if set(own) - {"weight", "bias"}:
            raise ValueError(f"unexpected parameters {sorted(own)} in {mname!r}")
        if any(id(p) in owned for p in own.values()):
            continue  # shared module reached under a second name
        owned.update(id(p) for p in own.values())
        layers.append(_Layer(module, mname,
                             by_id[id(own["weight"])] if "weight" in own else None,
                             by_id[id(own["bias"])] if "bias" in own else None))
    stray = [n for n, p in params.items() if id(p) not in owned]
    if stray:
        raise InfluenceLensError(f"Parameter(s) {', '.join(stray)} are not parameters of the model.",
                                 "pass parameters taken from model.named_parameters()")
    return layers


@contextmanager
def _hooked(layers: list[_Layer]):
    """Capture the layers' inputs and outputs during forward passes (weights temporarily require grad)."""
    handles, saved = [], []
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(_capture(layer)))
            for p in (layer.module.weight, layer.module.bias):
                if p is not None:
                    saved.append((p, p.requires_grad))
                    p.requires_grad_(True)
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
        for layer in layers:
            layer.clear()


def _capture(layer: _Layer):
    def hook(module, args, output):
        layer.inputs.append(args[0].detach())
        layer.outputs.append(output)
        # the model continues with a copy, so in-place ops downstream cannot alter the tensor we differentiate by
        return output.clone()

    return hook


def _column_grads(layers: list[_Layer], logits: torch.Tensor, columns: list[torch.Tensor]):
    """For each output-curvature column ``s``: per layer, the gradients of ``logitsᵀ s`` w.r.t. its outputs."""
    outs = [o for layer in layers for o in layer.outputs]
    for i, s in enumerate(columns):
        flat = torch.autograd.grad(logits, outs, grad_outputs=s, retain_graph=i < len(columns) - 1,
                                   allow_unused=True)
        grads, pos = [], 0
        for layer in layers:
            grads.append(list(flat[pos:pos + len(layer.outputs)]))
            pos += len(layer.outputs)
        yield grads


def _rotate_first(t: int, f: _Fitted, n_columns: int) -> bool:
    """Whether rotating inputs/output gradients before forming per-sample gradients is cheaper (per sample)."""
    (d, r_a), (out, r_g) = f.q_a.shape, f.q_g.shape
    if t == 1:
        return True
    rotate = t * d * r_a + n_columns * t * r_g * (out + r_a)
    per_sample = n_columns * (t * out * d + min(out * d * r_a + r_g * out * r_a, r_g * out * d + r_g * d * r_a))
    return rotate <= per_sample


def _rotated_per_sample(g: torch.Tensor, a: torch.Tensor, f: _Fitted, rotate_first: bool) -> Iterator[torch.Tensor]:
    """Per-sample gradients ``Q_Gᵀ (Σ_t g_t a_tᵀ) Q_A`` ``(s, r_G, r_A)`` for consecutive sub-chunks of the batch.

    ``g (b, T, out)`` output gradients; ``rotate_first``: ``a (b, T, r_A)`` inputs already rotated
    (:meth:`_Layer.rotated_inputs`) and ``g`` is rotated before the sum over positions (cheap when ``T`` is small);
    else ``a (b, T, d)`` raw inputs, per-sample gradients ``(s, out, d)`` are formed and then rotated.
    """
    if rotate_first:
        g = g @ f.q_g
        step = max(1, _PER_SAMPLE_BUDGET // max(1, g.shape[2] * a.shape[2]))
        for start in range(0, g.shape[0], step):
            yield g[start:start + step].transpose(1, 2) @ a[start:start + step]
        return
    step = max(1, _PER_SAMPLE_BUDGET // max(1, g.shape[2] * a.shape[2]))
    for start in range(0, g.shape[0], step):
        per_sample = g[start:start + step].transpose(1, 2) @ a[start:start + step]  # (s, out, d)
        yield _sandwich(f.q_g.T, per_sample, f.q_a)


def _complete_basis(q: torch.Tensor) -> torch.Tensor:
    """``q (dim, r)`` with orthonormal columns, extended to an orthonormal ``(dim, dim)`` basis (``q`` first)."""
    dim, r = q.shape
    if r == dim:
        return q
    full, _ = torch.linalg.qr(torch.cat([q, torch.eye(dim, dtype=q.dtype, device=q.device)], dim=1))
    return torch.cat([q, full[:, r:]], dim=1)


def _sandwich(left: torch.Tensor, mid: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ mid @ right`` for ``mid (k, p, q)``, multiplied in the cheaper order."""
    (m, p), q, r = left.shape, mid.shape[2], right.shape[1]
    if m * p * q + m * q * r <= p * q * r + m * p * r:
        return (left @ mid) @ right
    return left @ (mid @ right)


def _device_of(layer: _Layer) -> torch.device:
    return next(layer.module.parameters()).device
