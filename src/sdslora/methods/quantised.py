"""Quantised base layers (QLoRA): bitsandbytes 4-bit / 8-bit linears and torchao-quantised linears.

A quantised linear is still an ``nn.Linear`` (bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` subclass it; torchao's
``quantize_`` swaps the weight for a tensor subclass such as ``Int8Tensor``), so ``target_modules="all-linear"``
selects it and its matrix view is the logical [out, in] matrix (``in_features`` x ``out_features``, not the packed
storage). The adapter never touches the quantised weight:

* forward: ``base_quantised(x) + adapter path``, the adapter tensors (factors, SDS-LoRA's Q buffers) in the adapter
  dtype: float32 by default (``adapter_dtype="float32"``), or the base's compute dtype (``"base"``: bitsandbytes
  4-bit ``compute_dtype`` or else the dtype it dequantises to; 8-bit the bias' dtype, float32 without bias; torchao
  the weight's logical dtype);
* methods that only read W0 (LoRA-XS's SVD, DoRA's column norms) read the *dequantised* weight, i.e. the weight the
  quantised layer actually computes with (:func:`dequantized_weight`);
* methods that re-base W0 (PiSSA, LoRA-GA: W0 − s·B0·A0) or need ∂L/∂W0 for their initialisation (LoRA-GA,
  LoRA-SB) refuse a quantised layer (``AdapterLayer.quantised_refusal``): a quantised weight can neither hold the
  shifted weight without re-quantising it (the output would change at initialisation and the PEFT export would no
  longer be exact) nor carry a gradient;
* ``merge()`` refuses (:class:`QuantisedMergeError`): re-quantising W0 + ΔW rounds ΔW to the quantisation grid, so
  the merged model would not compute what was trained (a 4-bit grid step is far larger than a typical ΔW entry).
  The explicit alternative is :func:`dequantize_bases` (dense bases in the compute dtype holding exactly the
  dequantised weights), after which ``merge()`` / ``merge_and_unload()`` are exact; or keep the adapter unmerged
  (``export_peft``: a plain PEFT LoRA that loads on the quantised base and on the full-precision one).

Backends are detected by the weight's class (``Params4bit``, ``Int8Params``, a ``torchao`` tensor subclass), without
importing bitsandbytes or torchao unless a layer uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BACKENDS = ("bnb-4bit", "bnb-8bit", "torchao")


class QuantisedMergeError(RuntimeError):
    """``merge()`` on an adapter whose base layer is quantised (see the module docstring for the alternatives)."""


@dataclass(frozen=True)
class Quantisation:
    """What a quantised base layer is: ``backend`` (one of :data:`BACKENDS`) and ``detail`` (``nf4`` / ``fp4``,
    ``int8``, or the torchao tensor class)."""

    backend: str
    detail: str

    def describe(self) -> str:
        if self.backend == "bnb-4bit":
            return f"bitsandbytes 4-bit ({self.detail}) Linear4bit"
        if self.backend == "bnb-8bit":
            return "bitsandbytes 8-bit Linear8bitLt"
        return f"torchao-quantised linear ({self.detail} weight)"


def _weight(module: nn.Module) -> Any:
    return getattr(module, "weight", None) if isinstance(module, nn.Linear) else None


def quantisation(module: nn.Module) -> Quantisation | None:
    """The quantisation of a linear base layer, or None for a plain (dense) one."""
    w = _weight(module)
    if w is None:
        return None
    cls = type(w)
    if cls.__name__ == "Params4bit":
        return Quantisation("bnb-4bit", str(getattr(w, "quant_type", "4bit")))
    if cls.__name__ == "Int8Params" or type(module).__name__ == "Linear8bitLt":
        if w.dtype == torch.int8:
            return Quantisation("bnb-8bit", "int8")
        return None  # Linear8bitLt with has_fp16_weights: a dense weight until it is quantised
    if cls.__module__.split(".")[0] == "torchao":
        return Quantisation("torchao", cls.__name__)
    return None


def is_quantised(module: nn.Module) -> bool:
    return quantisation(module) is not None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantised linear computes in (what ``adapter_dtype="base"`` gives the adapter); the weight's
    dtype for a dense layer."""
    q = quantisation(module)
    w = module.weight
    if q is None:
        return w.dtype
    if q.backend == "bnb-4bit":
        cd = getattr(module, "compute_dtype", None)
        state = getattr(w, "quant_state", None)
        return cd or (state.dtype if state is not None else torch.float32)
    if q.backend == "bnb-8bit":
        bias = getattr(module, "bias", None)
        return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
    return w.dtype  # torchao: the tensor subclass reports its logical (dequantised) dtype


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (quantised) linear computes with, dense [out, in] in the dtype the backend dequantises to (the
    weight itself for a dense layer). Raises TypeError for a torchao tensor type that cannot dequantise."""
    q = quantisation(module)
    w = module.weight
    if q is None:
        return w
    if q.backend == "bnb-4bit":
        import bitsandbytes as bnb

        if w.is_floating_point():  # a Params4bit not quantised yet (quantised when moved to the device)
            return w.detach()
        return bnb.functional.dequantize_4bit(*_canonical_4bit(w))
    if q.backend == "bnb-8bit":
        import bitsandbytes as bnb

        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise TypeError("bitsandbytes Linear8bitLt without its scales (SCB): cannot dequantise its weight")
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))
    try:
        return w.dequantize()
    except (NotImplementedError, AttributeError) as e:
        raise TypeError(f"the torchao weight type {type(w).__name__} cannot be dequantised ({e})") from e


def _canonical_4bit(w: Any) -> tuple[torch.Tensor, Any]:
    """``(packed data, quant_state)`` of a ``Params4bit`` in bitsandbytes' canonical layout, without changing ``w``.

    On a CPU with AVX512-BF16, bitsandbytes (>= 0.49) repacks a 4-bit weight in place at its first inference forward
    (eval mode, input without grad) into a CPU layout with bfloat16 block scales (``packing_format_for_cpu``); this
    undoes that layout on copies, keeping the bfloat16 scales the repacked layer computes with."""
    state = w.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return w.data, state
    import copy

    from bitsandbytes import functional as bf

    inverse = getattr(bf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise TypeError("this bitsandbytes version repacked the 4-bit weight for CPU inference and offers no inverse; "
                        "dequantise before the first inference forward")
    scales = state.absmax  # [K / blocksize, N] bfloat16 in the CPU layout
    st = copy.copy(state)  # the inverse writes into the state it is given: a shallow copy keeps `state` intact
    st.original_nested = False  # do not re-quantise the scales: keep the ones the layer computes with
    data, st = inverse(w.data, st)
    st.absmax = scales.T.reshape(-1).float()
    st.nested = False
    return data, st


def prepare_base(module: nn.Module) -> None:
    """Make a quantised base layer fit for training under an adapter (called when an adapter layer wraps it).

    bitsandbytes (>= 0.49) on a CPU with AVX512-BF16 repacks a 4-bit weight in place at its first inference forward
    (eval mode, input without grad) into a CPU layout whose forward computes in bfloat16 and, in 0.50, passes no
    gradient to its input (and raises with a bias): a training step after an evaluation would silently stop the
    gradients of every adapter below that layer. So the wrapped layer's repacking is switched off
    (``support_avx512bf16_for_cpu = False``: its CPU forward stays the canonical, differentiable one) and a weight
    that was already repacked is put back into the canonical layout (bitsandbytes' own inverse, as its ``.cuda()``
    does). Other backends: nothing to do."""
    q = quantisation(module)
    if q is None or q.backend != "bnb-4bit":
        return
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    w = module.weight
    state = getattr(w, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes import functional as bf

        w.data, w.quant_state = bf._convert_weight_packed_for_cpu_inverse(w.data, state)


def dense_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantised weight of ``module`` (and its bias), frozen, in ``dtype``
    (default: the compute dtype, :func:`compute_dtype`)."""
    dtype = dtype or compute_dtype(module)
    w = dequantized_weight(module)
    bias = getattr(module, "bias", None)
    new = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(w.to(dtype))
        if bias is not None:
            new.bias.copy_(bias.to(dtype))
    new.requires_grad_(False)
    new.train(module.training)
    return new


