"""LoTR ("lotr"): ΔW_l = s·U·C_l·Vᵀ with U, V shared by the adapted layers of one shape (Tucker-2), and the CP
variant (diagonal C_l). Formulas and gradients in float64, the sharing itself (one tensor, counted once), save/load,
PEFT export, other layer kinds, bad options."""

from __future__ import annotations

import json

import pytest
import torch
from models import batch_for, output_of, tiny_gpt2, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

import sdslora
from sdslora import AdapterConfig, attach
from sdslora.experiments.train import training_state_bytes
from sdslora.io import load_adapter_state
from sdslora.methods.base import AdapterLayer
from sdslora.methods.shared import LoTRLayer, LoTROptions

R = 3
CORES = ["full", "diagonal"]


def _mlp() -> nn.Sequential:
    """Linear layers in three shape groups (out, in): (8, 8) x3, (6, 8) x2, (8, 6) x1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 6),
        nn.Tanh(),
        nn.Linear(6, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 6),
    ).double()


def _adapted_mlp(core: str) -> sdslora.AdaptedModel:
    torch.manual_seed(1)
    cfg = AdapterConfig(
        method="lotr", r=R, alpha=2.0, adapter_dtype="base", options={"core": core, "share_by": "shape"}
    )
    model = attach(_mlp(), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a non-zero core, so that U and V get gradient too
        for layer in model.adapter_layers().values():
            layer.lora_C.copy_(torch.randn(layer.lora_C.shape, generator=g, dtype=torch.float64))
    return model


def _core(layer: LoTRLayer) -> torch.Tensor:
    c = layer.lora_C.detach()
    return torch.diag(c) if c.dim() == 1 else c


def _groups(model: sdslora.AdaptedModel) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, layer in model.adapter_layers().items():
        out.setdefault(id(layer.lora_U), []).append(name)
    return out


@pytest.mark.parametrize("core", CORES)
def test_delta_forward_and_gradients_float64(core):
    model = _adapted_mlp(core)
    layers = model.adapter_layers()
    s = model.adapter_config.scale
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for layer in layers.values():
        u, v = layer.lora_U.detach(), layer.lora_V.detach()
        assert layer.lora_C.shape == ((R, R) if core == "full" else (R,))
        dw = s * u @ _core(layer) @ v.T
        torch.testing.assert_close(layer.delta_weight().detach(), dw, rtol=1e-12, atol=1e-14)
        xi = torch.randn(4, layer.in_features, dtype=torch.float64)
        torch.testing.assert_close(layer(xi), layer.base_layer(xi) + xi @ dw.T, rtol=1e-12, atol=1e-13)
        b, a = layer.export_lora()
        torch.testing.assert_close(b @ a, dw, rtol=1e-12, atol=1e-14)
    # G_l = ∂L/∂W_l from the plain model at W0 + ΔW_l (the same function of the weights)
    plain = _mlp()
    weights = {
        f"{n}.weight": (layer.base_weight + layer.delta_weight()).detach().requires_grad_(True)
        for n, layer in layers.items()
    }
    loss_plain = functional_call(plain, weights, (x,)).square().sum()
    grads = dict(zip(weights, torch.autograd.grad(loss_plain, list(weights.values())), strict=True))
    loss = model(x).square().sum()
    torch.testing.assert_close(loss, loss_plain, rtol=1e-12, atol=0)
    loss.backward()
    groups = _groups(model)
    assert sorted(len(g) for g in groups.values()) == [1, 2, 3]
    for names in groups.values():
        first = layers[names[0]]
        u, v = first.lora_U.detach(), first.lora_V.detach()
        grad_u = sum(s * grads[f"{n}.weight"] @ v @ _core(layers[n]).T for n in names)
        grad_v = sum(s * grads[f"{n}.weight"].T @ u @ _core(layers[n]) for n in names)
        torch.testing.assert_close(first.lora_U.grad, grad_u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(first.lora_V.grad, grad_v, rtol=1e-10, atol=1e-12)
        for n in names:
            grad_c = s * u.T @ grads[f"{n}.weight"] @ v
            if core == "diagonal":
                grad_c = torch.diagonal(grad_c)
            torch.testing.assert_close(layers[n].lora_C.grad, grad_c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("core", CORES)
def test_initialisation_orthonormal_zero_core_deterministic(core):
    cfg = AdapterConfig(method="lotr", r=R, adapter_dtype="base", options={"core": core, "share_by": "shape"})
    torch.manual_seed(5)
    a = attach(_mlp(), cfg)
    torch.manual_seed(5)
    b = attach(_mlp(), cfg)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(a(x), _mlp()(x), rtol=0, atol=0)  # C = 0: ΔW = 0 at the start
    eye = torch.eye(R, dtype=torch.float64)
    for (n, la), lb in zip(a.adapter_layers().items(), b.adapter_layers().values(), strict=True):
        assert torch.equal(la.lora_U, lb.lora_U) and torch.equal(la.lora_V, lb.lora_V), n
        assert not la.lora_C.any()
        torch.testing.assert_close(la.lora_U.T @ la.lora_U, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(la.lora_V.T @ la.lora_V, eye, rtol=0, atol=1e-12)
        assert la.lora_U.is_contiguous() and la.lora_V.is_contiguous()
    gauss = attach(
        _mlp(), AdapterConfig(method="lotr", r=R, options={"orthonormal_init": False, "share_by": "shape"})
    )
    u = next(iter(gauss.adapter_layers().values())).lora_U.detach()
    assert not torch.allclose(u.T @ u, torch.eye(R), atol=1e-3)


@pytest.mark.parametrize("core", CORES)
def test_factors_are_shared_and_counted_once(core):
    torch.manual_seed(0)
    model = attach(
        tiny_llama(), AdapterConfig(method="lotr", r=R, options={"core": core, "share_by": "shape"})
    )
    layers = model.adapter_layers()
    by_shape: dict[tuple[int, int], list[LoTRLayer]] = {}
    for layer in layers.values():
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    assert len(by_shape) == 4 and max(len(g) for g in by_shape.values()) > 1
    for group in by_shape.values():
        assert all(m.lora_U is group[0].lora_U and m.lora_V is group[0].lora_V for m in group)
        assert len({m.lora_U.data_ptr() for m in group}) == 1
        assert len({id(m.lora_C) for m in group}) == len(group)  # each layer its own core
    firsts = [g[0] for g in by_shape.values()]
    assert len({id(m.lora_U) for m in firsts}) == len({id(m.lora_V) for m in firsts}) == len(by_shape)
    per_core = R * R if core == "full" else R
    expected = sum(R * (out + inp) for out, inp in by_shape) + per_core * len(layers)
    params = model.trainable_parameters()
    assert len({id(p) for p in params}) == len(params) == 2 * len(by_shape) + len(layers)
    assert sum(p.numel() for p in params) == expected
    assert len(model.adapter_parameters()) == len(params)
    summary = model.trainable_summary()
    assert summary["trainable"] == summary["adapter"] == expected
    groups = model.trainable_param_groups()
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert training_state_bytes(model, tokens_per_step=0)["adapter_tensors"] == 4 * expected  # float32, once
    model.to(torch.bfloat16)  # a dtype cast keeps the sharing
    for group in by_shape.values():
        assert all(m.lora_U is group[0].lora_U and m.lora_U.dtype == torch.bfloat16 for m in group)


def _train(model: sdslora.AdaptedModel, kind: str, steps: int = 4) -> None:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2, weight_decay=0.0)
    for t in range(steps):
        model(**batch_for(kind, seed=t)).loss.backward()
        opt.step()
        opt.zero_grad()


def test_save_load_round_trip_keeps_the_sharing(tmp_path):
    torch.manual_seed(0)
    model = attach(
        tiny_llama(), AdapterConfig(method="lotr", r=R, options={"core": "diagonal", "share_by": "shape"})
    )
    _train(model, "llama")
    batch = batch_for("llama", seed=9)
    out = output_of(model, batch).detach()
    assert float((out - output_of(tiny_llama(), batch).detach()).abs().max()) > 1e-4
    model.save_adapter(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_U") for k in saved) == len(model.adapter_layers())  # each layer's view of U
    torch.manual_seed(4321)
    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(loaded, batch), out)
    names = [n for n, layer in loaded.adapter_layers().items() if layer.out_features == layer.in_features]
    layers = [loaded.adapter_layers()[n] for n in names]
    assert len(layers) == 4 and all(m.lora_U is layers[0].lora_U for m in layers)
    u0 = layers[0].lora_U.detach().clone()
    assert torch.equal(u0, model.adapter_layers()[names[1]].lora_U)
    _train(loaded, "llama", steps=1)  # one step moves the shared U of every layer of the group
    assert not torch.equal(layers[0].lora_U, u0)
    assert all(torch.equal(m.lora_U, layers[0].lora_U) for m in layers)
    load_adapter_state(loaded, tmp_path / "a")  # resuming copies into the shared tensors
    assert torch.equal(output_of(loaded, batch), out) and all(m.lora_U is layers[0].lora_U for m in layers)


def test_failed_load_rolls_back(tmp_path):
    cfg = AdapterConfig(method="lotr", r=R, adapter_dtype="base", options={"share_by": "shape"})
    attach(_mlp(), cfg).save_adapter(tmp_path / "a")
    other = _mlp()
    # same module names, one shape differs: the load fails after the layers were built and tied
    other[10] = nn.Linear(8, 5).double()
    flags = {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="does not fit this model"):
        sdslora.load_adapter(other, tmp_path / "a")
    assert not any(isinstance(m, AdapterLayer) for m in other.modules())
    assert {n: p.requires_grad for n, p in other.named_parameters()} == flags


@pytest.mark.parametrize("kind,core", [("llama", "full"), ("gpt2", "diagonal")])
def test_export_loads_in_peft(tmp_path, kind, core):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    torch.manual_seed(0)
    model = attach(build(), AdapterConfig(method="lotr", r=R, options={"core": core, "share_by": "shape"}))
    _train(model, kind)
    batch = batch_for(kind, seed=99)
    ours = output_of(model, batch).detach()
    assert float((ours - output_of(build(), batch).detach()).abs().max()) > 1e-4
    sdslora.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == R and not cfg["rank_pattern"]
    loaded = PeftModel.from_pretrained(build(), tmp_path / "peft")
    torch.testing.assert_close(output_of(loaded, batch), ours, rtol=0, atol=1e-5)
    for name, layer in model.adapter_layers().items():
        peft_layer = loaded.base_model.model.get_submodule(name)
        dw = (
            peft_layer.lora_B["default"].weight
            @ peft_layer.lora_A["default"].weight
            * peft_layer.scaling["default"]
        )
        torch.testing.assert_close(dw, layer.delta_weight().detach(), rtol=1e-5, atol=1e-6)


class _EmbConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.conv1 = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1)

    def forward(self, ids):
        return self.conv2(torch.tanh(self.conv1(self.emb(ids).transpose(1, 2))))


def test_embedding_and_convolution():
    torch.manual_seed(1)
    model = attach(
        _EmbConv().double(),
        AdapterConfig(
            method="lotr",
            r=2,
            adapter_dtype="base",
            target_modules=["emb", "conv1", "conv2"],
            options={"share_by": "shape"},
        ),
    )
    layers = model.adapter_layers()
    assert (
        layers["conv1"].lora_V is layers["conv2"].lora_V
        and layers["emb"].lora_V is not layers["conv1"].lora_V
    )
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_C.normal_()
    ids = torch.randint(0, 10, (2, 7))
    out = model(ids)
    model.merge()  # merge adds delta_weight(): the forward and ΔW agree
    torch.testing.assert_close(model(ids), out, rtol=1e-12, atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="core must be 'full'.*or 'diagonal'"):
        AdapterConfig(method="lotr", options={"core": "tucker"})
    with pytest.raises(ValueError, match="orthonormal_init"):
        AdapterConfig(method="lotr", options={"orthonormal_init": "yes"})
    with pytest.raises(ValueError, match="unknown option.*'lotr'"):
        AdapterConfig(method="lotr", options={"rank": 2})
    with pytest.raises(ValueError, match="orthonormal_init must be True"):
        LoTROptions(orthonormal_init=1)


def test_quantised_base_torchao_int8():
    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    try:
        quantization.quantize_(base, quantization.Int8WeightOnlyConfig())
        base(torch.randn(2, 16))
    except Exception as e:  # the backend itself does not run on this machine
        pytest.skip(f"torchao int8 does not run here ({type(e).__name__})")
    model = attach(base, AdapterConfig(method="lotr", r=2, options={"share_by": "shape"}))
    layers = list(model.adapter_layers().values())
    assert layers[0].quantised is not None and layers[0].lora_U is layers[1].lora_U
    with torch.no_grad():
        for layer in layers:
            layer.lora_C.normal_()
    x = torch.randn(3, 16)
    for layer in layers:
        with torch.no_grad():
            ref = layer.base_layer(x) + x @ layer.delta_weight().T
        torch.testing.assert_close(layer(x).detach(), ref, rtol=1e-5, atol=1e-5)
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


def test_default_shares_one_pair_per_module_name_across_the_depth():
    model = attach(tiny_llama(), AdapterConfig(method="lotr", r=R))
    groups = _groups(model)
    leaves = {n.rsplit(".", 1)[-1] for n in model.adapter_layers()}
    assert len(groups) == len(leaves)  # every q_proj shares one U, V; q_proj and o_proj (same shape) do not
    for members in groups.values():
        assert len({n.rsplit(".", 1)[-1] for n in members}) == 1 and len(members) > 1
    with pytest.raises(ValueError, match="share_by must be 'name'"):
        AdapterConfig(method="lotr", options={"share_by": "layer"})
