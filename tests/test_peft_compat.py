"""Cross-checks against PEFT: same LoRA math, and exported adapters load with ``PeftModel.from_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
from models import batch_for, output_of, tiny_bert_cls, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import sdslora

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc", "c_proj"]}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}


def _trained(kind: str, method: str, steps: int = 13, **cfg_kw) -> sdslora.AdaptedModel:
    """An adapter with non-trivial tensors (and, for SDS / orthogonal, past the re-parameterisation). With T = 30
    the bases are refreshed after step 12 but not after step 13, so SDS's ΔW has rank 2r (right after a refresh
    col(Q_B) = col(B) and row(Q_Aᵀ) = row(A), so ΔW has rank r)."""
    cfg = sdslora.AdapterConfig(
        method=method, r=4, alpha=4.0, target_modules=TARGETS.get(kind, "all-linear"), **cfg_kw
    )
    model = sdslora.attach(BUILD[kind](), cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=30)
    for t in range(steps):
        model(**batch_for(kind, seed=t)).loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    return model


@pytest.mark.parametrize("use_rslora", [True, False])
def test_lora_matches_peft_outputs_and_gradients(use_rslora):
    r, alpha = 4, 8.0
    targets = TARGETS["llama"]
    ours = sdslora.attach(
        tiny_llama(),
        sdslora.AdapterConfig(
            method="lora",
            r=r,
            alpha=alpha,
            scaling="rslora" if use_rslora else "standard",
            target_modules=targets,
        ),
    )
    peft_model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets, lora_dropout=0.0),
    )
    g = torch.Generator().manual_seed(5)
    pairs = {}
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            assert layer.scale == pytest.approx(peft_layer.scaling["default"])
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            pairs[name] = (layer, peft_layer)
    batch = batch_for("llama")
    out_ours, out_peft = ours(**batch), peft_model(**batch)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, rtol=1e-5, atol=1e-5)
    assert (
        float((out_ours.logits - tiny_llama()(**batch).logits).detach().abs().max()) > 1e-3
    )  # the adapter does something
    out_ours.loss.backward()
    out_peft.loss.backward()
    for layer, peft_layer in pairs.values():
        torch.testing.assert_close(
            layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize(
    "kind,method",
    [
        ("llama", "sds"),
        ("llama", "lora"),
        ("llama", "orthogonal"),
        ("gpt2", "sds"),
        ("gpt2", "lora"),
        ("gpt2", "orthogonal"),
    ],
)
def test_export_loads_in_peft(tmp_path, kind, method):
    model = _trained(kind, method)
    layers = model.adapter_layers()
    if method in ("sds", "orthogonal"):
        assert all(layer.decoupled for layer in layers.values())
    batch = batch_for(kind, seed=99)
    ours = output_of(model, batch).detach()
    base_out = output_of(BUILD[kind](), batch).detach()
    assert float((ours - base_out).abs().max()) > 1e-3
    if method == "sds":
        assert [e["step"] for e in model.controller.events if e["event"] == "refresh"] == [12]
    model.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    rank = 2 * 4 if method in ("sds", "orthogonal") else 4
    assert cfg["peft_type"] == "LORA" and cfg["r"] == rank and cfg["lora_alpha"] == rank
    assert sorted(cfg["target_modules"]) == sorted(layers)
    loaded = PeftModel.from_pretrained(BUILD[kind](), tmp_path / "peft")
    torch.testing.assert_close(output_of(loaded, batch), ours, rtol=0, atol=1e-5)
    # per layer: the loaded B'A' (scale 1) equals our ΔW
    for name, layer in layers.items():
        peft_layer = loaded.base_model.model.get_submodule(name)
        dw = (
            peft_layer.lora_B["default"].weight
            @ peft_layer.lora_A["default"].weight
            * peft_layer.scaling["default"]
        )
        torch.testing.assert_close(dw, layer.delta_weight().detach(), rtol=1e-5, atol=1e-6)


def test_export_with_classifier_head_loads_in_peft(tmp_path):
    model = _trained("bert", "sds", modules_to_save=["classifier"])
    batch = batch_for("bert", seed=7)
    ours = output_of(model, batch).detach()
    model.export_peft(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "peft")
    torch.testing.assert_close(output_of(loaded, batch), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_export_max_rank_report(tmp_path, k):
    model = _trained("llama", "sds")
    layers = model.adapter_layers()
    model.export_peft(tmp_path / "x", max_rank=k)
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == k and report["max_rank"] == k
    assert sorted(report["relative_error"]) == sorted(layers)
    truncated = {}
    for name, layer in layers.items():
        b, a = layer.export_lora()
        dw = b.double() @ a.double()  # the exact ΔW (its float32 product would add rank-full rounding noise)
        torch.testing.assert_close(dw.float(), layer.delta_weight().detach(), rtol=1e-5, atol=1e-6)
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        direct = float((dw - best).norm() / dw.norm())
        assert report["relative_error"][name] == pytest.approx(direct, rel=1e-6, abs=1e-9)
        assert direct > 1e-4  # rank 2r = 8 > k: the truncation loses something
        truncated[name] = best
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "x")
    for name, best in truncated.items():
        peft_layer = loaded.base_model.model.get_submodule(name)
        dw = (
            peft_layer.lora_B["default"].weight
            @ peft_layer.lora_A["default"].weight
            * peft_layer.scaling["default"]
        )
        torch.testing.assert_close(dw.double(), best, rtol=1e-5, atol=1e-6)


def test_export_without_max_rank_writes_no_report(tmp_path):
    model = _trained("llama", "lora", steps=2)
    model.export_peft(tmp_path / "x")
    assert not (tmp_path / "x" / "export_report.json").exists()
    with pytest.raises(ValueError, match="max_rank"):
        model.export_peft(tmp_path / "y", max_rank=0)
