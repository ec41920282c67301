"""K-FAC and eigenvalue-corrected K-FAC (EK-FAC) inverse curvature for the layer types of :mod:`.layers`.

Conventions (on top of those in :mod:`.base`):

* **Curvature.** Only the Gauss-Newton matrix ``H = (1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` of the mean
  cross-entropy is approximated (for softmax + CE it equals the true Fisher). The Hessian has no Kronecker
  factorisation here, so ``curvature="hessian"`` is refused.
* **Output curvature, option ``labels``.** ``"exact"``: the *pseudo-gradients* ``s_k = √μ_k u_k`` of the logits
  are back-propagated, ``(μ_k, u_k)`` the nonzero eigenpairs of each sample's ``diag p − p pᵀ``; since
  ``Σ_k s_k s_kᵀ = diag p − p pᵀ`` this reproduces the GN exactly with ``C − 1`` backward passes per chunk (the
  curvature's null direction ``1`` is dropped: one pass for a binary problem). ``"leading"``: only the
  ``label_columns`` pseudo-gradients of largest ``μ_k`` per sample (a truncation: it drops the curvature
  ``Σ_{dropped} μ_k``, small when each prediction puts its mass on a few classes; exact when
  ``label_columns ≥ C − 1``). ``"sampled"``: ``label_samples`` labels ``y ~ p`` per sample, back-propagating
  ``(p − e_y)/√m`` (Monte-Carlo Fisher, unbiased, noisy). ``"auto"`` (default): see :data:`AUTO_LABELS`.
* **Blocks.** One block per tracked module; weight and bias form one matrix ``[W | b]`` of shape
  ``(out, d)`` with ``d = in·kh·kw (+1)`` (a constant-1 column is appended to the layer inputs for the bias).
  The curvature is block-diagonal across layers.
* **Covariances** accumulate only their blocks on and below the diagonal (:data:`.factors.SYMMETRIC_BLOCK`
  columns each) and are mirrored once before the eigendecomposition.
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
* **Solve.** ``(H + λI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` per layer, batched over the leading axis;
  relative damping takes ``λ`` per layer from the mean of that layer's ``Λ`` (over all ``out·d`` directions).
* **Influences in the eigenbasis** (:meth:`KFACInverse.basis_grads`). The engine scores ``r_tᵀ diag(1/(Λ+λ)) r_i``
  with ``r_i = Q_Gᵀ ∇_W ℓ_i Q_A`` taken straight from the hooks: ``(g_i Q_G)ᵀ (a_i Q_A)`` for ``g_i (T, out)``,
  ``a_i (T, d)``, rank ≤ ``T``, so a layer with a small feature map (ResNet's last stage: ``T = 4`` at 64 px)
  never forms a parameter-sized per-sample gradient nor multiplies one by ``Q_A``. Done in the input's
  precision (float32) with bases completed to square matrices (eigenvalue 0 on the complement). Conv inputs
  are rotated by a convolution with ``Q_A``'s columns as filters (no unfolded copy); self-influence alone sums
  layers of at most :data:`PAIR_POSITIONS` positions over pairs of positions, without the coordinates.
* **Rank-deficient factors.** When a factor has seen fewer rows than half its size (few samples, small
  feature maps) it is eigendecomposed through its Gram matrix; ``Q`` then has fewer columns than rows, the
  curvature is exactly zero on the orthogonal complement and the solve adds ``(V − Q_G Q_Gᵀ V Q_A Q_Aᵀ)/λ`` — unless
  the factor is larger than ``rank``: then it is projected (below) whatever the number of rows it saw.
* **Fit size (options ``fit_examples``, ``fit_positions``).** Covariances and EK-FAC's eigenvalues may be fitted
  on a seeded random subset of the training set (by default 256 examples for blocks above 1M parameters); every
  sum is then divided by the subset's size. The input covariance of a layer with many positions may be averaged
  over a random subset of ``k`` positions per example (by default 32 above 1M parameters) instead of all ``T``:
  ``(1/k) Σ_{t∈S} a_t a_tᵀ`` is an unbiased estimate of ``(1/T) Σ_t a_t a_tᵀ``, and neighbouring positions carry
  much the same information; patches are gathered for the chosen positions only. EK-FAC's eigenvalue correction
  and every influence use all positions.
* **Projection (option ``rank``).** Each factor keeps only its ``rank`` leading eigenvectors; a layer whose
  bases were cut scores influences in that ``r_G × r_A`` subspace and drops the rest of every gradient (the
  PCA-initialised Kronecker projection of LoGra, Choe et al. 2024, with EK-FAC's eigenvalues inside). Rotations
  then cost ``T·d·r_A`` instead of ``T·d²`` per sample, and test factors shrink to ``r_G·r_A`` per layer. Not
  the same estimator as the full one: on goldfish/lemon's whole ResNet18 (flips only) at rank 512, Pearson 0.9998
  against full EK-FAC and LDS 0.0832 against 0.0844 (``benchmarks/LDS_HISTORY.md``); at the product's recipe K-FAC
  with every eigenvector scores −0.0002 ± 0.0034 against rank 512, but fitted on 512 examples rank 1024 scores
  +0.0062 ± 0.0018 (``docs/influence.md``).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ...errors import InfluenceLensError
from ...progress import Progress
from ..base import BlockScale, EigenbasisInverse, Grads, Method, check_seed, weighted_squares
from ..choices import Curvature, Damping
from ..ops import Batches, fit_subset, subset_batches
from .factors import OVERSAMPLE, POWER_ITERATIONS, RANDOMIZED_RATIO, Covariance, LayerFactors, sandwich
from .layers import TrackedLayer, column_grads, hooked, tracked_layers

EXACT_MAX_CLASSES = 16
"""``labels="auto"``: exact output curvature up to this many classes (``C − 1`` backward passes per chunk)."""
AUTO_LABELS: Literal["leading", "sampled"] = "leading"
"""``labels="auto"`` above :data:`EXACT_MAX_CLASSES` classes: ``"leading"`` (``label_columns`` passes) or
``"sampled"`` (``label_samples`` passes). Chosen by ``benchmarks/label_columns.py`` (whole ResNet18, 20 real
classes): against every column, the 15 leading ones differ by a relative 0.004, 15 sampled labels by 0.054, one
sampled label by 0.14 (``docs/influence.md``, "Approximations and their measured errors")."""
PER_SAMPLE_BUDGET = 1 << 24
"""Elements of rotated per-sample gradients held at once (per layer)."""
PAIR_POSITIONS = 4
"""Self-influence of a layer with at most this many positions per sample is summed over pairs of positions (T²
products; against forming the coordinates, ``(64, T, 512)`` sides on 2 CPU cores: 5× faster at T = 4, 4× slower
at T = 16)."""
ACTIVATION_CACHE = 1 << 26
"""Elements of rotated layer inputs kept across label columns (EK-FAC pass)."""
DEFAULT_RANK = 512
"""Default ``rank``: factors larger than this are projected (on a ResNet18, the inputs of every 3×3 conv after the
stem and of the 512-feature head with its bias column). Chosen by LDS and cost on goldfish/lemon
(``docs/benchmarks.md``)."""
DEFAULT_FIT_EXAMPLES = 256
"""``fit_examples="auto"`` for blocks of more than :data:`AUTO_FLOAT64_PARAMS` parameters (all examples for smaller
ones, whose fit is cheap). Chosen by the linear datamodeling score and the cost on goldfish/lemon's whole ResNet18:
fitting on more examples scores slightly higher but takes the fit past the cost target (``docs/decisions/``, "Fit
K-FAC on 256 examples"; the scores are the jobs ``ours_kfac_all_fit<k>`` in ``docs/benchmarks.md``)."""
DEFAULT_FIT_POSITIONS = 32
"""``fit_positions="auto"`` for blocks of more than :data:`AUTO_FLOAT64_PARAMS` parameters. On goldfish/lemon's
whole ResNet18 (64 px: 1,024 positions in the stem, 256 in layer1, 64 in layer2) K-FAC's fit took 4.4 s instead
of 5.5–5.9 s (2 CPU cores, ``benchmarks/engine_timing.py``), its matrix changed by a relative 0.024 (64 positions: 0.0074, 16: 0.061; fitting on 512
instead of 256 examples changes it by 0.12) and its LDS by −0.0005 ± 0.0004 (64: −0.0001 ± 0.0002, 16: −0.0006 ±
0.0005; ``docs/benchmarks.md``)."""
AUTO_FLOAT64_PARAMS = 1 << 20
"""``dtype="auto"``: float64 factors up to this many parameters in the block, float32 above."""


@dataclass(frozen=True)
class KFAC(Method):
    """K-FAC: ``H ≈ ⊕_layers A ⊗ G`` (block-diagonal over tracked layers), inverted via eigenbases.

    * ``labels``: output curvature, ``"exact"``, ``"sampled"`` or ``"auto"`` (see the module docstring).
    * ``label_columns``: output-curvature columns kept per example by ``"leading"``.
    * ``label_samples``: labels drawn per example for ``"sampled"``; ``seed``: their random seed (and that of
      the ``fit_examples`` subset).
    * ``dtype``: factor precision, ``"auto"``, ``"float64"`` or ``"float32"``.
    * ``rank``: keep at most this many eigenvectors of each Kronecker factor (largest eigenvalues) and score
      influences in that subspace (see "Projection" in the module docstring); ``None``: all of them.
      Default :data:`DEFAULT_RANK`.
    * ``fit_examples``: fit the factors (and EK-FAC's eigenvalues) on at most this many training examples, a
      random subset drawn with ``seed`` (Kronfluence's ``covariance_max_examples``); influences are still
      computed for every training example. ``None``: all of them; ``"auto"`` (default):
      :data:`DEFAULT_FIT_EXAMPLES` for blocks above :data:`AUTO_FLOAT64_PARAMS` parameters, all below.
    * ``fit_positions``: the input covariance ``A`` of a layer with more than this many positions per example
      (conv feature maps) is accumulated over this many positions per example, drawn at random with ``seed``
      (see "Fit size" in the module docstring). ``None``: every position; ``"auto"`` (default):
      :data:`DEFAULT_FIT_POSITIONS` for blocks above :data:`AUTO_FLOAT64_PARAMS` parameters, all below.

    One pass over the data (EK-FAC: two).
    """

    name = "kfac"
    supports = (Curvature.GAUSS_NEWTON,)
    labels: Literal["auto", "exact", "leading", "sampled"] = "auto"
    label_columns: int = EXACT_MAX_CLASSES - 1
    label_samples: int = 1
    seed: int = 0
    dtype: Literal["auto", "float64", "float32"] = "auto"
    rank: int | None = DEFAULT_RANK
    fit_examples: int | Literal["auto"] | None = "auto"
    fit_positions: int | Literal["auto"] | None = "auto"

    def __post_init__(self):
        if self.labels not in ("auto", "exact", "leading", "sampled"):
            raise InfluenceLensError(
                f"Unknown labels option {self.labels!r}.", "use 'auto', 'exact', 'leading' or 'sampled'"
            )
        if not int(self.label_columns) >= 1:
            raise InfluenceLensError(f"label_columns must be at least 1, got {self.label_columns}.", "use e.g. 15")
        if not int(self.label_samples) >= 1:
            raise InfluenceLensError(f"label_samples must be at least 1, got {self.label_samples}.", "use e.g. 1")
        check_seed(self.name, self.seed)
        if self.dtype not in ("auto", "float64", "float32"):
            raise InfluenceLensError(f"Unknown dtype {self.dtype!r}.", "use 'auto', 'float64' or 'float32'")
        if self.rank is not None and not int(self.rank) >= 1:
            raise InfluenceLensError(f"rank must be at least 1 or None, got {self.rank}.", "use e.g. 512, or None")
        if self.fit_examples not in (None, "auto") and not (
            isinstance(self.fit_examples, int) and self.fit_examples >= 1
        ):
            raise InfluenceLensError(
                f"fit_examples must be at least 1 or None, got {self.fit_examples}.", "use e.g. 256, or None"
            )
        if self.fit_positions not in (None, "auto") and not (
            isinstance(self.fit_positions, int) and self.fit_positions >= 1
        ):
            raise InfluenceLensError(
                f"fit_positions must be at least 1 or None, got {self.fit_positions}.", "use e.g. 32, or None"
            )

    def label_mode(self, n_classes: int) -> Literal["exact", "leading", "sampled"]:
        """The output-curvature mode ``labels`` resolves to for ``n_classes``."""
        if self.labels == "auto":
            return "exact" if n_classes <= EXACT_MAX_CLASSES else AUTO_LABELS
        return self.labels

    def backward_passes(self, n_classes: int) -> int:
        """Backward passes per chunk and data pass (output-curvature columns) for ``n_classes``."""
        mode = self.label_mode(n_classes)
        if mode == "sampled":
            return int(self.label_samples)
        return max(1, n_classes - 1 if mode == "exact" else min(n_classes - 1, int(self.label_columns)))

    def fingerprint(self) -> dict[str, Any]:
        return {
            **super().fingerprint(),
            "auto": {
                "exact_max_classes": EXACT_MAX_CLASSES,
                "labels": AUTO_LABELS,
                "fit_examples": DEFAULT_FIT_EXAMPLES,
                "fit_positions": DEFAULT_FIT_POSITIONS,
                "float64_params": AUTO_FLOAT64_PARAMS,
            },
            "leading_eigh": {"ratio": RANDOMIZED_RATIO, "power_iterations": POWER_ITERATIONS, "oversample": OVERSAMPLE},
        }

    def check_curvature(self, curvature: Curvature) -> None:
        if curvature != Curvature.GAUSS_NEWTON:
            raise InfluenceLensError(
                f"Method {self.name!r} approximates the Gauss-Newton (Fisher) matrix only; curvature "
                f"{curvature.value!r} has no Kronecker-factored form.",
                "use curvature='gauss-newton', or a method that supports 'hessian' (direct, cg, lissa, arnoldi)",
            )


@dataclass(frozen=True)
class EKFAC(KFAC):
    """EK-FAC: K-FAC eigenbases with eigenvalues fitted to the per-sample gradients (a second data pass).

    Same options as :class:`KFAC`.
    """

    name = "ekfac"


class KFACInverse(EigenbasisInverse):
    """The fitted inverse of :class:`KFAC` / :class:`EKFAC`: ``layers``, one :class:`.LayerFactors` per block."""

    method: KFAC

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        batches: Batches,
        n_samples: int,
        progress: Progress | None = None,
    ) -> KFACInverse:
        """Covariances → eigendecomposition → (EK-FAC) eigenvalue correction, over ``batches()`` (or the subset
        of ``fit_examples`` of its ``n_samples`` rows)."""
        if n_samples < 1:
            raise InfluenceLensError("The training set is empty.", "pass at least one training sample")
        small = sum(p.numel() for p in params.values()) <= AUTO_FLOAT64_PARAMS
        fit_examples = self.method.fit_examples
        if fit_examples == "auto":
            fit_examples = None if small else DEFAULT_FIT_EXAMPLES
        fit_positions = self.method.fit_positions
        if fit_positions == "auto":
            fit_positions = None if small else DEFAULT_FIT_POSITIONS
        if fit_examples is not None and fit_examples < n_samples:
            batches = subset_batches(batches, fit_subset(n_samples, fit_examples, self.method.seed))
            n_samples = fit_examples
        tracked = tracked_layers(model, params)
        self.dtype = torch.float64 if self.method.dtype == "float64" else torch.float32
        if self.method.dtype == "auto" and small:
            self.dtype = torch.float64
        self.generator: torch.Generator | None = None
        pass_ = _DataPass(model, tracked, batches, n_samples, progress, self._columns)
        with hooked(tracked):
            covariances = self._covariances(tracked, pass_, fit_positions)
            self.layers = self._eigendecompose(tracked, covariances, n_samples, progress)
            if isinstance(self.method, EKFAC):
                self._correct_eigenvalues(tracked, pass_)
        return self

    def _covariances(
        self, tracked: list[TrackedLayer], pass_: _DataPass, keep: int | None
    ) -> list[tuple[Covariance, Covariance]]:
        """``Σ a aᵀ / T`` and ``Σ g gᵀ`` per layer (unnormalised; see the spatial convention), the first over
        ``keep`` random positions per example (``Σ a aᵀ / k``) where a layer has more."""
        covs = [(Covariance(layer.in_dim), Covariance(layer.out_dim)) for layer in tracked]
        gen = torch.Generator().manual_seed(self.method.seed)  # positions drawn on the CPU: same on every device

        def accumulate(logits, columns):
            for layer, (cov_a, _) in zip(tracked, covs, strict=True):
                t, positions = layer.n_positions(), None
                if keep is not None and t > keep:
                    b = len(logits)
                    positions = torch.rand(b, t, generator=gen).argsort(1)[:, :keep].to(logits.device)
                a = layer.activations(self.dtype, positions)
                cov_a.add(a.reshape(-1, a.shape[-1]), scale=1 / a.shape[1])
            for grads in column_grads(tracked, logits, columns):
                for layer, g, (_, cov_g) in zip(tracked, grads, covs, strict=True):
                    rows = layer.output_grads(g, self.dtype)
                    cov_g.add(rows.reshape(-1, rows.shape[-1]))

        pass_.run(f"{self.method.name}: factors", accumulate)
        return covs

    def _eigendecompose(self, tracked, covariances, n_samples, progress) -> list[LayerFactors]:
        """K-FAC's eigenvalues ``λ_G ⊗ λ_A`` in the covariances' eigenbases."""
        layers = []
        stage = f"{self.method.name}: eigendecomposition"
        for i, (layer, (cov_a, cov_g)) in enumerate(zip(tracked, covariances, strict=True)):
            if progress:
                progress(stage, i, len(tracked))
            device = next(layer.module.parameters()).device
            q_a, l_a, cut_a = cov_a.eig(n_samples, self.dtype, device, self.method.rank)
            q_g, l_g, cut_g = cov_g.eig(n_samples, self.dtype, device, self.method.rank)
            layers.append(
                LayerFactors(
                    layer.weight_name,
                    layer.bias_name,
                    tuple(layer.module.weight.shape) if layer.weight_name else (),
                    q_a,
                    q_g,
                    l_g[:, None] * l_a[None, :],
                    cut_a or cut_g,
                )
            )
            covariances[i] = None  # free the dense covariance before the next layer's eigendecomposition
        if progress:
            progress(stage, len(tracked), len(tracked))
        return layers

    def _correct_eigenvalues(self, tracked: list[TrackedLayer], pass_: _DataPass) -> None:
        """EK-FAC: ``Λ_jk = (1/n) Σ_i Σ_c ((Q_Gᵀ G_ic Q_A)_jk)²`` from the true per-sample gradients."""
        sums = [torch.zeros_like(f.eigenvalues) for f in self.layers]

        def correct(logits, columns):
            cache: dict[int, torch.Tensor] = {}  # layer inputs reused across label columns
            budget = ACTIVATION_CACHE
            for grads in column_grads(tracked, logits, columns):
                for i, (layer, g_out, f) in enumerate(zip(tracked, grads, self.layers, strict=True)):
                    g = layer.output_grads(g_out, self.dtype)  # (b, T, out)
                    rotate_first = _rotate_first(g.shape[1], f, len(columns))
                    a = cache.get(i)  # stays None for sums without patches (no inputs needed)
                    if a is None and (rotate_first or not layer.sums_without_patches()):  # (b, T, r_A) or (b, T, d)
                        a = layer.rotated_inputs(f.q_a) if rotate_first else layer.activations(self.dtype)
                        if len(columns) > 1 and a.numel() <= budget:
                            cache[i] = a
                            budget -= a.numel()
                    if rotate_first and g.shape[1] == 1:  # Σ_i (g_i ⊗ a_i)² without forming them
                        assert a is not None  # rotated inputs
                        sums[i].addmm_(((g @ f.q_g)[:, 0] ** 2).T, a[:, 0] ** 2)
                        continue
                    for rot in _rotated_per_sample(g, a, f, rotate_first, layer):
                        sums[i].add_((rot**2).sum(0))

        pass_.run(f"{self.method.name}: eigenvalue correction", correct)
        for f, total in zip(self.layers, sums, strict=True):
            f.eigenvalues = total / pass_.n_samples

    def _columns(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Square-root columns ``s`` of the output curvature, ``Σ s sᵀ = diag p − p pᵀ`` (or a sample of it)."""
        p = torch.softmax(logits.double(), dim=1)
        n_classes = p.shape[1]
        mode = self.method.label_mode(n_classes)
        if mode in ("exact", "leading"):
            if n_classes == 1:
                return [torch.zeros_like(logits)]
            # ascending eigenvalues of a PSD matrix with null vector 1: the first is 0 and is dropped
            evals, vecs = torch.linalg.eigh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
            roots = evals.clamp_min(0).sqrt()
            first = 1 if mode == "exact" else max(1, n_classes - self.method.label_columns)
            return [(vecs[:, :, k] * roots[:, k : k + 1]).to(logits.dtype) for k in range(first, n_classes)]
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.method.seed)
        m = self.method.label_samples
        y = torch.multinomial(p, m, replacement=True, generator=self.generator)  # (b, m)
        cols = []
        for j in range(m):
            s = p.clone()
            s[torch.arange(len(p), device=p.device), y[:, j]] -= 1
            cols.append((s / math.sqrt(m)).to(logits.dtype))
        return cols

    # ------------------------------------------------------------------ damping and solve
    def block_scales(self, with_mean: bool, with_top: bool = False) -> dict[str, BlockScale]:
        return {f.key: BlockScale(f.mean_eigenvalue, float(f.eigenvalues.max())) for f in self.layers}

    def solve(self, grads: Grads, damping: Damping) -> Grads:
        """``(H + λI)⁻¹ g`` per layer block; ``grads[name]`` is ``(k, *param.shape)``, output likewise."""
        known = {n for f in self.layers for n in (f.weight_name, f.bias_name) if n is not None}
        extra, missing = set(grads) - known, known - set(grads)
        if extra or missing:
            raise ValueError(
                f"solve() got gradients for parameters {sorted(extra)} that were not fitted and lacks {sorted(missing)}"
            )
        lams = self.block_damping(damping)
        out: Grads = {}
        for f in self.layers:
            lam = lams[f.key]
            ref = next(grads[n] for n in (f.weight_name, f.bias_name) if n is not None)
            k, device, dtype = ref.shape[0], ref.device, ref.dtype
            parts = []
            if f.weight_name is not None:
                parts.append(grads[f.weight_name].reshape(k, f.q_g.shape[0], -1))
            if f.bias_name is not None:
                parts.append(grads[f.bias_name].reshape(k, -1, 1))
            v = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
            v = v.to(device=f.q_a.device, dtype=f.q_a.dtype)
            rot = sandwich(f.q_g.T, v, f.q_a)  # (k, r_G, r_A)
            if f.full_rank or f.projected:  # projected: the complement is dropped
                x = sandwich(f.q_g, rot / (f.eigenvalues + lam), f.q_a.T)
            else:  # zero curvature on the complement of the fitted subspace: there the solve is v / λ
                x = sandwich(f.q_g, rot * (1 / (f.eigenvalues + lam) - 1 / lam), f.q_a.T) + v / lam
            x = x.to(device=device, dtype=dtype)
            if f.weight_name is not None:
                out[f.weight_name] = x[..., : x.shape[2] - (f.bias_name is not None)].reshape(k, *f.weight_shape)
            if f.bias_name is not None:
                out[f.bias_name] = x[..., -1].contiguous()
        return {name: out[name] for name in grads}

    # ------------------------------------------------------------------ eigenbasis
    def _layer_sides(
        self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[TrackedLayer, LayerFactors, torch.Tensor]]:
        """Per tracked layer, inside one forward and one backward pass with hooks: the layer (its inputs
        captured), its scoring factors in ``x``'s precision and the output gradients ``(b, T, out)`` of each
        sample's loss."""
        tracked = tracked_layers(model, params)
        by_key = {f.key: f for f in self.layers}
        if {layer.key for layer in tracked} != set(by_key):
            raise ValueError(
                f"basis_grads() got layers {sorted(layer.key for layer in tracked)} but fitted {sorted(by_key)}"
            )
        dtype = x.dtype
        with hooked(tracked), torch.enable_grad():
            logits = model(x)
            residual = torch.softmax(logits.detach(), dim=1)  # ∂ Σ_i CE_i / ∂ logits = p − e_y
            residual[torch.arange(len(y), device=y.device), y] -= 1
            grads = next(column_grads(tracked, logits, [residual]))
            for layer, g_out in zip(tracked, grads, strict=True):
                yield layer, by_key[layer.key].scoring(dtype), layer.output_grads(g_out, dtype)

    def basis_grads(
        self, model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Per layer block ``key``: ``Q_Gᵀ [∇_W ℓ_i | ∇_b ℓ_i] Q_A`` for each sample, ``(b, out, d)`` in ``x``'s
        precision (complete bases), from one forward and one backward pass with hooks."""
        for layer, f, g in self._layer_sides(model, params, x, y):
            yield layer.key, _coordinates(layer, f, g)

    def basis_self_influence(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        x: torch.Tensor,
        y: torch.Tensor,
        inverse: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Self-influence ``(b,)`` as from the coordinates, but a layer with at most :data:`PAIR_POSITIONS`
        positions sums over pairs of positions instead: with ``ĝ_t = Q_Gᵀ g_t``, ``â_t = Q_Aᵀ a_t``,
        ``Σ_jk d_jk (Σ_t ĝ_tj â_tk)² = Σ_{t,t'} (ĝ_t ⊙ ĝ_t')ᵀ D (â_t ⊙ â_t')``, one matrix product without the
        ``(b, r_G, r_A)`` coordinates (ResNet18's last stage at 64 px, ``T`` = 4: 5× faster)."""
        total = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for layer, f, g in self._layer_sides(model, params, x, y):
            d, t = inverse[layer.key], g.shape[1]
            if t <= PAIR_POSITIONS:
                g_rot, a_rot = g @ f.q_g, layer.rotated_inputs(f.q_a)  # (b, T, r_G), (b, T, r_A)
                g_pairs = (g_rot[:, :, None] * g_rot[:, None]).flatten(1, 2)  # (b, T², r_G)
                a_pairs = (a_rot[:, :, None] * a_rot[:, None]).flatten(1, 2)  # (b, T², r_A)
                total += ((g_pairs @ d.to(x.dtype)) * a_pairs).sum((1, 2))
            else:
                total += weighted_squares(_coordinates(layer, f, g), d, overwrite=True)
        return total

    def inverse_diagonal(self, damping: Damping) -> dict[str, torch.Tensor]:
        """``1 / (Λ + λ)`` per layer block ``(r_G, r_A)``: ``(out, d)`` unless projected (float32; complement
        directions of rank-deficient factors: ``1/λ``)."""
        lams = self.block_damping(damping)
        return {f.key: 1 / (f.scoring(torch.float32).eigenvalues + lams[f.key]) for f in self.layers}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``"<weight name>|<bias name>|<field>"`` → tensor; fields ``Q_A``, ``Q_G``, ``eigenvalues``,
        ``weight_shape``, ``projected``."""
        state = {}
        for f in self.layers:
            state[f"{f.key}|Q_A"] = f.q_a
            state[f"{f.key}|Q_G"] = f.q_g
            state[f"{f.key}|eigenvalues"] = f.eigenvalues
            state[f"{f.key}|weight_shape"] = torch.tensor(f.weight_shape, dtype=torch.int64)
            state[f"{f.key}|projected"] = torch.tensor(f.projected)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            prefix, _, fname = key.rpartition("|")
            groups.setdefault(prefix, {})[fname] = value
        layers = []
        for prefix, t in groups.items():
            if set(t) - {"projected"} != {"Q_A", "Q_G", "eigenvalues", "weight_shape"} or prefix.count("|") != 1:
                raise InfluenceLensError(
                    f"The cached {self.method.name} state is incomplete or from another method.",
                    "delete the cache and fit again",
                )
            w, b = prefix.split("|")
            layers.append(
                LayerFactors(
                    w or None,
                    b or None,
                    tuple(int(s) for s in t["weight_shape"].tolist()),
                    t["Q_A"],
                    t["Q_G"],
                    t["eigenvalues"],
                    bool(t["projected"]) if "projected" in t else False,
                )
            )
        self.layers = layers


KFAC.inverse_class = KFACInverse


@dataclass
class _DataPass:
    """One pass over the training data with hooks: forward, then ``on_batch(logits, output-curvature columns)``."""

    model: nn.Module
    layers: list[TrackedLayer]
    batches: Batches
    n_samples: int
    progress: Progress | None
    columns: Callable[[torch.Tensor], list[torch.Tensor]]

    def run(self, stage: str, on_batch: Callable[[torch.Tensor, list[torch.Tensor]], None]) -> None:
        done = 0
        for x, _y in self.batches():
            for layer in self.layers:
                layer.clear()
            with torch.enable_grad():
                logits = self.model(x)
                if logits.dim() != 2:
                    raise InfluenceLensError(
                        f"K-FAC needs logits of shape (b, classes), got {tuple(logits.shape)}.",
                        "use a classifier that returns (b, C) logits",
                    )
                silent = [layer.module_name or "<model>" for layer in self.layers if not layer.inputs]
                if silent:
                    raise InfluenceLensError(
                        f"Module(s) {', '.join(silent)} were not called through their forward(), so K-FAC "
                        "cannot see their inputs.",
                        "limit the scope to modules called as module(x)",
                    )
                on_batch(logits, self.columns(logits.detach()))
            for layer in self.layers:
                layer.clear()
            done += x.shape[0]
            if self.progress:
                self.progress(stage, done, self.n_samples)
        if done != self.n_samples:
            raise ValueError(f"batches() yielded {done} samples but n_samples={self.n_samples}")


def _coordinates(layer: TrackedLayer, f: LayerFactors, g: torch.Tensor) -> torch.Tensor:
    """``Q_Gᵀ G_i Q_A`` ``(b, r_G, r_A)`` of each sample from the output gradients ``g (b, T, out)`` and the
    layer's captured inputs, in ``g``'s dtype, by the cheaper of the two orders."""
    if _rotate_first(g.shape[1], f, 1):
        return (g @ f.q_g).transpose(1, 2) @ layer.rotated_inputs(f.q_a)
    a = None if layer.sums_without_patches() else layer.activations(g.dtype)
    parts = list(_rotated_per_sample(g, a, f, False, layer))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one sub-chunk (the usual case): no copy


def _rotate_first(t: int, f: LayerFactors, n_columns: int) -> bool:
    """Whether rotating inputs/output gradients before forming per-sample gradients is cheaper (per sample)."""
    (d, r_a), (out, r_g) = f.q_a.shape, f.q_g.shape
    if t == 1:
        return True
    rotate = t * d * r_a + n_columns * t * r_g * (out + r_a)
    per_sample = n_columns * (t * out * d + min(out * d * r_a + r_g * out * r_a, r_g * out * d + r_g * d * r_a))
    return rotate <= per_sample


def _rotated_per_sample(
    g: torch.Tensor, a: torch.Tensor | None, f: LayerFactors, rotate_first: bool, layer: TrackedLayer | None = None
) -> Iterator[torch.Tensor]:
    """Per-sample gradients ``Q_Gᵀ (Σ_t g_t a_tᵀ) Q_A`` ``(s, r_G, r_A)`` for consecutive sub-chunks of the batch.

    ``g (b, T, out)`` output gradients; ``rotate_first``: ``a (b, T, r_A)`` inputs already rotated
    (:meth:`.layers.TrackedLayer.rotated_inputs`) and ``g`` is rotated before the sum over positions (cheap when
    ``T`` is small);
    else ``a (b, T, d)`` raw inputs, or None to take the sums from ``layer.per_sample_sums`` (no patches), and
    per-sample gradients ``(s, out, d)`` are formed and then rotated.
    """
    if rotate_first:
        assert a is not None
        g = g @ f.q_g
        step = max(1, PER_SAMPLE_BUDGET // max(1, g.shape[2] * a.shape[2]))
        for start in range(0, g.shape[0], step):
            yield g[start : start + step].transpose(1, 2) @ a[start : start + step]
        return
    step = max(1, PER_SAMPLE_BUDGET // max(1, g.shape[2] * f.q_a.shape[0]))
    for start in range(0, g.shape[0], step):
        rows = slice(start, start + step)
        if a is None:
            assert layer is not None
            per_sample = layer.per_sample_sums(g[rows], rows)  # (s, out, d)
        else:
            per_sample = g[rows].transpose(1, 2) @ a[rows]
        yield sandwich(f.q_g.T, per_sample, f.q_a)
