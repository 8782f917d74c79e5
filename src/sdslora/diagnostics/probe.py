"""``diagnose(model, batch)``: is the attached method bending the gradient? (docs/diagnostics.md, "Generic
diagnostics, for free".)

Per adapted layer, on one probe batch (model in eval mode: no dropout):

* ``G``: the full fine-tuning gradient ∂L/∂W at the current effective weight W = W0 + ΔW, captured with hooks
  (:mod:`sdslora.diagnostics.capture`).
* ``G̃``: the method's effective gradient, generically J·d through ``layer.delta_weight()`` with d = the trainable
  tensors' gradients (SGD direction; ``cos_g_geff``) and, with ``optimizer=``, d = the optimizer's would-be step
  (AdamW/Adam/SGD; ``cos_g_geff_opt``; where a schedule has brought the learning rate to 0, e.g. at the last step of
  a cosine or linear decay, the step at the group's initial rate, so the metric covers the whole run). Full
  fine-tuning: G̃ = G.
* ``G*`` = G − (I−P_B) G (I−P_A), the best gradient realisable through the current subspaces. Subspaces used:
  LoRA (and any layer with ``lora_A``/``lora_B`` factors, SDS-LoRA during its LoRA warm-up, the orthogonal
  ablation): col(B) and row(A). SDS-LoRA after the re-parameterisation: col(Q_B) and col(Q_A), the bases its
  gradients are projected on (∇_A = s Q_BᵀG, ∇_B = s G Q_A); they equal col(B), row(A) right after a refresh and
  drift from them in between (the full update space is col([Q_B | B]) × row([A ; Q_Aᵀ])). ``cos_g_gstar`` =
  ‖G*‖/‖G‖ is how much of G the subspaces can express at all; ``cos_geff_gstar`` how well the method uses them.
* ``cos_g_gr`` = ‖G_r‖/‖G‖ for the rank-r truncation of G (Eckart–Young, r = the layer's rank).
* Factor metrics (layers with ``lora_A`` [r, in] and ``lora_B`` [out, r]): effective rank (Roy & Vetterli) of
  ∇_A and ∇_B (where they are trainable) and of the scale-free counterparts U_BᵀG and G V_A (U_B, V_A orthonormal
  bases of col(B), row(A)); stable rank and condition number κ of A and B. Every layer: stable rank, κ and rank of
  ΔW from its exact low-rank export (nonzero singular values only).

Verdict in plain words: :mod:`sdslora.diagnostics.verdict`; recording over training:
:mod:`sdslora.diagnostics.recorder`.

Memory bound: the probe batch's activations (inputs and output gradients of the hooked layers) plus, for one layer
at a time, G and at most three further matrices of the same m×n size (G̃, the optimizer's G̃, G*), one
min(m, n)² Gram matrix (for cos(G, G_r)) and small factor matrices. Other layers' m×n matrices are never alive at
the same time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import batch_loss
from ..control import find_adapted_model, unwrap_optimizer
from ..linalg import work_dtype
from ..methods.base import AdapterLayer, is_conv1d, layer_dims, supported_base
from ..model import AdaptedModel, _output_embedding_names
from ..utils import move_to
from .capture import capture_gradients, form_gradient
from .metrics import (
    condition_from_sv,
    cosine,
    effective_gradient,
    effective_rank,
    effective_rank_from_sv,
    optimizer_direction,
    orthonormal_basis,
    product_singular_values,
    singular_values,
    stable_rank_from_sv,
    tangent_projection,
    trainable_tensors,
    truncation_alignment_of,
)

SUMMARY_KEYS = (
    "cos_g_geff",
    "cos_geff_gstar",
    "cos_g_gstar",
    "cos_g_gr",
    "erank_grad_A",
    "erank_grad_B",
    "erank_scalefree_A",
    "erank_scalefree_B",
    "stable_rank_A",
    "stable_rank_B",
    "kappa_A",
    "kappa_B",
)
EXTRA_SUMMARY_KEYS = ("stable_rank_dW", "kappa_dW")


@dataclass
class Diagnostics:
    """Result of :func:`diagnose`: ``rows`` (one plain dict per layer), ``summary`` (means over layers of the
    finite values, plus ``loss``), ``events`` (the Controller's events so far, e.g. SDS-LoRA refreshes with
    ``jump_mean``, ``sim_A_mean``...), ``method`` and ``rank``."""

    rows: list[dict[str, Any]]
    summary: dict[str, float | None]
    events: list[dict[str, Any]] = field(default_factory=list)
    method: str = "full"
    rank: int = 0
    isotropic: bool = False  # every adapted layer's effective gradient ignores its factors' spectra (SDS-LoRA)


def _nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if not _nan(v)]
    return sum(vals) / len(vals) if vals else None


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` (Hugging Face style)."""
    return batch_loss(model, batch, "probe batch")




