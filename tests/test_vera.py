"""VeRA ("vera"): ΔW_l = s·diag(b_l)·B_l·diag(d_l)·A_l with frozen random A, B shared by every layer (sliced per
layer). Formulas and gradients in float64, the sharing (one tensor, nothing of it trained or saved), PEFT's own VeRA
from the same projections (outputs and gradients), save/load with the projection fingerprint, PEFT LoRA export, bad
options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import batch_for, output_of, tiny_gpt2, tiny_llama
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

import sdslora
from sdslora import AdapterConfig, attach
from sdslora.io import load_adapter
from sdslora.methods.vera import VeRALayer, draw_projections

R = 4
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8)).double()


def _adapted(seed: int = 0) -> sdslora.AdaptedModel:
    cfg = AdapterConfig(method="vera", r=R, alpha=2.0, adapter_dtype="base", options={"projection_seed": seed})
    model = attach(_mlp(), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero b, d away from their start: every term matters
        for layer in model.adapter_layers().values():
            layer.lora_lambda_b.copy_(torch.randn(layer.lora_lambda_b.shape, generator=g, dtype=torch.float64))
            layer.lora_lambda_d.add_(torch.randn(layer.lora_lambda_d.shape, generator=g, dtype=torch.float64))
    return model


def test_delta_weight_forward_and_gradients_match_the_formulas():
    model = _adapted()
    for layer in model.adapter_layers().values():
        a, b = layer.lora_A, layer.lora_B
        d, lb = layer.lora_lambda_d, layer.lora_lambda_b
        s = layer.scale
        want = s * torch.diag(lb) @ b @ torch.diag(d) @ a
        assert torch.allclose(layer.delta_weight(), want, rtol=0, atol=1e-13)
        xi = torch.randn(5, layer.in_features, dtype=torch.float64)
        assert torch.allclose(layer.adapter_forward(xi), xi @ want.T, rtol=0, atol=1e-12)
        # L = <C, y> with y = ΔW x: G = ∂L/∂ΔW = Cᵀ x; ∇b = s·rowsum(G ⊙ (B diag(d) A)), ∇d = s·diag(Bᵀ diag(b) G Aᵀ)
        c = torch.randn(5, layer.out_features, dtype=torch.float64)
        layer.zero_grad()
        (c * layer.adapter_forward(xi)).sum().backward()
        g = c.T @ xi
        want_b = s * (g * (b @ torch.diag(d) @ a)).sum(1)
        want_d = s * torch.diagonal(b.T @ torch.diag(lb) @ g @ a.T)
        assert torch.allclose(layer.lora_lambda_b.grad, want_b, rtol=0, atol=1e-12)
        assert torch.allclose(layer.lora_lambda_d.grad, want_d, rtol=0, atol=1e-12)
        assert layer.lora_A.grad is None and not layer.lora_A.requires_grad


def test_projections_are_one_frozen_tensor_sliced_per_layer_and_never_saved(tmp_path):
    model = _adapted()
    layers = list(model.adapter_layers().values())
    a, b = draw_projections(R, 8, 8, 0)  # the largest in and out over the three layers
    for layer in layers:
        assert layer.group_size == 3
        assert torch.equal(layer.lora_A, a[:, : layer.in_features].double())
        assert torch.equal(layer.lora_B, b[: layer.out_features].double())
        assert layer.lora_A.untyped_storage().data_ptr() == layers[0].lora_A.untyped_storage().data_ptr()
    # trainable: r + out per layer, nothing else
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(R + lay.out_features for lay in layers)
    assert sorted(layers[0].adapter_tensors()) == ["lora_lambda_b", "lora_lambda_d"]
    model.save_adapter(tmp_path / "v")
    saved = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert all("lambda" in k for k in saved) and len(saved) == 2 * len(layers)
    # torch's global RNG is not touched by the draw
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    draw_projections(R, 8, 8, 0)
    assert torch.equal(torch.rand(3), before)


def test_save_load_round_trip_and_fingerprint(tmp_path):
    model = _adapted()
    x = torch.randn(4, 8, dtype=torch.float64)
    want = model(x)
    model.save_adapter(tmp_path / "v")
    loaded = load_adapter(_mlp(), tmp_path / "v")
    assert torch.allclose(loaded(x), want, rtol=0, atol=1e-14)
    # a fingerprint that does not match the regenerated projections is refused, naming the cause
    cfg_path = tmp_path / "v" / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["extra"]["projection_sums"][0] += 1.0
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="frozen projections .* differ from the ones drawn here from projection_seed"):
        load_adapter(_mlp(), tmp_path / "v")


def _peft_pair(fan_in_fan_out: bool = False):
    build = tiny_gpt2 if fan_in_fan_out else tiny_llama
    targets = ["c_attn", "c_proj", "c_fc"] if fan_in_fan_out else LLAMA
    base = build()
    peft = get_peft_model(
        copy.deepcopy(base),
        VeraConfig(r=8, target_modules=targets, projection_prng_key=0, d_initial=0.1, fan_in_fan_out=fan_in_fan_out),
    )
    # PEFT's VeRA has no scaling factor: s = alpha / r = 1
    ours = attach(base, AdapterConfig(method="vera", r=8, alpha=8, scaling="standard", target_modules=targets))
    pa, pb = peft.base_model.vera_A["default"], peft.base_model.vera_B["default"]
    g = torch.Generator().manual_seed(0)
    inner = peft.base_model.model
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            layer.lora_A = pa[:, : layer.in_features].clone()  # the same projections (PEFT draws them its own way)
            layer.lora_B = pb[: layer.out_features].clone()
            pl = inner.get_submodule(name)
            assert torch.equal(pl.vera_lambda_d["default"], layer.lora_lambda_d)  # same start: d = 0.1, b = 0
            assert torch.equal(pl.vera_lambda_b["default"], layer.lora_lambda_b)
            layer.lora_lambda_b.copy_(torch.randn(layer.lora_lambda_b.shape, generator=g) * 0.5)
            layer.lora_lambda_d.copy_(torch.randn(layer.lora_lambda_d.shape, generator=g))
            pl.vera_lambda_b["default"].copy_(layer.lora_lambda_b)
            pl.vera_lambda_d["default"].copy_(layer.lora_lambda_d)
    return ours, peft, build


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["llama", "gpt2-conv1d"])
def test_same_outputs_and_gradients_as_peft_vera(fan_in_fan_out):
    ours, peft, build = _peft_pair(fan_in_fan_out)
    batch = batch_for(build())
    out_ours, out_peft = output_of(ours, batch), output_of(peft, batch)
    assert torch.allclose(out_ours, out_peft, rtol=1e-5, atol=1e-5)
    out_ours.float().pow(2).mean().backward()
    out_peft.float().pow(2).mean().backward()
    inner = peft.base_model.model
    for name, layer in ours.adapter_layers().items():
        pl = inner.get_submodule(name)
        for mine, theirs in ((layer.lora_lambda_b, pl.vera_lambda_b["default"]),
                             (layer.lora_lambda_d, pl.vera_lambda_d["default"])):
            scale = float(theirs.grad.abs().max()) + 1e-12
            assert float((mine.grad - theirs.grad).abs().max()) / scale < 1e-4, name


def test_peft_lora_export_gives_the_same_outputs(tmp_path):
    ours, _, build = _peft_pair()
    batch = batch_for(build())
    want = output_of(ours, batch)
    ours.export_peft(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(build(), tmp_path / "peft")
    assert torch.allclose(output_of(loaded, batch), want, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"


def test_training_moves_only_the_vectors():
    model = _adapted()
    layers = list(model.adapter_layers().values())
    frozen = [(lay.lora_A.clone(), lay.lora_B.clone()) for lay in layers]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    x = torch.randn(16, 8, dtype=torch.float64)
    before = model(x).detach()
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(model(x), before)
    assert all(torch.equal(a, lay.lora_A) and torch.equal(b, lay.lora_B) for (a, b), lay in zip(frozen, layers))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"d_initial": "big"}, "d_initial"),
        ({"d_initial": float("nan")}, "d_initial=nan must be a finite number"),
        ({"projection_seed": -1}, "projection_seed must be an int >= 0"),
        ({"projection_seed": 1.5}, "projection_seed"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attach(_mlp(), AdapterConfig(method="vera", r=R, options=options))


def test_embedding_is_refused_with_the_layer_type():
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"module '0' is a nn.Embedding, which method 'vera' cannot adapt"):
        attach(emb, AdapterConfig(method="vera", r=R, target_modules=["0"]))


def test_a_layer_alone_is_a_group_of_one():
    layer = VeRALayer(nn.Linear(8, 6), R, 1.0, 0.0, "float32", sdslora.METHODS["vera"].parse_options({}))
    assert layer.group_size == 1 and layer.lora_A.shape == (R, 8) and layer.lora_B.shape == (6, R)
    assert torch.count_nonzero(layer.delta_weight()) == 0  # b = 0 at the start


def _one_storage(layers: list) -> bool:
    ptrs = {(layer.lora_A.untyped_storage().data_ptr(), layer.lora_B.untyped_storage().data_ptr()) for layer in layers}
    return len(ptrs) == 1


def test_projections_stay_one_tensor_through_a_cast_a_copy_and_pickling(tmp_path):
    """model.to(...) gives every buffer its own copy; VeRA's layers re-bind to their group's copy on the new dtype
    (or device), so the layers share one tensor again and the old copy is dropped (PEFT shares one buffer)."""
    model = _adapted()
    layers = list(model.adapter_layers().values())
    group = layers[0].projections
    assert all(layer.projections is group for layer in layers) and list(group.copies) == [(torch.device("cpu"),
                                                                                           torch.float64)]
    x = torch.randn(3, 8, dtype=torch.float64)
    before = model(x)
    model.to(torch.float32)
    a, b = draw_projections(R, 8, 8, 0)
    for layer in layers:
        assert layer.lora_A.dtype == torch.float32
        assert torch.equal(layer.lora_A, a[:, : layer.in_features]) and torch.equal(layer.lora_B,
                                                                                    b[: layer.out_features])
    assert _one_storage(layers) and list(group.copies) == [(torch.device("cpu"), torch.float32)]
    assert torch.allclose(model(x.float()).double(), before, atol=1e-5)

    twin = copy.deepcopy(model)
    twin_layers = list(twin.adapter_layers().values())
    twin.to(torch.float64)
    assert _one_storage(twin_layers) and twin_layers[0].projections is not group
    assert layers[0].lora_A.dtype == torch.float32 and list(group.copies) == [(torch.device("cpu"), torch.float32)]
    assert torch.allclose(twin(x), before, atol=1e-5)

    torch.save(model, tmp_path / "whole.pt")
    back = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(back(x.float()), model(x.float()))


def test_training_state_counts_the_shared_projections_once():
    from sdslora.experiments.train import training_state_bytes

    model = _adapted()
    layers = list(model.adapter_layers().values())
    vectors = sum(R + layer.out_features for layer in layers)
    mem = training_state_bytes(model, tokens_per_step=0)
    assert mem["adapter_tensors"] == (R * 8 + 8 * R + vectors) * 8  # one A [r, 8], one B [8, r], float64
