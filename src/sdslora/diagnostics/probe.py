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

Memory bound: the probe batch's activations (inputs and output gradients of the hooked layers) plus, for one layer
at a time, G and at most three further matrices of the same m×n size (G̃, the optimizer's G̃, G*), one
min(m, n)² Gram matrix (for cos(G, G_r)) and small factor matrices. Other layers' m×n matrices are never alive at
the same time.

Verdict thresholds (:func:`verdict`, ``sdslora diagnose``): factors are *well conditioned* if the median over layers
of max(κ_A, κ_B) is < 3, *moderately* if < 10, *badly* otherwise; the effective gradient rank (mean of erank ∇_A and
∇_B) is *low* when below r/2; alignment cos(G, G̃) is *poor* below 0.5, *fair* below 0.8, *good* otherwise.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batches import batch_loss
from ..control import find_adapted_model, unwrap_optimizer
from ..methods.base import AdapterLayer, is_conv1d, layer_dims, supported_base
from ..model import AdaptedModel, _output_embedding_names
from ..utils import json_safe, move_to
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
    qa, qb = getattr(layer, "lora_QA", None), getattr(layer, "lora_QB", None)
    if getattr(layer, "decoupled", False) and isinstance(qa, torch.Tensor) and isinstance(qb, torch.Tensor):
        return qb.detach(), qa.detach().T, "Q_B,Q_A"  # lora_QA stores Q_Aᵀ [r, in]
    fac = _factors(layer)
    if fac is None:
        return None
    a, b = fac
    return orthonormal_basis(b), orthonormal_basis(a.T), "B,A"


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    a, b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
        return None
    if b.shape[1] != a.shape[0]:
        return None
    return a.detach(), b.detach()


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


def _layer_row(
    name: str,
    module: nn.Module,
    g: torch.Tensor,
    grads: dict[str, torch.Tensor | None],
    optimizer: torch.optim.Optimizer | None,
    rank: int,
    opt_ok: list[bool],
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
        geff_opt = None
        if is_adapter:
            params = trainable_tensors(module)
            dirs = {}
            for n, gr in grads.items():
                if gr is None:
                    continue
                dn = optimizer_direction(optimizer, params[n], gr, lr=_direction_lr(optimizer, params[n]))
                if dn is None:
                    break
                dirs[n] = dn
            else:
                geff_opt = effective_gradient(module, dirs)
        else:
            w = module.weight
            gw = g.T if is_conv1d(module) else g
            dn = (optimizer_direction(optimizer, w, gw.to(w.dtype), lr=_direction_lr(optimizer, w))
                  if w.requires_grad else None)
            if dn is not None:
                geff_opt = (dn.T if is_conv1d(module) else dn).to(g.dtype)
        if geff_opt is None:
            opt_ok[0] = False
        else:
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
    opt_ok = [True]
    for name, module in modules.items():
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        n_in, n_out = layer_dims(base)
        w = base.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            g = _form_g(caps[name], n_out, n_in, dtype, base)
            rows.append(_layer_row(name, module, g, grads_by_layer[name], opt, rank, opt_ok))
        del g
        caps[name] = None  # type: ignore[assignment]  # free this layer's activations
    if opt is not None and not opt_ok[0]:
        warnings.warn(
            f"diagnose(): {type(opt).__name__} is not supported for the optimizer-direction alignment "
            "(AdamW, Adam, SGD are): SGD direction only",
            stacklevel=2,
        )
    summary: dict[str, float | None] = {k: _mean([r.get(k) for r in rows]) for k in SUMMARY_KEYS}
    for k in EXTRA_SUMMARY_KEYS:
        summary[k] = _mean([r.get(k) for r in rows])
    summary["loss"] = loss
    if opt is not None and opt_ok[0]:
        summary["cos_g_geff_opt"] = _mean([r.get("cos_g_geff_opt") for r in rows])
    ctl = getattr(adapted, "_controller", None) if adapted is not None else None
    events = list(getattr(ctl, "events", []) or [])
    r_model = adapted.adapter_config.r if adapted is not None and adapted._layers else rank
    return Diagnostics(rows=rows, summary=summary, events=events, method=method, rank=r_model)


# ---- reporting ------------------------------------------------------------------------------------------------
def verdict(diag: Diagnostics) -> str:
    """A plain-words reading of :class:`Diagnostics` (thresholds in the module docstring)."""
    rows = diag.rows
    parts = []
    kappas = [
        max(r["kappa_A"], r["kappa_B"])
        for r in rows
        if not _nan(r.get("kappa_A")) and not _nan(r.get("kappa_B"))
    ]
    bad = False
    if kappas:
        med = statistics.median(kappas)
        word = "well" if med < 3 else ("moderately" if med < 10 else "badly")
        if diag.method == "sds":  # SDS-LoRA's gradients do not depend on the factors' singular values
            parts.append(
                f"factors are {word} conditioned (median κ {med:.3g}; this does not enter SDS-LoRA's "
                "gradients)"
            )
        else:
            bad = med >= 10
            parts.append(f"factors are {word} conditioned (median κ {med:.3g})")
    er = [v for r in rows for v in (r.get("erank_grad_A"), r.get("erank_grad_B")) if not _nan(v)]
    if er:
        mean_er = sum(er) / len(er)
        low = mean_er < diag.rank / 2
        sf = [
            v for r in rows for v in (r.get("erank_scalefree_A"), r.get("erank_scalefree_B")) if not _nan(v)
        ]
        extra = (
            f", {sum(sf) / len(sf):.2g} without the factors' scaling" if sf and diag.method != "sds" else ""
        )
        parts.append(
            f"effective gradient rank {mean_er:.2g} of {diag.rank}" + (" (low)" if low else "") + extra
        )
        bad = bad or low
    cg = diag.summary.get("cos_g_geff")
    if cg is not None:
        word = "poor" if cg < 0.5 else ("fair" if cg < 0.8 else "good")
        parts.append(f"alignment cos(G, G̃) {cg:.2f} ({word})")
        bad = bad or cg < 0.5
    cs = diag.summary.get("cos_geff_gstar")
    if cs is not None and diag.method != "full":
        parts.append(f"use of the current subspaces cos(G̃, G*) {cs:.2f}")
    text = "; ".join(parts) if parts else "no metric could be computed"
    if diag.method not in ("sds", "full") and kappas and bad:  # a factored (LoRA-family) method
        text += " — SDS-LoRA removes this scaling (its effective gradient is isotropic within the subspaces)"
    elif diag.method == "sds" and cs is not None and cs > 0.9:
        text += " — the effective gradient is isotropic within the subspaces, as SDS-LoRA intends"
    return text


class DiagnosticsRecorder:
    """Runs :func:`diagnose` every ``every`` optimizer steps in a plain training loop and writes JSONL.

        rec = DiagnosticsRecorder(model, probe_batch, every=50, path="diag.jsonl", optimizer=opt)
        for step in range(1, T + 1):
            ...; opt.step(); ctl.step(); rec.maybe_record(step)

    Each probe appends one line ``{"step", "summary", "layers", "events"}`` (``events``: the Controller's events
    since the previous probe, e.g. SDS-LoRA refreshes with ``jump_mean`` and ``sim_A_mean``; non-finite numbers are
    written as ``null``) and keeps the record in ``.records``. ``maybe_record`` costs one modulo when
    ``step % every != 0``. ``path=None`` keeps records in memory only.

    Raises ``ValueError`` for ``every < 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch: Any,
        every: int = 50,
        path: str | Path | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        optimizer: Any = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.model = model
        self.probe_batch = probe_batch
        self.every = every
        self.path = None if path is None else Path(path)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.records: list[dict[str, Any]] = []
        self._events_seen = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _new_events(self) -> list[dict[str, Any]]:
        try:
            ctl = find_adapted_model(self.model)._controller
        except TypeError:
            return []
        events = list(getattr(ctl, "events", []) or [])
        if len(events) < self._events_seen:  # a new Controller: start over
            self._events_seen = 0
        new = events[self._events_seen :]
        self._events_seen = len(events)
        return new

    def record(self, step: int) -> dict[str, Any]:
        """Diagnose now and write the record (regardless of ``every``)."""
        diag = diagnose(self.model, self.probe_batch, loss_fn=self.loss_fn, optimizer=self.optimizer)
        rec = json_safe(
            {"step": int(step), "summary": diag.summary, "layers": diag.rows, "events": self._new_events()}
        )
        self.records.append(rec)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        return rec

    def maybe_record(self, step: int) -> dict[str, Any] | None:
        """Record if ``step % every == 0`` (and step > 0); returns the record or ``None``."""
        if step % self.every or step <= 0:
            return None
        return self.record(step)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a recorder / callback JSONL file (ValueError naming the line for a malformed one)."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{i} is not valid JSON ({e}); is this a diagnostics history file?"
            ) from e
        if not isinstance(rec, dict) or "step" not in rec or "summary" not in rec:
            raise ValueError(f"{path}:{i} is not a diagnostics record (needs 'step' and 'summary')")
        out.append(rec)
    return out
