"""Capture the full fine-tuning gradient G = ∂L/∂W of chosen layers on a probe batch, with hooks.

For a linear layer y = W x (+ b) applied to tokens x_1..x_N with output gradients δ_i = ∂L/∂y_i, the weight
gradient is G = Σ_i δ_i x_iᵀ = δᵀX (m×n, ``nn.Linear`` layout; for an adapter layer W = W0 + ΔW, so this is the
gradient full fine-tuning would see at the current effective weight). A forward hook on each layer stores its input
X and its output y; one ``torch.autograd.grad`` call returns δ = ∂L/∂y for every hooked output together with the
gradients of the requested parameters (e.g. the adapters' trainable tensors). Nothing is written to ``.grad`` and no
``requires_grad`` flag changes: when a layer's output does not require grad (a frozen base below any trainable
tensor) the hook adds a zero-valued leaf that does, so the backward reaches that output through the frozen layers
above it while computing no weight gradient of the base model.

Memory: the probe batch's activations (X and δ of every hooked layer, as the forward/backward would hold anyway);
the m×n matrices G are formed later, one layer at a time (:func:`form_gradient`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.base import layer_kind


@dataclass
class Capture:
    """Per-layer activations of one probe: inputs ``xs`` and output gradients ``deltas`` (one per call)."""

    xs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)


def form_gradient(cap: Capture, out_features: int, in_features: int, dtype: torch.dtype,
                  base: nn.Module | None = None) -> torch.Tensor:
    """G = ∂L/∂W (m×n, the layer's matrix view) from the captured inputs and output gradients, in ``dtype`` (zeros if
    the loss did not reach the layer). ``base`` (the layer's base module) selects the rule: a linear layer
    Σ_calls δᵀX; an ``nn.Embedding`` (W stored [num, dim], viewed as dim × num) adds δ into the columns of the
    looked-up indices; a convolution (viewed as out × in·∏k) takes the kernel gradient of the base's own stride,
    padding, dilation and padding mode."""
    kind = layer_kind(base) if base is not None else "linear"
    g: torch.Tensor | None = None
    for x, d in zip(cap.xs, cap.deltas):
        if d is None:
            continue
        if kind == "embedding":
            term = torch.zeros(out_features, in_features, dtype=dtype, device=d.device)
            term.index_add_(1, x.reshape(-1).to(d.device), d.reshape(-1, out_features).to(dtype).T)
            if base.padding_idx is not None:  # the padding row never receives a gradient
                term[:, base.padding_idx] = 0
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma): y = scale · W[x]
            if scale is not None:
                term = term * float(scale)
        elif kind == "conv":
            term = _conv_weight_grad(base, x.to(dtype), d.to(dtype)).reshape(out_features, in_features)
        else:
            term = d.reshape(-1, out_features).to(dtype).T @ x.reshape(-1, in_features).to(dtype)
        g = term if g is None else g + term
    if g is None:
        dev = cap.xs[0].device if cap.xs else torch.device("cpu")
        g = torch.zeros(out_features, in_features, dtype=dtype, device=dev)
    return g


def _conv_weight_grad(conv: Any, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """∂L/∂kernel of ``conv`` (groups 1) for input ``x`` and output gradient ``d``, in the kernel's shape."""
    nd = conv.weight.dim() - 2
    if x.dim() == nd + 1:  # unbatched input
        x, d = x.unsqueeze(0), d.unsqueeze(0)
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):  # pad as the module's forward does, then none
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    fn = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}[nd]
    return fn(x, tuple(conv.weight.shape), d, stride=conv.stride, padding=padding, dilation=conv.dilation, groups=1)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("x", "input", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def capture_gradients(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    compute_loss: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor] = (),
) -> tuple[float, dict[str, Capture], list[torch.Tensor | None]]:
    """Run ``compute_loss()`` once with hooks on ``modules`` and one backward.

    Returns ``(loss value, {name: Capture with xs and deltas}, gradients of params)`` (``None`` for a parameter the
    loss does not reach). Hooks are removed also on error. Raises ``ValueError`` for a non-scalar or non-finite
    loss.
    """
    caps = {name: Capture() for name in modules}
    handles = []

    def make_hook(cap: Capture) -> Callable[..., Any]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            x = _first_tensor(args, kwargs)
            if x is None or not isinstance(out, torch.Tensor):
                return None
            if not out.requires_grad:
                if not out.is_floating_point():
                    return None
                out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            cap.xs.append(x.detach())
            cap.outputs.append(out)
            return out

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(caps[name]), with_kwargs=True))
        with torch.enable_grad():
            loss = compute_loss()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("the probe loss must be a scalar tensor; check loss_fn / the batch's labels")
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(
                    f"the probe loss is not finite ({float(loss.detach())}); check the batch and model"
                )
            outputs = [o for cap in caps.values() for o in cap.outputs]
            inputs = outputs + list(params)
            if not loss.requires_grad or not inputs:
                raise ValueError("the probe loss does not depend on any hooked layer or trainable tensor")
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    i = 0
    for cap in caps.values():
        for _ in cap.outputs:
            g = grads[i]
            cap.deltas.append(None if g is None else g.detach())
            i += 1
        cap.outputs.clear()  # drop the graph's outputs: only X and δ stay alive
    return float(loss.detach()), caps, list(grads[i:])
