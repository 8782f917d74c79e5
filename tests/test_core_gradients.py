"""Gradient identities of SPEC.md §1.2 in float64, through autograd.

G is the gradient of the same loss w.r.t. a dense weight W = W0 + ΔW (a reference model in which each adapted layer
is a plain layer holding W as a leaf tensor). Then LoRA: ∇_A = s·BᵀG, ∇_B = s·G·Aᵀ; SDS: ∇_A = s·Q_BᵀG,
∇_B = s·G·Q_A; effective gradients G̃ = s(B∇_A + ∇_B A) (LoRA) = s²(G V_A Σ_A² V_Aᵀ + U_B Σ_B² U_Bᵀ G) and
G̃ = s(Q_B∇_A + ∇_B Q_Aᵀ) (SDS) = s²(G Q_A Q_Aᵀ + Q_B Q_Bᵀ G).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sdslora

RTOL = 1e-10


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Linear -> tanh -> Conv1D (GPT-2 layout, weight [in, out]) -> tanh -> Linear
    return nn.Sequential(nn.Linear(9, 12), nn.Tanh(), Conv1D(10, 12), nn.Tanh(), nn.Linear(10, 7)).double()


def _loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((model(x) - target) ** 2).sum() + model(x).pow(3).mean()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


def _adapted(method: str, scaling: str = "rslora", decoupled: bool = True):
    base = _mlp()
    reference = copy.deepcopy(base)
    cfg = sdslora.AdapterConfig(method=method, r=3, alpha=4.0, scaling=scaling, adapter_dtype="base")
    model = sdslora.attach(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    if method in ("sds", "orthogonal") and decoupled:
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.0)
        ctl = sdslora.Controller(model, opt, total_steps=100)
        ctl.step(t=10)  # re-parameterisation: bases from the SVD of B·A
        with torch.no_grad():  # move A, B off the bases (as training does between refreshes)
            for layer in model.adapter_layers().values():
                layer.lora_A.add_(0.3 * torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64))
                layer.lora_B.add_(0.3 * torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    return model, reference


def _full_gradients(model, reference, x, target) -> dict[str, torch.Tensor]:
    """G = ∂L/∂W (nn.Linear layout [out, in]) at W = W0 + ΔW for every adapted layer."""
    ref = copy.deepcopy(reference)
    weights = {}
    with torch.no_grad():
        for name, layer in model.adapter_layers().items():
            mod = ref.get_submodule(name)
            delta = layer.delta_weight()
            mod.weight.add_(delta.T if layer.fan_in_fan_out else delta)
            weights[name] = (mod.weight, layer.fan_in_fan_out)
    _loss(ref, x, target).backward()
    return {n: (w.grad.T if f else w.grad) for n, (w, f) in weights.items()}


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(5, 4, 9, generator=g, dtype=torch.float64), torch.randn(
        5, 4, 7, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("scaling", ["rslora", "standard"])
def test_lora_gradients_and_effective_gradient(scaling):
    model, reference = _adapted("lora", scaling)
    x, target = _data()
    G = _full_gradients(model, reference, x, target)
    _loss(model, x, target).backward()
    for name, layer in model.adapter_layers().items():
        s, A, B = layer.scale, layer.lora_A.detach(), layer.lora_B.detach()
        assert s == pytest.approx(4.0 / (3**0.5 if scaling == "rslora" else 3))
        gA, gB = layer.lora_A.grad, layer.lora_B.grad
        _close(gA, s * B.T @ G[name])
        _close(gB, s * G[name] @ A.T)
        # effective gradient = first-order change of ΔW along (∇_A, ∇_B), via a JVP of delta_weight
        _, tangent = torch.func.jvp(lambda a, b, layer=layer: _delta_of(layer, a, b), (A, B), (gA, gB))
        _close(tangent, s * (B @ gA + gB @ A))
        _, sa, vah = torch.linalg.svd(A, full_matrices=False)
        ub, sb, _ = torch.linalg.svd(B, full_matrices=False)
        expected = s**2 * (
            G[name] @ vah.T @ torch.diag(sa**2) @ vah + ub @ torch.diag(sb**2) @ ub.T @ G[name]
        )
        _close(tangent, expected)


@pytest.mark.parametrize("scaling", ["rslora", "standard"])
def test_sds_gradients_and_isotropic_effective_gradient(scaling):
    model, reference = _adapted("sds", scaling)
    x, target = _data()
    G = _full_gradients(model, reference, x, target)
    _loss(model, x, target).backward()
    for name, layer in model.adapter_layers().items():
        assert layer.decoupled
        s = layer.scale
        QA, QB = layer.lora_QA.T, layer.lora_QB  # Q_A [in, r], Q_B [out, r]
        eye = torch.eye(layer.r, dtype=torch.float64)
        _close(QA.T @ QA, eye, 1e-12)
        _close(QB.T @ QB, eye, 1e-12)
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        gA, gB = layer.lora_A.grad, layer.lora_B.grad
        _close(gA, s * QB.T @ G[name])
        _close(gB, s * G[name] @ QA)
        assert layer.lora_QA.grad is None and not layer.lora_QA.requires_grad
        # SDS's gradient is not LoRA's (the test would not be telling otherwise)
        assert float((gA - s * B.T @ G[name]).abs().max()) > 1e-3 * float(gA.abs().max())
        # ΔW as a function of (A, B) with the bases constant: the layer's own delta_weight
        _, tangent = torch.func.jvp(lambda a, b, layer=layer: _delta_of(layer, a, b), (A, B), (gA, gB))
        _close(tangent, s * (QB @ gA + gB @ QA.T))
        _close(tangent, s**2 * (G[name] @ QA @ QA.T + QB @ QB.T @ G[name]))  # isotropic projection
        _close(layer.delta_weight().detach(), s * (QB @ A + B @ QA.T))


class _Delta(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return self.layer.delta_weight()


def _delta_of(layer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The layer's own delta_weight() evaluated at A = a, B = b (bases and everything else as they are)."""
    return torch.func.functional_call(_Delta(layer), {"layer.lora_A": a, "layer.lora_B": b}, ())


def test_sds_warmup_phase_is_plain_lora():
    """Before the re-parameterisation SDS is LoRA: same gradients ∇_A = s·BᵀG, ∇_B = s·G·Aᵀ."""
    model, reference = _adapted("sds", decoupled=False)
    x, target = _data()
    G = _full_gradients(model, reference, x, target)
    _loss(model, x, target).backward()
    for name, layer in model.adapter_layers().items():
        assert not layer.decoupled
        s, A, B = layer.scale, layer.lora_A.detach(), layer.lora_B.detach()
        _close(layer.lora_A.grad, s * B.T @ G[name])
        _close(layer.lora_B.grad, s * G[name] @ A.T)


def test_orthogonal_gradients():
    """Orthogonal ablation: ΔW = s(B A + O_B O_A) with frozen offsets, so ∇_A = s·BᵀG, ∇_B = s·G·Aᵀ."""
    model, reference = _adapted("orthogonal")
    x, target = _data()
    G = _full_gradients(model, reference, x, target)
    _loss(model, x, target).backward()
    for name, layer in model.adapter_layers().items():
        s, A, B = layer.scale, layer.lora_A.detach(), layer.lora_B.detach()
        _close(layer.lora_A.grad, s * B.T @ G[name])
        _close(layer.lora_B.grad, s * G[name] @ A.T)
        _close(layer.delta_weight().detach(), s * (B @ A + layer.lora_offset_B @ layer.lora_offset_A))