def _targets(
    model: nn.Module, adapted: AdaptedModel | None, layers: list[str] | None
) -> dict[str, nn.Module]:
    if adapted is not None and adapted._layers:
        found: dict[str, nn.Module] = dict(adapted.adapter_layers())
    else:
        inner = adapted.model if adapted is not None else model
        out_emb = _output_embedding_names(inner)
        found = {n: m for n, m in inner.named_modules() if n and supported_base(m) and n not in out_emb}
    if layers is not None:
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(
                f"diagnose(): no diagnosable layer named {missing[:3]}; available: {list(found)[:8]}"
                + (" ..." if len(found) > 8 else "")
            )
        found = {n: found[n] for n in layers}
    if not found:
        raise ValueError(
            "diagnose(): the model has no adapter layer and no nn.Linear / Conv1D layer to diagnose"
        )
    return found


def _subspaces(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(U, V, label): orthonormal bases of the column and row subspaces used for G*, or None (no factors)."""
    return layer.gradient_subspaces() if isinstance(layer, AdapterLayer) else None


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    return layer.factors() if isinstance(layer, AdapterLayer) else None


def _lowrank_sv(layer: nn.Module) -> torch.Tensor | None:
    export = getattr(layer, "export_lora", None)
    if export is None:
        return None
    try:
        up, down = export()
    except (NotImplementedError, RuntimeError, ValueError):
        return None
    s = product_singular_values(up, down.T)
    if not s.numel() or float(s.max()) <= 0:
        return s[:0]
    tol = 1e3 * torch.finfo(s.dtype).eps * float(s.max())
    return s[s > tol]


def _direction_lr(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float | None:
    """None (the group's learning rate) unless that rate is 0 — a schedule at its end (cosine and linear decay reach
    0 at the last step) or at the start of a warm-up — where the would-be step is zero and its alignment undefined:
    then the group's ``initial_lr`` (set by torch LR schedulers; else 1), so ``cos_g_geff_opt`` is the alignment of
    the optimizer's update direction (a cosine does not depend on a learning rate shared by the layer's tensors;
    ``initial_lr`` keeps the ratio between groups that schedules scale alike)."""
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None or float(group["lr"]) != 0.0:
        return None
    return float(group.get("initial_lr") or 1.0)


def _optimizer_effective_gradient(module: nn.Module, g: torch.Tensor, grads: dict[str, torch.Tensor | None],
                                  optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """G̃ for the optimizer's would-be step instead of the raw gradient (None if the optimizer is not supported)."""
    if isinstance(module, AdapterLayer):
        params = trainable_tensors(module)
        dirs = {}
        for n, gr in grads.items():
            if gr is None:
                continue
            dn = optimizer_direction(optimizer, params[n], gr, lr=_direction_lr(optimizer, params[n]))
            if dn is None:
                return None
            dirs[n] = dn
        return effective_gradient(module, dirs)
    w = module.weight
    gw = g.T if is_conv1d(module) else g
    dn = optimizer_direction(optimizer, w, gw.to(w.dtype), lr=_direction_lr(optimizer, w)) if w.requires_grad else None
    return None if dn is None else (dn.T if is_conv1d(module) else dn).to(g.dtype)


