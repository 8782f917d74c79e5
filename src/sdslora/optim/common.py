"""Shared machinery of the optimizer-side methods: explicit (A, B) pairing, one AdamW update, r×r linear algebra.

Every optimizer here is a ``torch.optim.Optimizer`` whose param groups are

* one group per adapter layer, ``{"params": [lora_A, lora_B], "role": "pair", "layer": name, "scale": s, ...}``,
  taken from :meth:`AdaptedModel.layer_parameter_groups` (explicit pairing, never guessed from shapes), and
* one group ``{"role": "other"}`` with every other trainable parameter (``modules_to_save`` such as a classifier
  head, or extra tensors of an adapter layer), updated by plain AdamW (same formula as ``torch.optim.AdamW``).

Optimizer state is created lazily on the first step of each parameter, so a state popped by the Controller
(``optimizer.state.pop(p)``) simply re-initialises, and ``state_dict()`` / ``load_state_dict()`` are the stock ones.
Only ``.grad`` is read at ``step()`` (never modified), so gradient accumulation works as with any optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..methods.lora import LoRALayer

Group = dict[str, Any]  # one param group of a paired optimizer


@dataclass
class LayerPair:
    """The two factors of one LoRA-style adapter layer (ΔW = s·B·A)."""

    name: str
    layer: nn.Module
    A: nn.Parameter  # [r, in]
    B: nn.Parameter  # [out, r]
    scale: float


def adapted_model_of(model: nn.Module) -> Any:
    """The :class:`~sdslora.model.AdaptedModel` inside ``model`` (or a DDP / compile wrapper), else a TypeError."""
    from ..control import find_adapted_model

    return find_adapted_model(model)


def split_pairs(
    model: nn.Module, method: str, layer_types: tuple[type, ...] = (LoRALayer,)
) -> tuple[list[LayerPair], list[nn.Parameter]]:
    """(LoRA factor pairs, all other trainable parameters) of an adapted model, in a deterministic order.

    ``layer_types``: the adapter-layer classes accepted (default: LoRA and its subclasses, ΔW = s·B·A); any other
    trainable tensor of an accepted layer (e.g. DoRA's magnitude) goes with the other parameters.

    Raises ``TypeError`` if ``model`` is not an adapted model and ``ValueError`` (naming ``method``) if its layers are
    not LoRA-style layers with trainable ``lora_A`` [r, in] and ``lora_B`` [out, r] and ΔW = s·B·A: full fine-tuning,
    LoRA-XS / LoRA-SB (only R trains) and SDS-LoRA / orthogonal (ΔW = s(Q_B A + B Q_Aᵀ) after the warm-up, where the
    LoRA preconditioners do not apply).
    """
    adapted = adapted_model_of(model)
    groups = adapted.layer_parameter_groups()
    kind = adapted.adapter_config.method
    if not groups:
        raise ValueError(
            f"optimizer {method!r} needs LoRA layers (trainable lora_A, lora_B with ΔW = s·B·A), but method {kind!r} "
            "attached no adapter layers; use build_optimizer(model, 'adamw') for it"
        )
    pairs: list[LayerPair] = []
    paired: set[int] = set()
    for g in groups:
        layer, params = g["layer"], g["params"]
        A, B = params.get("lora_A"), params.get("lora_B")
        ok = (
            isinstance(layer, layer_types)
            and A is not None
            and B is not None
            and A.requires_grad
            and B.requires_grad
            and A.dim() == 2
            and B.dim() == 2
            and A.shape[0] == B.shape[1]
        )
        if not ok:
            raise ValueError(
                f"optimizer {method!r} needs LoRA-style layers with trainable factors lora_A [r, in] and lora_B "
                f"[out, r] and ΔW = s·B·A; layer {g['name']!r} of method {kind!r} ({type(layer).__name__}) is not "
                f"one (params: {sorted(params)}). Use a LoRA-family method (lora, ...) or build_optimizer(model, "
                "'adamw')"
            )
        pairs.append(LayerPair(g["name"], layer, A, B, float(layer.scale)))
        paired.update((id(A), id(B)))
    others = [p for p in adapted.trainable_parameters() if id(p) not in paired]
    return pairs, others


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype for computing with ``tensors``: float32 for low-precision tensors, float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def damped_solve(m: torch.Tensor, x: torch.Tensor, delta: float) -> torch.Tensor:
    """(m + δI)⁻¹ x for a symmetric PSD r×r ``m``; falls back to x (identity preconditioner) if the solve fails."""
    sol, info = torch.linalg.solve_ex(m + delta * _eye_like(m), x)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        return x
    return sol


def precondition_A(B: Tensor, grad_A: Tensor, delta: float) -> Tensor:
    """(BᵀB + δI)⁻¹ ∇_A, the regularised left preconditioner of A's gradient by the Gram matrix of B (identity if
    the solve fails); computed in float32 (float64 stays float64)."""
    b = B.detach().to(compute_dtype(B, grad_A))
    return damped_solve(b.T @ b, grad_A.to(b.dtype), delta)


def precondition_B(A: Tensor, grad_B: Tensor, delta: float) -> Tensor:
    """∇_B (AAᵀ + δI)⁻¹, the regularised right preconditioner of B's gradient by the Gram matrix of A (identity if
    the solve fails); computed in float32 (float64 stays float64)."""
    a = A.detach().to(compute_dtype(A, grad_B))
    return damped_solve(a @ a.T, grad_B.to(a.dtype).T, delta).T


def damped_pinv(m: torch.Tensor, delta: float) -> torch.Tensor:
    """pinv(m + δI) of a symmetric r×r matrix."""
    return torch.linalg.pinv(m + delta * _eye_like(m), hermitian=True)


def solve_sylvester_sym(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric PSD r×r P, Q, through eigendecompositions P = UΛUᵀ, Q = VMVᵀ:
    X = U [(UᵀCV)_ij / (λ_i + μ_j)] Vᵀ (terms with λ_i + μ_j ≈ 0 are set to 0, the minimum-norm solution)."""
    lam, u = torch.linalg.eigh(p)
    mu, v = torch.linalg.eigh(q)
    denom = lam[:, None] + mu[None, :]
    tiny = torch.finfo(denom.dtype).eps * denom.abs().max().clamp_min(torch.finfo(denom.dtype).tiny)
    ct = u.T @ c @ v
    safe = torch.where(denom.abs() > tiny, denom, torch.ones_like(denom))
    return u @ torch.where(denom.abs() > tiny, ct / safe, torch.zeros_like(ct)) @ v.T


