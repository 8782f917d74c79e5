"""LoRA-GA (method "lora_ga"): against PEFT 0.21's init_lora_weights="lora_ga" fed the same gradient, against the
authors' formulas (SPEC.md §4.1) restated here, output preservation, export to PEFT and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batch_for, output_of, tiny_llama
from torch import nn

import sdslora
from sdslora import AdapterConfig, attach
from sdslora.init import estimate_gradients

R = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def seeded_svd(monkeypatch):
    """torch.svd_lowrank is randomised: re-seed before every call so that PEFT and we draw the same sketch."""
    original = torch.svd_lowrank

    def svd(*args, **kwargs):
        torch.manual_seed(1234)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", svd)


def _batches():
    return [batch_for("llama", seed=s) for s in range(2)]


def _names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]


def _train(adapted, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=lr)
    for s in range(steps):
        adapted(**batch_for("llama", seed=10 + s)).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "direction,scale", [("ArB2r", "stable"), ("A2rBr", "unit"), ("ArBr", "gd"), ("ArB2r", "weightS")]
)
def test_matches_peft_given_the_same_gradient(seeded_svd, direction, scale):
    from peft import LoraConfig, LoraGAConfig, get_peft_model

    original = tiny_llama()
    batches = _batches()
    grads = estimate_gradients(copy.deepcopy(original), _names(original), batches)

    peft_base = copy.deepcopy(original)
    for n, g in grads.items():
        peft_base.get_submodule(n)._peft_loraga_grad = g.clone()  # what peft.preprocess_loraga attaches
    peft_scale = {"gd": "gd_scale", "weightS": "weight_svd"}.get(scale, scale)
    pcfg = LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=direction, scale=peft_scale, stable_gamma=16),
    )
    peft_model = get_peft_model(peft_base, pcfg)

    ours = copy.deepcopy(original)
    cfg = AdapterConfig(
        method="lora_ga",
        r=R,
        alpha=8,
        scaling="standard",
        target_modules=TARGETS,
        options={"direction": direction, "scale": scale, "variant": "peft"},
    )
    adapted = attach(ours, cfg, init_data=batches)
    for n, layer in adapted.adapter_layers().items():
        p = peft_model.base_model.model.get_submodule(n)
        torch.testing.assert_close(layer.lora_A, p.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B, p.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_weight, p.base_layer.weight, rtol=1e-5, atol=1e-6)
    b = batch_for("llama", seed=5)
    torch.testing.assert_close(output_of(adapted, b), output_of(peft_model, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "weightS")])
def test_authors_formulas_float64(seeded_svd, direction, scale):
    """Default variant = the authors' lora_ga_init (SPEC.md §4.1), restated here in float64."""
    original = tiny_llama().double()
    batches = _batches()
    names = _names(original)
    grads = estimate_gradients(copy.deepcopy(original), names, batches)
    cfg = AdapterConfig(
        method="lora_ga",
        r=R,
        alpha=4,
        scaling="rslora",
        target_modules=TARGETS,
        adapter_dtype="base",
        options={"direction": direction, "scale": scale, "stable_gamma": 9},
    )
    model = copy.deepcopy(original)
    adapted = attach(model, cfg, init_data=batches)
    s = cfg.scale
    for n in names:
        g, w0 = grads[n], original.get_submodule(n).weight.detach()
        m = g.shape[0]
        u, sv, v = torch.svd_lowrank(g, q=min(4 * R, *g.shape), niter=4)
        if direction == "ArB2r":
            a0, b0 = v[:, :R].T, u[:, R : 2 * R]
        elif direction == "A2rBr":
            a0, b0 = v[:, R : 2 * R].T, u[:, :R]
        else:
            a0, b0 = v[:, 1 : 2 * R : 2].T, u[:, 0 : 2 * R : 2]
        if scale == "stable":
            f = m**0.25 / 9**0.5
        elif scale == "gd":
            f = 1 / s
        else:
            f = torch.sqrt(torch.svd_lowrank(w0, q=min(4 * R, *g.shape), niter=4)[1][:R] / s).mean()
        a0, b0 = a0 * f, b0 * f
        layer = adapted.adapter_layers()[n]
        assert layer.lora_A.dtype == torch.float64
        torch.testing.assert_close(layer.lora_A, a0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lora_B, b0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.base_weight, w0 - s * b0 @ a0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.delta_weight(), torch.zeros_like(w0), rtol=0, atol=1e-12)
    b = batch_for("llama", seed=7)
    torch.testing.assert_close(output_of(adapted, b), output_of(original, b), rtol=1e-10, atol=1e-10)