def _layer_row(
    name: str,
    module: nn.Module,
    g: torch.Tensor,
    grads: dict[str, torch.Tensor | None],
    optimizer: torch.optim.Optimizer | None,
    rank: int,
) -> dict[str, Any]:
    """All metrics of one layer given its G (the only m×n gradient alive)."""
    n_in, n_out = layer_dims(module.base_layer if isinstance(module, AdapterLayer) else module)
    row: dict[str, Any] = {"name": name, "out": n_out, "in": n_in}
    is_adapter = isinstance(module, AdapterLayer)
    k = module.r if is_adapter else rank
    row["r"] = k
    row["g_norm"] = float(g.norm())
    # effective gradient(s)
    if is_adapter:
        d = {n: gr for n, gr in grads.items() if gr is not None}
        geff = effective_gradient(module, d)
    else:
        geff = g
    row["cos_g_geff"] = cosine(g, geff)
    if optimizer is not None:
        geff_opt = _optimizer_effective_gradient(module, g, grads, optimizer)
        if geff_opt is not None:  # None: an optimizer whose step the probe cannot predict (AdamW, Adam, SGD can)
            row["cos_g_geff_opt"] = cosine(g, geff_opt)
            del geff_opt
    # subspace optimum and the unconstrained rank-k optimum
    sub = _subspaces(module)
    if sub is not None:
        u, v, label = sub
        row["subspaces"] = label
        gstar = tangent_projection(g, u, v)
        row["cos_geff_gstar"] = cosine(geff, gstar)
        row["cos_g_gstar"] = cosine(g, gstar)
        del gstar
    else:
        row["cos_geff_gstar"] = 1.0 if not is_adapter else float("nan")  # full FT: no subspace constraint
        row["cos_g_gstar"] = 1.0 if not is_adapter else float("nan")
    del geff
    row["cos_g_gr"] = truncation_alignment_of(g, k)
    # factor metrics
    fac = _factors(module) if is_adapter else None
    for key in (
        "erank_grad_A",
        "erank_grad_B",
        "erank_scalefree_A",
        "erank_scalefree_B",
        "stable_rank_A",
        "stable_rank_B",
        "kappa_A",
        "kappa_B",
    ):
        row[key] = float("nan")
    if fac is not None:
        a, b = fac
        if grads.get("lora_A") is not None:
            row["erank_grad_A"] = effective_rank(grads["lora_A"])
        if grads.get("lora_B") is not None:
            row["erank_grad_B"] = effective_rank(grads["lora_B"])
        if sub is not None and sub[2] == "B,A":  # already computed for G*
            ub, va = sub[0].to(g.dtype), sub[1].to(g.dtype)
        else:
            ub, va = orthonormal_basis(b).to(g.dtype), orthonormal_basis(a.T).to(g.dtype)
        if ub.shape[1]:
            row["erank_scalefree_A"] = effective_rank(ub.T @ g)
        if va.shape[1]:
            row["erank_scalefree_B"] = effective_rank(g @ va)
        sa, sb = singular_values(a), singular_values(b)
        row["stable_rank_A"], row["stable_rank_B"] = stable_rank_from_sv(sa), stable_rank_from_sv(sb)
        row["kappa_A"], row["kappa_B"] = condition_from_sv(sa), condition_from_sv(sb)
        row["erank_A"], row["erank_B"] = effective_rank_from_sv(sa), effective_rank_from_sv(sb)
    if is_adapter:
        s_dw = _lowrank_sv(module)
        if s_dw is not None:
            row["rank_dW"] = int(s_dw.numel())
            row["stable_rank_dW"] = stable_rank_from_sv(s_dw) if s_dw.numel() else float("nan")
            row["kappa_dW"] = condition_from_sv(s_dw) if s_dw.numel() else float("nan")
    return row


def _form_g(cap: Any, n_out: int, n_in: int, dtype: torch.dtype, base: nn.Module | None = None) -> torch.Tensor:
    return form_gradient(cap, n_out, n_in, dtype, base)


