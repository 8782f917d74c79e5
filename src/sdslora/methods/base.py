"""The adapter-layer contract every method implements, and the shared merge / export / state mechanics.

A method is a subclass of :class:`AdapterLayer` that owns its tensors (named ``lora_*``) and defines
``delta_weight()`` (the single source of truth for merge, export and diagnostics) and ``adapter_forward(x)``
(the adapter path, computed without forming an out x in matrix). Layers hold tensor operations only: *when* a method
acts over training (SDS-LoRA's re-parameterisation, basis refreshes) is its step plan (:mod:`sdslora.methods.plan`),
which the Controller asks once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .quantised import compute_dtype, dequantized_weight, merge_error, prepare_base, quantisation


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def supported_base(module: nn.Module) -> bool:
    """A linear layer (nn.Linear or transformers Conv1D): what ``target_modules="all-linear"`` selects."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


# ---- the base layer's matrix view -----------------------------------------------------------------------------------
# Every method works with ΔW as an out × in matrix (nn.Linear layout) and an adapter path "down" (an r × in matrix
# applied to the input) then "up" (an out × r matrix). A base layer's matrix view says what that means for its type:
#   "linear"     nn.Linear W [out, in]; transformers Conv1D W [in, out] (stored transposed)
#   "embedding"  nn.Embedding W [num_embeddings, dim]: a linear map of one-hot inputs, out = dim, in = num_embeddings,
#                stored transposed; down = a lookup of the columns of the r × num matrix, up = a linear map
#   "conv"       nn.Conv1d/2d/3d W [out, in_ch, k...] (groups = 1): out = out_ch, in = in_ch·∏k, the kernel read as an
#                out × (in_ch·k...) matrix (row-major, as W.flatten(1)); down = a convolution with the r × in matrix
#                reshaped to a kernel [r, in_ch, k...] (the base's stride, padding, dilation, padding_mode), up = a
#                1×1 convolution with the out × r matrix
# These are PEFT's LoRA layouts: lora_A / lora_B (Linear), lora_embedding_A [r, num] / lora_embedding_B [dim, r]
# (Embedding), lora_A.weight [r, in_ch, k...] / lora_B.weight [out, r, 1...] (ConvNd).
LAYER_KINDS = ("linear", "embedding", "conv")
KIND_NAMES = {"linear": "nn.Linear / transformers Conv1D", "embedding": "nn.Embedding", "conv": "nn.Conv1d/2d/3d"}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def layer_type_name(module: nn.Module) -> str:
    """``nn.Linear`` / ``nn.Embedding`` / ``nn.Conv2d`` for torch's layers, else the class name."""
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def layer_kind(module: nn.Module) -> str | None:
    """The matrix-view kind of a base layer ("linear", "embedding", "conv"), None if it has none."""
    if supported_base(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _CONV_TYPES):
        return "conv"
    return None


def _unsupported(module: nn.Module, why: str) -> TypeError:
    return TypeError(f"{layer_type_name(module)} {why}: sdslora cannot adapt it; remove it from target_modules")