def adamw_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    *,
    correct_bias: bool = True,
    transport: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """One AdamW step of ``p`` along the (possibly preconditioned) gradient ``grad``, like ``torch.optim.AdamW``:
    p ← p(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²; p ← p − lr/c1 · m / (√(v/c2) + ε), with
    c1 = 1−β1ᵗ, c2 = 1−β2ᵗ (c1 = c2 = 1 if not ``correct_bias``). ``transport`` maps the stored first moment into
    the current coordinates before the β1 blend (AltLoRA). State is created lazily (``step``, ``exp_avg``,
    ``exp_avg_sq``)."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    state["step"] += 1
    t = state["step"]
    g = grad.to(p.dtype)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if wd:
        p.mul_(1.0 - lr * wd)
    if transport is not None and t > 1:
        m.copy_(transport(m.to(compute_dtype(m))).to(m.dtype))
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if correct_bias:
        c1 = 1.0 - beta1**t
        c2 = 1.0 - beta2**t
        denom = (v.sqrt() / (c2**0.5)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / c1)
    else:
        p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (isinstance(lr, (int, float)) or torch.is_tensor(lr)) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class PairedAdamW(torch.optim.Optimizer):
    """Base class: per-layer (A, B) groups updated by :meth:`pair_step`, other parameters by plain AdamW.

    Subclasses set ``method`` and implement ``pair_step(group, A, B, grad_A, grad_B)``; the gradient of a factor
    that received none in this step (both factors of a LoRA layer normally do) is taken as zero, and a layer with no
    gradient at all is skipped. Closures are supported as in torch (evaluated before the update).
    """

    method: ClassVar[str] = ""

    def __init__(
        self,
        pairs: Iterable[LayerPair],
        others: Iterable[nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        **method_defaults: Any,
    ) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        groups: list[dict[str, Any]] = [
            {"params": [pr.A, pr.B], "role": "pair", "layer": pr.name, "scale": pr.scale} for pr in pairs
        ]
        others = list(others)
        if others:
            groups.append({"params": others, "role": "other"})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **method_defaults)
        super().__init__(groups, defaults)

    def pair_step(self, group: Group, A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("role") == "pair":
                A, B = group["params"]
                if A.grad is None and B.grad is None:
                    continue
                for p in (A, B):
                    if p.grad is not None and p.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                cd = compute_dtype(A)
                gA = torch.zeros_like(A, dtype=cd) if A.grad is None else A.grad.to(cd)
                gB = torch.zeros_like(B, dtype=cd) if B.grad is None else B.grad.to(cd)
                self.pair_step(group, A, B, gA, gB)
            else:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                    adamw_update(p, p.grad, self.state[p], group)
        return loss


class LoRAPairedAdamW(PairedAdamW):
    """A :class:`PairedAdamW` built from an adapted model, with the method options of ``options_cls``.

    Subclasses set ``method``, ``options_cls`` (a dataclass that validates the method options and holds their
    defaults) and ``pair_step``; the options land in every param group under their field names.

    Args:
        model: an adapted model whose layers are LoRA-style (trainable lora_A, lora_B, ΔW = s·B·A).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (2e-4, (0.9, 0.999), 1e-8, 0.0; decoupled weight
            decay).
        option_args, option_kwargs: the method options, by position (in ``options_cls`` field order) or by
            keyword, with the defaults of ``options_cls``.

    Raises ``ValueError`` for a model without LoRA-style layers (full fine-tuning, LoRA-XS, SDS-LoRA; see
    :func:`split_pairs`), bad hyper-parameters or bad options; ``TypeError`` for a model that is not an adapted
    model, an unknown option or an option of the wrong type.
    """

    options_cls: ClassVar[type]

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *option_args: Any,
        **option_kwargs: Any,
    ) -> None:
        opts = dataclasses.asdict(self.options_cls(*option_args, **option_kwargs))
        pairs, others = split_pairs(model, self.method)
        super().__init__(pairs, others, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **opts)
