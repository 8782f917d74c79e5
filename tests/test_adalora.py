"""AdaLoRA ("adalora"): ΔW = s·B·diag(E)·A with the rank budget pruned by importance during training, and PEFT's
orthogonality penalty. Formulas in float64; PEFT's AdaLoRA from the same start, step for step (outputs, the
penalised loss, the pruning masks of its RankAllocator); export; the penalty's entry points; bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batch_for, output_of, tiny_llama
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn

import sdslora
from sdslora import AdapterConfig, attach

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 6, 6.0


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6)).double()


def test_delta_weight_forward_gradients_and_penalty_match_the_formulas():
    model = attach(_mlp(), AdapterConfig(method="adalora", r=R, alpha=3.0, adapter_dtype="base",
                                         options={"orth_reg_weight": 0.3}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_E.copy_(torch.randn(R, generator=g, dtype=torch.float64))
    pen = []
    for layer in model.adapter_layers().values():
        a, b, e, s = layer.lora_A, layer.lora_B, layer.lora_E, layer.scale
        want = s * b @ torch.diag(e) @ a
        assert torch.allclose(layer.delta_weight(), want, rtol=0, atol=1e-14)
        x = torch.randn(5, layer.in_features, dtype=torch.float64)
        assert torch.allclose(layer.adapter_forward(x), x @ want.T, rtol=0, atol=1e-13)
        c = torch.randn(5, layer.out_features, dtype=torch.float64)
        layer.zero_grad()
        (c * layer.adapter_forward(x)).sum().backward()
        gw = c.T @ x  # ∂L/∂ΔW; ∇E = s·diag(Bᵀ G Aᵀ), ∇A = s·diag(E) Bᵀ G, ∇B = s·G Aᵀ diag(E)
        assert torch.allclose(layer.lora_E.grad, s * torch.diagonal(b.T @ gw @ a.T), rtol=0, atol=1e-12)
        assert torch.allclose(layer.lora_A.grad, s * torch.diag(e) @ b.T @ gw, rtol=0, atol=1e-12)
        assert torch.allclose(layer.lora_B.grad, s * gw @ a.T @ torch.diag(e), rtol=0, atol=1e-12)
        eye = torch.eye(R, dtype=torch.float64)
        pen += [torch.linalg.norm(a @ a.T - eye), torch.linalg.norm(b.T @ b - eye)]
    assert torch.allclose(model.regularization_loss(), 0.3 * torch.stack(pen).mean(), rtol=1e-12)


def _pair(options: dict, total: int):
    """Our AdaLoRA and PEFT's on copies of one tiny Llama, PEFT's A, B, E copied from ours (E made non-zero)."""
    base = tiny_llama()
    peft_base = copy.deepcopy(base)
    cfg = AdapterConfig(method="adalora", r=R, alpha=ALPHA, scaling="standard", target_modules=TARGETS,
                        options=options)
    ours = attach(base, cfg)
    peft = get_peft_model(peft_base, AdaLoraConfig(
        init_r=R, target_r=options["target_r"], lora_alpha=ALPHA, target_modules=TARGETS, total_step=total,
        tinit=options["tinit"], tfinal=options["tfinal"], deltaT=options["deltaT"], beta1=0.85, beta2=0.85,
        orth_reg_weight=options["orth_reg_weight"], lora_dropout=0.0,
    ))
    inner = peft.base_model.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            layer.lora_E.copy_(torch.randn(R, generator=g) * 0.5)
            pl = inner.get_submodule(name)
            pl.lora_A["default"].copy_(layer.lora_A)
            pl.lora_B["default"].copy_(layer.lora_B)
            pl.lora_E["default"].copy_(layer.lora_E[:, None])
    return ours, peft


def test_same_training_and_pruning_as_peft_step_for_step():
    options = {"target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "orth_reg_weight": 0.1}
    total = 12
    ours, peft = _pair(options, total)
    batch = batch_for(tiny_llama())
    batch["labels"] = batch["input_ids"]
    opt_o = torch.optim.SGD(ours.trainable_parameters(), lr=0.5)
    opt_p = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    ctl = sdslora.Controller(ours, opt_o, total_steps=total)
    ours.train()
    peft.train()
    inner = peft.base_model.model
    pruned_some = False
    for t in range(1, total + 1):
        lo, lp = ours(**batch).loss, peft.base_model(**batch).loss  # both with the orthogonality penalty
        assert abs(float(lo) - float(lp)) <= 1e-5 * abs(float(lp)), t
        lo.backward()
        lp.backward()
        opt_o.step()
        opt_p.step()
        ctl.step()
        peft.base_model.update_and_allocate(t)
        opt_o.zero_grad()
        opt_p.zero_grad()
        for name, layer in ours.adapter_layers().items():
            pe = inner.get_submodule(name).lora_E["default"].detach().flatten()
            assert torch.equal(layer.lora_E.detach() == 0, pe == 0), (t, name)  # the same triplets pruned
            assert torch.allclose(layer.lora_E.detach(), pe, rtol=1e-4, atol=1e-6), (t, name)
            pruned_some |= bool((pe == 0).any())
    assert pruned_some
    kept = sum(int((layer.lora_E != 0).sum()) for layer in ours.adapter_layers().values())
    assert kept <= options["target_r"] * len(ours.adapter_layers())  # the final budget
    assert [e["event"] for e in ctl.events].count("prune") >= 3


def test_export_keeps_only_the_kept_triplets_and_peft_loads_it(tmp_path):
    options = {"target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "orth_reg_weight": 0.1}
    ours, _ = _pair(options, 6)
    batch = batch_for(tiny_llama())
    opt = torch.optim.AdamW(ours.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(ours, opt, total_steps=6)
    for _ in range(6):
        output_of(ours, batch).float().pow(2).mean().backward()
        opt.step()
        ctl.step()
        opt.zero_grad()
    want = output_of(ours.eval(), batch)
    ours.export_peft(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert torch.allclose(output_of(loaded, batch), want, rtol=1e-5, atol=1e-5)
    ranks = {name: int((layer.lora_E != 0).sum()) for name, layer in ours.adapter_layers().items()}
    assert sum(ranks.values()) <= 2 * len(ranks) and min(ranks.values()) >= 0


def test_penalty_only_while_training_and_not_for_other_methods():
    batch = batch_for(tiny_llama())
    batch["labels"] = batch["input_ids"]
    model = attach(tiny_llama(), AdapterConfig(method="adalora", r=R, target_modules=TARGETS))
    model.train()
    with torch.no_grad():
        plain = model.model(**batch).loss
    assert torch.allclose(model(**batch).loss.detach(), plain + model.regularization_loss().detach())
    model.eval()
    assert torch.equal(model(**batch).loss, model.model(**batch).loss)
    lora = attach(tiny_llama(), AdapterConfig(method="lora", r=R))
    assert lora.regularization_loss() is None and not lora.has_regularization()


def test_controller_needs_the_optimizer_and_total_steps():
    model = attach(tiny_llama(), AdapterConfig(method="adalora", r=R, target_modules=TARGETS))
    with pytest.raises(ValueError, match="reads the gradients of every optimizer step: pass the optimizer"):
        sdslora.Controller(model, None, total_steps=10)
    opt = torch.optim.AdamW(model.trainable_parameters())
    with pytest.raises(ValueError, match="needs total_steps"):
        sdslora.Controller(model, opt)
    short = attach(tiny_llama(), AdapterConfig(method="adalora", r=R, options={"tinit": 5, "tfinal": 5}))
    with pytest.raises(ValueError, match="leave no pruning phase"):
        sdslora.Controller(short, torch.optim.AdamW(short.trainable_parameters()), total_steps=10)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"target_r": 0}, "target_r must be an int >= 1"),
        ({"deltaT": 0}, "deltaT must be an int >= 1"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight must be a number >= 0"),
        ({"tinit": -1}, "tinit must be an int >= 0"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attach(_mlp(), AdapterConfig(method="adalora", r=R, options=options))