def diagnose(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    optimizer: Any = None,
    layers: list[str] | None = None,
    rank: int = 8,
) -> Diagnostics:
    """Gradient diagnostics of the attached method on one probe batch (see the module docstring for the metrics).

    Args:
        model: an :class:`~sdslora.AdaptedModel` (or a DDP / compile wrapper of one), or a plain model (then every
            ``nn.Linear`` / ``Conv1D`` except the output embedding is diagnosed as full fine-tuning).
        batch: the probe batch (a dict passed as ``model(**batch)`` whose output has ``.loss``, unless ``loss_fn``);
            moved to the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss``.
        optimizer: the training optimizer (or an accelerate wrapper); adds ``cos_g_geff_opt``, the alignment of G
            with the effective gradient along the optimizer's would-be step (AdamW / Adam / SGD; for other
            optimizers a warning says "SGD direction only" and the key is omitted).
        layers: restrict to these layer names (default: every adapted layer).
        rank: the truncation rank for ``cos_g_gr`` when a layer has no rank of its own (full fine-tuning; default 8).

    Returns:
        :class:`Diagnostics` with per-layer ``rows`` and ``summary`` (means over layers of the finite values of
        ``cos_g_geff``, ``cos_geff_gstar``, ``cos_g_gstar``, ``cos_g_gr``, ``erank_grad_A/B``,
        ``erank_scalefree_A/B``, ``stable_rank_A/B``, ``kappa_A/B``, ``stable_rank_dW``, ``kappa_dW``, plus ``loss``
        and, with an optimizer, ``cos_g_geff_opt``; ``None`` where no layer has a finite value).

    The model is left exactly as found: parameters, ``.grad`` (nothing is written to it), ``requires_grad`` flags
    and train/eval modes (the probe runs in eval mode, then every module's mode is restored), and all hooks are
    removed, also on error.

    Raises:
        ValueError: unknown layer names, no diagnosable layer, merged or disabled adapter layers, a loss that is not
            a finite scalar.
        TypeError: a batch that is not a dict without ``loss_fn``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose() takes a torch.nn.Module, got {type(model).__name__}")
    try:
        adapted: AdaptedModel | None = find_adapted_model(model)
    except TypeError:
        adapted = None
    opt = None if optimizer is None else unwrap_optimizer(optimizer)
    modules = _targets(model, adapted, layers)
    if any(getattr(m, "merged", False) or getattr(m, "disabled", False) for m in modules.values()):
        raise ValueError(
            "diagnose(): some adapter layers are merged or disabled, so the probe would not see the "
            "adapter's parameterisation; call model.unmerge() (or leave disable_adapter()) first"
        )
    method = adapted.method if adapted is not None else "full"
    loss_fn = loss_fn or default_loss
    first = next(iter(model.parameters()), None)
    if first is not None:
        batch = move_to(batch, first.device)

    param_index: list[tuple[str, str]] = []
    params: list[torch.Tensor] = []
    for name, module in modules.items():
        if isinstance(module, AdapterLayer):
            for pn, p in trainable_tensors(module).items():
                param_index.append((name, pn))
                params.append(p)

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        loss, caps, pgrads = capture_gradients(model, modules, lambda: loss_fn(model, batch), params)
    finally:
        for m, was in modes.items():
            m.training = was
    grads_by_layer: dict[str, dict[str, torch.Tensor | None]] = {n: {} for n in modules}
    for (ln, pn), gr in zip(param_index, pgrads):
        grads_by_layer[ln][pn] = gr
    del pgrads

    rows = []
    for name, module in modules.items():
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        n_in, n_out = layer_dims(base)
        w = base.weight
        dtype = work_dtype(w.dtype)
        with torch.no_grad():
            g = _form_g(caps[name], n_out, n_in, dtype, base)
            rows.append(_layer_row(name, module, g, grads_by_layer[name], opt, rank))
        del g
        caps[name] = None  # type: ignore[assignment]  # free this layer's activations
    opt_ok = opt is not None and all("cos_g_geff_opt" in r for r in rows)
    if opt is not None and not opt_ok:
        warnings.warn(
            f"diagnose(): {type(opt).__name__} is not supported for the optimizer-direction alignment "
            "(AdamW, Adam, SGD are): SGD direction only",
            stacklevel=2,
        )
    summary: dict[str, float | None] = {k: _mean([r.get(k) for r in rows]) for k in SUMMARY_KEYS}
    for k in EXTRA_SUMMARY_KEYS:
        summary[k] = _mean([r.get(k) for r in rows])
    summary["loss"] = loss
    if opt_ok:
        summary["cos_g_geff_opt"] = _mean([r.get("cos_g_geff_opt") for r in rows])
    ctl = adapted.controller if adapted is not None else None
    events = list(getattr(ctl, "events", []) or [])
    r_model = adapted.adapter_config.r if adapted is not None and adapted._layers else rank
    adapter_layers = list(adapted.adapter_layers().values()) if adapted is not None else []
    isotropic = bool(adapter_layers) and all(layer.isotropic_gradient() for layer in adapter_layers)
    return Diagnostics(rows=rows, summary=summary, events=events, method=method, rank=r_model, isotropic=isotropic)