@dataclass(frozen=True)
class MatrixView:
    """How a base layer's weight reads as the out × in matrix the methods work with (see the table above)."""

    kind: str
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]
    transposed: bool  # the weight is stored [in, out] (transformers Conv1D, nn.Embedding)

    def to_base(self, m: torch.Tensor) -> torch.Tensor:
        """An [out, in] matrix in the layout of the base weight."""
        if self.kind == "conv":
            return m.reshape(self.weight_shape)
        return m.T if self.transposed else m

    def from_base(self, w: torch.Tensor) -> torch.Tensor:
        """A tensor in the layout of the base weight as the [out, in] matrix."""
        if self.kind == "conv":
            return w.reshape(self.out_features, self.in_features)
        return w.T if self.transposed else w

    def peft_factors(self, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """PEFT's LoRA tensors (local key -> tensor) of the factorisation ΔW = up @ down (up [out, k], down [k, in])."""
        if self.kind == "embedding":
            return {"lora_embedding_A": down, "lora_embedding_B": up}
        if self.kind == "conv":
            ones = (1,) * (len(self.weight_shape) - 2)
            return {"lora_A.weight": down.reshape(down.shape[0], *self.weight_shape[1:]),
                    "lora_B.weight": up.reshape(*up.shape, *ones)}
        return {"lora_A.weight": down, "lora_B.weight": up}


def matrix_view(module: nn.Module) -> MatrixView:
    """The matrix view of a base layer; TypeError for a layer type (or configuration) sdslora cannot adapt."""
    kind = layer_kind(module)
    if kind is None:
        raise _unsupported(module, "is not an nn.Linear, transformers Conv1D, nn.Embedding or nn.Conv1d/2d/3d")
    shape = tuple(int(d) for d in module.weight.shape)
    if kind == "linear" and quantisation(module) is not None:  # the logical matrix, not the packed storage
        return MatrixView(kind, module.in_features, module.out_features, (module.out_features, module.in_features),
                          False)
    if kind == "linear":
        if is_conv1d(module):
            return MatrixView(kind, shape[0], shape[1], shape, True)
        return MatrixView(kind, module.in_features, module.out_features, shape, False)
    if kind == "embedding":
        if module.max_norm is not None:  # its forward renormalises rows of W in place: not a linear map of W
            raise _unsupported(module, f"with max_norm={module.max_norm}")
        return MatrixView(kind, shape[0], shape[1], shape, True)
    if module.groups != 1:  # a grouped kernel is block-diagonal: not a dense out × (in·k) matrix
        raise _unsupported(module, f"with groups={module.groups}")
    return MatrixView(kind, math.prod(shape[1:]), shape[0], shape, False)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable base layer's matrix view (in = in_channels·∏kernel for a
    convolution, num_embeddings for an embedding)."""
    view = matrix_view(module)
    return view.in_features, view.out_features


def sync_state_after_load(module: nn.Module, _incompatible_keys: Any) -> None:
    """A ``load_state_dict`` post-hook of layers whose derived state follows their loaded tensors (a named function,
    not a lambda, so an adapted model can be pickled whole)."""
    module.sync_state()  # type: ignore[operator]


class AdapterLayer(nn.Module):
    """Base class: wraps a frozen ``base_layer``; ``forward = base(x) + adapter_forward(x)``."""

    method: ClassVar[str] = ""
    needs_init_data: ClassVar[bool] = False  # True: attach() needs init_data and calls init_from_gradient(G)
    # True: the method replaces the frozen base weight (PiSSA: W_res = W0 − s·B0·A0), so "adapter disabled" means the
    # re-based weight, delta_weight() is relative to the ORIGINAL W0 and merge() adds delta_to_base() instead
    rebases_base_weight: ClassVar[bool] = False
    # the base-layer kinds (matrix views, see LAYER_KINDS) the method adapts; attach() refuses the others
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    # None: the method adapts quantised linears (bitsandbytes 4/8-bit, torchao; see methods.quantised); else why not
    quantised_refusal: ClassVar[str | None] = None

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__()
        # deferred: the layer is about to be filled from a saved adapter (io.load_adapter): skip weight-dependent
        # initialisation (PiSSA's SVD and re-basing of W0, LoRA-XS's SVD); post_load() finishes it
        self.deferred = deferred
        self.view = matrix_view(base_layer)
        if self.view.kind not in self.layer_kinds:
            raise TypeError(
                f"{type(self).__name__} (method {self.method!r}) cannot adapt a {layer_type_name(base_layer)}; "
                f"it adapts {', '.join(KIND_NAMES[k] for k in self.layer_kinds)}"
            )
        self.in_features, self.out_features = self.view.in_features, self.view.out_features
        quant = quantisation(base_layer)
        if quant is not None and self.quantised_refusal:
            raise TypeError(
                f"{type(self).__name__} (method {self.method!r}) cannot adapt a {quant.describe()}: "
                f"{self.quantised_refusal}"
            )
        if quant is not None:
            prepare_base(base_layer)  # bitsandbytes' CPU inference repacking would cut the gradients (see there)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # transformers Conv1D (PEFT's config field of that name)
        self.r = int(r)
        self.scale = float(scale)
        self.options = options
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # a quantised base: its compute dtype (the adapter never holds integer / packed dtypes)
        base_dtype = compute_dtype(base_layer) if quant is not None else self.base_weight.dtype
        self.adapter_dtype = torch.float32 if (dtype == "float32" and base_dtype.is_floating_point) else base_dtype
        self.merged = False
        self.disabled = False

    # ---- the contract ---------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout [out, in], in the adapter dtype, differentiable w.r.t. the trainable tensors."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x`` (no dense ΔW)."""
        raise NotImplementedError

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An exact plain-LoRA factorisation ``(B', A')`` with ``ΔW = B' @ A'`` (scale folded into B')."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable layer state that is not a tensor (saved with the adapter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got {sorted(state)}")

    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """Data-driven initialisation of a ``needs_init_data`` method, called by attach() right after construction
        (never when a saved adapter is loaded). ``grad``: mean ∂L/∂W over the init data, float32, [out, in]."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient-based initialisation")

    @classmethod
    def tie_layers(cls, layers: Mapping[str, AdapterLayer]) -> None:
        """Establish what the method shares across layers (LoTR: one U, V per shape group), once every layer exists:
        ``attach_layers`` calls it once with all the new layers (name -> layer, in model order) after building (and
        data-initialising) them, before the model is handed back; on the load path that is before the saved tensors
        are copied in. A shared tensor is one ``nn.Parameter`` registered in several layers. Default: nothing."""

    @classmethod
    def regularization(cls, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """A penalty the method adds to the training loss, computed over all its layers (AdaLoRA's orthogonality
        term); ``AdaptedModel`` adds it to the output's loss while training. Default: None (no penalty)."""
        return None

    def sync_state(self) -> None:
        """Re-derive the layer's Python-side state (e.g. SDS-LoRA's phase flag) from its tensors after they were
        overwritten from outside (a loaded adapter, a rolled-back duty). Default: nothing."""

    # ---- what callers outside methods/ may ask of any layer (no reaching into a method's tensors by name) ----------
    def isotropic_gradient(self) -> bool:
        """Whether the layer's effective gradient is currently independent of its factors' spectra (SDS-LoRA after
        its re-parameterisation: G P_A + P_B G). Default: False."""
        return False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The trained factor pair ``(A [k, in], B [out, k])``, detached, for diagnostics; None for methods without
        one. Default: ``lora_A`` and ``lora_B`` when both are matrices that chain."""
        a, b = getattr(self, "lora_A", None), getattr(self, "lora_B", None)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
            return None
        return (a.detach(), b.detach()) if b.shape[1] == a.shape[0] else None

    def gradient_subspaces(self) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """Orthonormal bases ``(U [out, k], V [in, k], label)`` of the column and row subspaces the method's updates
        live in (diagnostics project the full gradient on them). Default: col(B) and row(A) of :meth:`factors`."""
        from ..diagnostics.metrics import orthonormal_basis

        fac = self.factors()
        if fac is None:
            return None
        a, b = fac
        return orthonormal_basis(b), orthonormal_basis(a.T), "B,A"

    def activation_width(self) -> int:
        """Values per token the adapter path saves for backward (r for a rank-r pair; SDS-LoRA's decoupled path 2r)."""
        return self.r

    def prepare_unload(self) -> None:
        """Called by ``AdaptedModel.unload()`` before the plain base module is put back without merging: undo what
        the layer changed in the base (methods that re-base W0 shift it back). Default: nothing."""

    def post_load(self) -> None:
        """Called by ``io.load_adapter`` after the saved tensors and extra state are copied in (layers built with
        ``deferred=True``): re-derive what depends on them (PiSSA re-bases W0). Default: nothing."""

    def delta_to_base(self) -> torch.Tensor:
        """What ``merge()`` adds to the layer's current base weight, [out, in]: ``delta_weight()``, except for
        methods that re-base W0 (``rebases_base_weight``), whose ``delta_weight()`` is relative to the original."""
        return self.delta_weight()

    def peft_extras(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Extra PEFT ``adapter_config.json`` fields (equal for every layer, e.g. ``{"use_dora": True}``) and extra
        tensors of this layer (local key -> tensor, e.g. ``{"lora_magnitude_vector": m}``) for ``io.export_peft``."""
        return {}, {}

    # ---- shared mechanics -------------------------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own parameters and persistent buffers (not the base layer's), by local name."""
        # the module's own dicts, not named_parameters(): this runs for every layer at every duty step
        out: dict[str, torch.Tensor] = {n: p for n, p in self._parameters.items() if p is not None}
        skip = self._non_persistent_buffers_set
        out.update((n, b) for n, b in self._buffers.items() if b is not None and n not in skip)
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        return result + self.adapter_forward(x).to(result.dtype)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> AdapterLayer:
        # model.to(dtype) / .half() / .bfloat16() cast the adapter tensors too: follow them (else the adapter
        # path would feed float32 inputs into bf16 factors)
        out = super()._apply(fn, *args, **kwargs)
        for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)):
            if t.is_floating_point():
                self.adapter_dtype = t.dtype
                break
        return out

    def _cast_in(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter path's input: cast to the adapter dtype, dropout (an embedding's indices pass unchanged)."""
        if self.view.kind == "embedding":
            return x
        return self.dropout(x.to(self.adapter_dtype))

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Apply a [k, in] matrix to the (cast) input the way the base layer applies W: a linear map, a lookup of
        its columns (embedding) or a convolution with its rows as kernels (same geometry as the base)."""
        kind = self.view.kind
        if kind == "embedding":
            base = self.base_layer
            return F.embedding(x, down.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        if kind == "conv":  # the base's own convolution (stride, padding, padding_mode, dilation) with kernel `down`
            return self.base_layer._conv_forward(x, down.reshape(down.shape[0], *self.view.weight_shape[1:]), None)
        return F.linear(x, down)

    def _up(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Apply an [out, k] matrix to the output of :meth:`_down` (a 1×1 convolution for a convolution)."""
        if self.view.kind == "conv":
            nd = len(self.view.weight_shape) - 2
            return _CONV_FNS[nd](h, up.reshape(*up.shape, *(1,) * nd))
        y = F.linear(h, up)
        if self.view.kind == "embedding":  # scaled embeddings (e.g. Gemma's) scale W's rows: scale ΔW's too
            embed_scale = getattr(self.base_layer, "embed_scale", None)
            if embed_scale is not None:
                y = y * (embed_scale.to(y.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
        return y

    def _lowrank_forward(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """``s · up (down x)`` in the base layer's operation: the adapter path of ΔW = s · up @ down."""
        return self._up(self._down(self._cast_in(x), down), up) * self.scale

    def _to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """An [out, in] matrix (ΔW) in the base weight's layout (transposed, or reshaped to the kernel)."""
        return self.view.to_base(delta)

    def weight_matrix(self) -> torch.Tensor:
        """The base weight as the [out, in] matrix (a view of it); for a quantised base a dense copy of the weight it
        computes with (dequantised; read-only use)."""
        if self.quantised is not None:
            return dequantized_weight(self.base_layer)
        return self.view.from_base(self.base_weight)

    @property
    def quantised(self) -> Any:
        """The base layer's :class:`~sdslora.methods.quantised.Quantisation`, None for a dense base."""
        return quantisation(self.base_layer)

    def check_mergeable(self) -> None:
        """Raise :class:`~sdslora.methods.quantised.QuantisedMergeError` if ``merge()`` cannot fold ΔW into the base
        (a quantised base: re-quantising would round ΔW away; see ``methods.quantised`` for the alternatives)."""
        if self.quantised is not None:
            raise merge_error(self)

    def peft_factors(self, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """PEFT's LoRA tensors of this layer (local key -> tensor) for ΔW = up @ down, as :meth:`export_lora` gives."""
        return self.view.peft_factors(up, down)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW to the base weight (in place); the adapter path is then skipped."""
        if self.merged:
            return
        self.check_mergeable()
        w = self.base_weight
        delta = self._to_base_layout(self.delta_to_base()).to(w.dtype)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{type(self).__name__}: ΔW has non-finite entries; refusing to merge")
        w.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again."""
        if not self.merged:
            return
        w = self.base_weight
        w.sub_(self._to_base_layout(self.delta_to_base()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "" if self.view.kind == "linear" else f"{self.view.kind} {tuple(self.view.weight_shape)} as "
        return f"method={self.method}, {kind}in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:.4g}"