def dequantize_bases(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantised linear of ``model`` (an :class:`~sdslora.AdaptedModel` or any module), the adapted
    layers' bases included, by a dense ``nn.Linear`` holding its dequantised weight in ``dtype`` (default: each
    layer's compute dtype). Afterwards ``merge()`` / ``merge_and_unload()`` are exact: W_merged = deq(W0) + ΔW,
    the weights the quantised model computed with plus the adapter. A transformers model loaded with a
    ``quantization_config`` loses it (as ``PreTrainedModel.dequantize()`` does), so ``save_pretrained`` writes a
    plain model. Adapter tensors are not touched. Returns ``model``. Memory: the dense weights (e.g. 4 bytes per
    value in float32) replace the packed ones."""
    from ..model import AdaptedModel

    inner = model.model if isinstance(model, AdaptedModel) else model
    for name, module in list(inner.named_modules()):  # an adapter layer's base is its child "base_layer"
        if name and is_quantised(module):
            parent, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent) if parent else inner, child, dense_linear(module, dtype))
    quantizer = getattr(inner, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(inner)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(inner, flag, False):
            setattr(inner, flag, False)
    return model


def merge_error(layer: Any) -> QuantisedMergeError:
    """The error ``merge()`` raises for an adapter layer on a quantised base."""
    q = quantisation(layer.base_layer)
    assert q is not None
    bits = {"bnb-4bit": "4-bit", "bnb-8bit": "8-bit"}.get(q.backend, "quantised")
    return QuantisedMergeError(
        f"{type(layer).__name__}: cannot merge into a {q.describe()} base: the merged weight W0 + ΔW would be "
        f"re-quantised, which rounds ΔW to the {bits} grid, loses the adapter's float precision and changes the "
        "outputs. Choose one: (1) keep the adapter unmerged (save_adapter, or export_peft: a plain PEFT LoRA that "
        "loads on this quantised base and on the full-precision one); (2) dequantise the bases first, "
        "sdslora.methods.quantised.dequantize_bases(model), then merge() / merge_and_unload() are exact (a dense "
        "model in the compute dtype); (3) merge into the full-precision original model by loading the PEFT export "
        "onto it (PeftModel.from_pretrained(base, path).merge_and_unload())."
    )


def refusal(module: nn.Module, layer_cls: Any) -> str | None:
    """Why adapter class ``layer_cls`` cannot adapt the quantised ``module`` (None when it can, or when ``module`` is
    not quantised): a message naming the methods that can."""
    q = quantisation(module)
    reason = getattr(layer_cls, "quantised_refusal", None)
    if q is None or not reason:
        return None
    from . import METHODS

    able = sorted(n for n, s in METHODS.items()
                  if s.layer_cls is not None and not s.layer_cls.quantised_refusal)
    method = getattr(layer_cls, "method", "") or layer_cls.__name__
    return (
        f"it is a {q.describe()}, which method {method!r} cannot adapt: {reason}. Methods that adapt quantised "
        f"layers: {able}; or load the base model unquantised (e.g. bf16) for {method!r}"
    )


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantised) weight occupies: the packed data plus its quantisation state (bitsandbytes'
    absmax / scales, torchao's inner tensors); ``numel * element_size`` for a plain tensor. bitsandbytes' 4-bit
    lookup tables (``code``: 16 or 256 constants per layer) are not counted."""
    cls = type(t).__name__
    if cls == "Params4bit" and not t.is_floating_point():
        total = t.data.numel() * t.data.element_size()
        state = t.quant_state
        while state is not None:
            for name in ("absmax", "offset"):
                v = getattr(state, name, None)
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
            state = getattr(state, "state2", None)
        return total
    if cls == "Int8Params":
        total = t.data.numel() * t.data.element_size()
        scb = getattr(t, "SCB", None)
        return total + (scb.numel() * scb.element_size() if isinstance(scb, torch.Tensor) else 0)
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t).__module__.split(".")[0] == "torchao" and callable(flatten):
        names, _ctx = flatten()
        return sum(storage_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
    return t.numel() * t.element_size()