def test_first_step_covers_top_2r_gradient_subspace():
    """ArB2r: the first LoRA gradients are s B0ᵀG and s G A0ᵀ with B0, A0 from G's SVD (checked on exact SVD)."""
    r8 = 8  # q = min(4r, m, n) = min(m, n): the randomised SVD spans the whole range, so it is exact
    original = tiny_llama().double()
    batches = _batches()
    names = _names(original)[:2]
    grads = estimate_gradients(copy.deepcopy(original), names, batches)
    cfg = AdapterConfig(
        method="lora_ga", r=r8, alpha=4, target_modules=names, adapter_dtype="base", options={"scale": "unit"}
    )
    adapted = attach(copy.deepcopy(original), cfg, init_data=batches)
    for n in names:
        u, sv, vh = torch.linalg.svd(grads[n], full_matrices=False)
        layer = adapted.adapter_layers()[n]
        torch.testing.assert_close(layer.lora_A.T @ layer.lora_A, vh[:r8].T @ vh[:r8], rtol=0, atol=1e-10)
        pb = u[:, r8 : 2 * r8]
        torch.testing.assert_close(layer.lora_B @ layer.lora_B.T, pb @ pb.T, rtol=0, atol=1e-10)
    adapted.train()
    sum(adapted(**b).loss for b in batches).div(len(batches)).backward()
    for n in names:
        layer = adapted.adapter_layers()[n]
        s = layer.scale
        torch.testing.assert_close(layer.lora_A.grad, s * layer.lora_B.T @ grads[n], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.grad, s * grads[n] @ layer.lora_A.T, rtol=1e-8, atol=1e-12)


def test_export_peft_save_load_merge(tmp_path):
    from peft import PeftModel

    original = tiny_llama()
    cfg = AdapterConfig(method="lora_ga", r=R, alpha=4, target_modules=TARGETS)
    adapted = attach(copy.deepcopy(original), cfg, init_data=_batches())
    _train(adapted)
    b = batch_for("llama", seed=3)
    with torch.no_grad():
        out = output_of(adapted, b)
        adapted.merge()
        torch.testing.assert_close(output_of(adapted, b), out, rtol=1e-5, atol=1e-5)
        adapted.unmerge()
    for layer in adapted.adapter_layers().values():
        assert layer.export_lora()[0].shape[1] == 2 * R  # relative to the original base: rank 2r

    adapted.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output_of(peft_model, b), out, rtol=1e-5, atol=1e-5)

    adapted.save_adapter(tmp_path / "native")
    torch.manual_seed(999)  # loading needs no data and draws nothing that matters
    loaded = sdslora.load_adapter(copy.deepcopy(original), tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, b), out, rtol=1e-6, atol=1e-6)
    for n, layer in loaded.adapter_layers().items():
        torch.testing.assert_close(
            layer.base_weight, adapted.adapter_layers()[n].base_weight, rtol=0, atol=1e-6
        )


def test_needs_init_data_and_valid_options():
    cfg = AdapterConfig(method="lora_ga", r=R, target_modules=TARGETS)
    model = tiny_llama()
    with pytest.raises(ValueError, match="LoRA-GA .* needs init_data"):
        attach(model, cfg)
    assert not any(isinstance(m, sdslora.methods.AdapterLayer) for m in model.modules())
    with pytest.raises(ValueError, match="direction"):
        AdapterConfig(method="lora_ga", options={"direction": "sideways"})
    with pytest.raises(ValueError, match="2r <= min"):
        attach(
            tiny_llama(), AdapterConfig(method="lora_ga", r=10, target_modules=TARGETS), init_data=_batches()
        )


def test_restore_base_and_post_load_guard():
    original = tiny_llama()
    adapted = attach(
        copy.deepcopy(original),
        AdapterConfig(method="lora_ga", r=R, target_modules=TARGETS),
        init_data=_batches(),
    )
    layer = next(iter(adapted.adapter_layers().values()))
    name = next(iter(adapted.adapter_layers()))
    w0 = original.get_submodule(name).weight
    assert not torch.allclose(layer.base_weight, w0, atol=1e-6)
    with pytest.raises(RuntimeError, match="already shifted"):
        layer.post_load()
    layer.restore_base()
    torch.testing.assert_close(layer.base_weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="restore_base"):
        layer.restore_base()
