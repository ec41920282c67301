"""Tracked layers of K-FAC / EK-FAC: what each supported module type contributes, registered by module type.

A tracked layer turns what its forward hook captured into the two sides of its Kronecker factors: layer inputs
``a (b, T, d)`` (``d`` columns of the block matrix ``[W | b]``, a constant-1 column for the bias) and output
gradients ``g (b, T, out)``, with ``T`` positions per sample (Conv2d: unfolded patches; Linear: any extra axes).
Support for another module type is one more subclass of :class:`TrackedLayer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InfluenceLensError

LAYER_TYPES: dict[type[nn.Module], type[TrackedLayer]] = {}
"""Module type → its :class:`TrackedLayer` class; filled as subclasses are defined."""


class TrackedLayer(ABC):
    """A module whose weight (and bias) K-FAC tracks, and what its hooks captured during the current forward."""

    module_type: ClassVar[type[nn.Module]]
    module: nn.Module

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.module_type] = cls

    def __init__(self, module: nn.Module, module_name: str, weight_name: str | None, bias_name: str | None):
        self.module, self.module_name = module, module_name
        self.weight_name, self.bias_name = weight_name, bias_name
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    @property
    def key(self) -> str:
        """``"<weight name>|<bias name>"``: the block's name in fitted state and eigenbasis coordinates."""
        return f"{self.weight_name or ''}|{self.bias_name or ''}"

    @property
    @abstractmethod
    def out_dim(self) -> int:
        """Rows of the block matrix ``[W | b]``."""

    @property
    def in_dim(self) -> int:
        """Columns of the block matrix ``[W | b]``."""
        d = self.module.get_parameter("weight")[0].numel() if self.weight_name is not None else 0
        return d + (1 if self.bias_name is not None else 0)

    @abstractmethod
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """One captured input as ``(b, T, d_weight)`` rows (without the bias column)."""

    def patches_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`patches` of one captured input at ``positions (b, k)`` (indices into its ``T``) only: ``(b, k,
        d_weight)``. Subclasses may form the selected rows without forming the others."""
        return _rows_at(self.patches(x), positions)

    @abstractmethod
    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        """One gradient w.r.t. a captured output as ``(b, T, out)``."""

    def sums_without_patches(self) -> bool:
        """Whether :meth:`per_sample_sums` is available for the last forward (else form :meth:`activations`)."""
        return False

    def per_sample_sums(self, g: torch.Tensor, rows: slice) -> torch.Tensor:
        """``Σ_t g_t a_tᵀ`` ``(s, out, d)`` (the per-sample gradients of ``[W | b]``) for the samples ``rows`` of
        the last forward, from their output gradients ``g (s, T, out)``, without forming their patches; only
        where :meth:`sums_without_patches`."""
        raise NotImplementedError(f"{type(self).__name__} forms per-sample gradients from its activations")

    def n_positions(self) -> int:
        """``T`` of the last forward (all captured calls of the module together)."""
        return sum(o[0].numel() // self.out_dim for o in self.outputs)

    def activations(self, dtype: torch.dtype, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Layer inputs of the last forward as ``(b, T, d)`` (patches for Conv2d, 1-column for the bias), or at
        ``positions (b, k)`` only (indices into ``T``, per sample): ``(b, k, d)``."""
        a = self._all_patches(positions)
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

    def _all_patches(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None and len(self.inputs) == 1:
            return self.patches_at(self.inputs[0], positions)
        parts = [self.patches(x) for x in self.inputs]
        a = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return a if positions is None else _rows_at(a, positions)

    def output_grads(self, grads: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """Gradients w.r.t. the outputs of the last forward as ``(b, T, out)``."""
        parts = [
            self.output_rows(torch.zeros_like(out) if g is None else g)
            for g, out in zip(grads, self.outputs, strict=True)
        ]
        g = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return g.to(dtype)

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


class TrackedLinear(TrackedLayer):
    """``nn.Linear``: one position per sample (``T`` = the product of any extra input axes)."""

    module_type = nn.Linear
    module: nn.Linear

    @property
    def out_dim(self) -> int:
        return self.module.out_features

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


class TrackedConv2d(TrackedLayer):
    """``nn.Conv2d`` with ``groups=1`` and zero padding: ``T`` output positions, unfolded input patches."""

    module_type = nn.Conv2d
    module: nn.Conv2d

    def __init__(self, module: nn.Conv2d, module_name: str, weight_name: str | None, bias_name: str | None):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise InfluenceLensError(
                f"K-FAC/EK-FAC support Conv2d with groups=1 and zero padding only; {module_name!r} has groups="
                f"{module.groups}, padding_mode={module.padding_mode!r}.",
                "exclude that layer from the scope, or use another method (direct, cg, lissa, arnoldi)",
            )
        super().__init__(module, module_name, weight_name, bias_name)

    @property
    def out_dim(self) -> int:
        return self.module.out_channels

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``x`` and the padding to unfold (or convolve) it with: ``padding="same"`` is applied here."""
        m = self.module
        if x.dim() != 4:
            raise InfluenceLensError(
                f"K-FAC needs batched 4-D inputs for Conv2d {self.module_name!r}, got shape {tuple(x.shape)}.",
                "feed (b, C, H, W) tensors",
            )
        if not isinstance(m.padding, str):
            return x, m.padding
        if m.padding == "same":  # stride 1: pad like nn.Conv2d does, then work without padding
            pads = []
            for k, dil in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return x, (0, 0)

    def _geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The zero-padded channels-last input ``(b, H', W', C)`` and the output's height and width."""
        m = self.module
        x, (ph, pw) = self._padded(x)
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        h, w = x.shape[2:]
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1), ho, wo

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``F.unfold``'s patches, transposed to ``(b, T, d)``, but written contiguously in that layout: one stack
        of the ``kh·kw`` shifted views of the channels-last input (``d`` ordered ``(C, kh, kw)`` as the weight's
        rows are). On ResNet18's first stage this takes 2/3 of the time of unfolding and transposing."""
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        x, ho, wo = self._geometry(x)
        b, c = x.shape[0], x.shape[3]
        shifted = [
            x[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        return torch.stack(shifted, dim=-1).reshape(b, ho * wo, c * kh * kw)

    def patches_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The patches of the output positions ``positions (b, k)`` only, gathered from the padded input's pixels
        (no full unfolded copy)."""
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        x, _, wo = self._geometry(x)
        b, hp, wp, c = x.shape
        top, left = (positions // wo) * sh, (positions % wo) * sw  # (b, k): the patch's first input pixel
        offsets = torch.tensor(
            [i * dh * wp + j * dw for i in range(kh) for j in range(kw)], device=positions.device
        )  # (kh·kw,) in (kh, kw) order
        pixels = (top * wp + left)[..., None] + offsets  # (b, k, kh·kw)
        k = positions.shape[1]
        rows = torch.gather(x.reshape(b, hp * wp, c), 1, pixels.reshape(b, -1, 1).expand(-1, -1, c))
        return rows.reshape(b, k, kh * kw, c).transpose(2, 3).reshape(b, k, c * kh * kw)

    def sums_without_patches(self) -> bool:
        """A stride-1 convolution called once per forward (ResNet18's 3×3 convs outside downsampling)."""
        return self.weight_name is not None and len(self.inputs) == 1 and tuple(self.module.stride) == (1, 1)

    def per_sample_sums(self, g: torch.Tensor, rows: slice) -> torch.Tensor:
        """One batched product per kernel offset: with the padded channels-last input flattened to
        ``(s, H'·W', C)`` rows, the input pixels an offset reads for every output position form one contiguous
        slice of ``ho·W'`` rows, and ``g`` padded with zero columns to width ``W'`` cancels the ``W' − wo``
        positions of each row that are no outputs (``W'/wo`` times the products of ``Σ_t g_t a_tᵀ``, no
        ``(s, T, d)`` patches)."""
        m = self.module
        (kh, kw), (dh, dw) = m.kernel_size, m.dilation
        x, ho, wo = self._geometry(self.inputs[0][rows].to(g.dtype))
        s, hp, wp, c = x.shape
        flat = x.new_zeros(s, hp * wp + (kw - 1) * dw, c)  # the last offsets read up to (kw − 1)·dw rows past
        flat[:, : hp * wp].view(s, hp, wp, c).copy_(x)  # x is a channels-last view: one copy
        g_t = F.pad(g.reshape(s, ho, wo, -1), (0, 0, 0, wp - wo)).reshape(s, ho * wp, -1).transpose(1, 2)
        sums = torch.stack(
            [
                g_t @ flat[:, i * dh * wp + j * dw : i * dh * wp + j * dw + ho * wp]
                for i in range(kh)
                for j in range(kw)
            ],
            dim=-1,
        )  # (s, out, C, kh·kw): d ordered (C, kh, kw) as the weight's rows are
        sums = sums.reshape(s, sums.shape[1], -1)
        return torch.cat([sums, g.sum(1)[..., None]], dim=2) if self.bias_name is not None else sums

    def rotated_inputs(self, q_a: torch.Tensor) -> torch.Tensor:
        """As for any layer, but as a convolution of the inputs with ``q_a``'s columns as ``r_A`` filters: the
        same sums as unfolding the patches and multiplying, without the ``k²``-times larger unfolded copy."""
        if self.weight_name is None:
            return super().rotated_inputs(q_a)
        m = self.module
        d = self.in_dim - (self.bias_name is not None)
        filters = q_a[:d].T.reshape(q_a.shape[1], *m.weight.shape[1:])  # (r_A, C, kh, kw), unfold's order
        parts = []
        for x in self.inputs:
            x, padding = self._padded(x)
            out = F.conv2d(x.to(q_a.dtype), filters, stride=m.stride, padding=padding, dilation=m.dilation)
            parts.append(out.flatten(2).transpose(1, 2))  # (b, T, r_A)
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out + q_a[d] if self.bias_name is not None else out

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)


def _rows_at(a: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``a (b, T, d)`` at ``positions (b, k)`` (per-sample indices into ``T``): ``(b, k, d)``."""
    return torch.gather(a, 1, positions[..., None].expand(-1, -1, a.shape[2]))


def tracked_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> list[TrackedLayer]:
    """The tracked modules owning ``params``, in module order; parameters of other module types are an error."""
    by_id = {id(p): name for name, p in params.items()}
    if len(by_id) != len(params):
        raise ValueError("params holds the same tensor under two names")
    layers: list[TrackedLayer] = []
    owned: set[int] = set()
    for mname, module in model.named_modules():
        own = {pn: p for pn, p in module.named_parameters(recurse=False) if id(p) in by_id}
        if not own or any(id(p) in owned for p in own.values()):
            continue  # no tracked parameter, or a shared module reached under a second name
        kind = next((LAYER_TYPES[t] for t in type(module).__mro__ if t in LAYER_TYPES), None)
        if kind is None:
            raise InfluenceLensError(
                f"K-FAC/EK-FAC support only {', '.join(t.__name__ for t in LAYER_TYPES)} layers, but parameter(s) "
                f"{', '.join(by_id[id(p)] for p in own.values())} belong to {mname or '<model>'!r} "
                f"({type(module).__name__}).",
                "limit the scope to those modules, or use another method (direct, cg, lissa, arnoldi)",
            )
        if set(own) - {"weight", "bias"}:
            raise ValueError(f"unexpected parameters {sorted(own)} in {mname!r}")
        owned.update(id(p) for p in own.values())
        layers.append(
            kind(
                module,
                mname,
                by_id[id(own["weight"])] if "weight" in own else None,
                by_id[id(own["bias"])] if "bias" in own else None,
            )
        )
    stray = [n for n, p in params.items() if id(p) not in owned]
    if stray:
        raise InfluenceLensError(
            f"Parameter(s) {', '.join(stray)} are not parameters of the model.",
            "pass parameters taken from model.named_parameters()",
        )
    return layers


@contextmanager
def hooked(layers: list[TrackedLayer]):
    """Capture the layers' inputs and outputs during forward passes (weights temporarily require grad).

    The model continues with a clone of each output, so in-place ops downstream cannot alter the tensor that
    output gradients are taken with respect to.
    """
    handles, saved = [], []

    def capture(layer: TrackedLayer):
        def hook(module, args, output):
            layer.inputs.append(args[0].detach())
            layer.outputs.append(output)
            return output.clone()

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(capture(layer)))
            for p in layer.module.parameters(recurse=False):
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


def column_grads(
    layers: list[TrackedLayer], logits: torch.Tensor, columns: list[torch.Tensor]
) -> Iterator[list[list[torch.Tensor | None]]]:
    """For each output-curvature column ``s``: per layer, the gradients of ``logitsᵀ s`` w.r.t. its outputs."""
    outs = [o for layer in layers for o in layer.outputs]
    for i, s in enumerate(columns):
        flat = torch.autograd.grad(logits, outs, grad_outputs=s, retain_graph=i < len(columns) - 1, allow_unused=True)
        grads: list[list[torch.Tensor | None]] = []
        pos = 0
        for layer in layers:
            grads.append(list(flat[pos : pos + len(layer.outputs)]))
            pos += len(layer.outputs)
        yield grads
