"""DoRA (SPEC.md §4.6) against PEFT ``use_dora=True`` (same start, fp32) and its own identities."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import batch_for, output_of, tiny_bert_cls, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import sdslora
from sdslora.io import load_adapter

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
BUILD = {"llama": tiny_llama, "bert": tiny_bert_cls, "gpt2": tiny_gpt2}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max()) / scale
    assert err <= rtol, err


def _linear_w(module: torch.nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def _perturb(model: sdslora.AdaptedModel, seed: int = 0) -> None:
    """Non-zero B and a magnitude away from ‖W0‖_c, so that every term of DoRA matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))


def _pair(kind: str, scaling: str, dropout: float = 0.0, r: int = 4, alpha: float = 8.0):
    """Our DoRA model and PEFT's on copies of one base, PEFT's tensors copied from ours (same start)."""
    base = BUILD[kind]()
    original = copy.deepcopy(base)
    peft_base = copy.deepcopy(base)
    cfg = sdslora.AdapterConfig(
        method="dora", r=r, alpha=alpha, scaling=scaling, target_modules=TARGETS[kind], dropout=dropout
    )
    ours = sdslora.attach(base, cfg)
    # PEFT's magnitude starts at ‖W0‖_c like ours: check before perturbing
    pcfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS[kind],
        use_rslora=scaling == "rslora",
        use_dora=True,
        lora_dropout=dropout,
        fan_in_fan_out=kind == "gpt2",
    )
    peft = get_peft_model(peft_base, pcfg)
    pinner = peft.base_model.model
    for name, layer in ours.adapter_layers().items():
        pm = pinner.get_submodule(name).lora_magnitude_vector["default"].weight
        _close(layer.lora_magnitude_vector, pm, 1e-6)
        _close(layer.lora_magnitude_vector, _linear_w(original.get_submodule(name)).norm(dim=1), 1e-6)
    _perturb(ours)
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            pl = pinner.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
            pl.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
            assert pl.scaling["default"] == pytest.approx(layer.scale)
    return ours, peft, original


def _grads(ours, peft):
    pinner = peft.base_model.model
    for name, layer in ours.adapter_layers().items():
        pl = pinner.get_submodule(name)
        pairs = [
            (layer.lora_A, pl.lora_A["default"].weight),
            (layer.lora_B, pl.lora_B["default"].weight),
            (layer.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight),
        ]
        for mine, theirs in pairs:
            assert mine.grad is not None and theirs.grad is not None
            _close(mine.grad, theirs.grad, 1e-4)


@pytest.mark.parametrize(
    "kind,scaling",
    [
        ("llama", "rslora"),
        ("llama", "standard"),
        ("bert", "rslora"),
        ("bert", "standard"),
        ("gpt2", "rslora"),
    ],
)
def test_outputs_and_gradients_match_peft(kind, scaling):
    ours, peft, original = _pair(kind, scaling)
    batch = batch_for(kind)
    with torch.no_grad():
        out, out_peft = output_of(ours, batch), output_of(peft, batch)
        assert not torch.allclose(out, output_of(original, batch), atol=1e-3)  # the adapter does something
    _close(out, out_peft, 1e-5)
    opt = torch.optim.SGD(ours.trainable_parameters(), lr=0.5)
    popt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # gradients, then again after a step (the norm is recomputed from the new B·A)
        ours(**batch).loss.backward()
        peft(**batch).loss.backward()
        _grads(ours, peft)
        opt.step(), popt.step(), opt.zero_grad(), popt.zero_grad()
    with torch.no_grad():
        _close(output_of(ours, batch), output_of(peft, batch), 1e-5)


def test_dropout_in_training_matches_peft():
    """With dropout active, the DoRA path uses W0·dropout(x) (as PEFT does); the same RNG gives the same masks."""
    ours, peft, _ = _pair("llama", "rslora", dropout=0.2)
    ours.train(), peft.train()
    batch = batch_for("llama")
    torch.manual_seed(5)
    loss = ours(**batch).loss
    torch.manual_seed(5)
    ploss = peft(**batch).loss
    _close(loss, ploss, 1e-6)
    loss.backward(), ploss.backward()
    _grads(ours, peft)


def test_norm_is_detached_and_formula_float64():
    """Forward and gradients against a float64 reference in which ‖W0 + sBA‖_c is a constant."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(9, 7).double()
    w0, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = sdslora.attach(
        torch.nn.Sequential(lin), sdslora.AdapterConfig(method="dora", r=3, adapter_dtype="base")
    )
    layer = model.adapter_layers()["0"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
        layer.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    a, b, m = (
        t.detach().clone().requires_grad_(True)
        for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    )
    s = layer.scale
    v = w0 + s * b @ a
    w_new = (m / v.norm(dim=1).detach())[:, None] * v
    ref = x @ w_new.T + bias
    out = model(x)
    _close(out, ref, 1e-12)
    _close(layer.delta_weight(), w_new - w0, 1e-12)
    (ref**3).sum().backward()
    (out**3).sum().backward()
    for mine, theirs in ((layer.lora_A, a), (layer.lora_B, b), (layer.lora_magnitude_vector, m)):
        _close(mine.grad, theirs.grad, 1e-12)
    # and the un-detached gradient differs: the test can tell the two apart
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    v2 = w0 + s * b2 @ a2
    ((x @ ((m.detach() / v2.norm(dim=1))[:, None] * v2).T + bias) ** 3).sum().backward()
    assert not torch.allclose(a2.grad, a.grad, rtol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_loads_in_peft(kind, tmp_path):
    ours, _, original = _pair(kind, "rslora")
    ours.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == cfg["lora_alpha"] == 4
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    name = next(iter(ours.adapter_layers()))
    assert f"base_model.model.{name}.lora_magnitude_vector" in keys
    loaded = PeftModel.from_pretrained(original, tmp_path / "peft").eval()
    batch = batch_for(kind, seed=2)
    with torch.no_grad():
        _close(output_of(loaded, batch), output_of(ours, batch), 1e-5)


def test_save_load_round_trip(tmp_path):
    base = tiny_bert_cls()
    fresh = copy.deepcopy(base)
    ours = sdslora.attach(base, sdslora.AdapterConfig(method="dora", r=4, target_modules=TARGETS["bert"]))
    _perturb(ours)
    ours.save_adapter(tmp_path / "a")
    torch.manual_seed(99)
    loaded = load_adapter(fresh, tmp_path / "a")
    batch = batch_for("bert", seed=1)
    with torch.no_grad():
        assert torch.equal(output_of(loaded, batch), output_of(ours, batch))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(kind):
    ours, _, original = _pair(kind, "standard")
    batch = batch_for(kind, seed=4)
    layers = ours.adapter_layers()
    expect = {}
    for name, layer in layers.items():
        w0 = _linear_w(original.get_submodule(name)).double()
        v = w0 + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
        expect[name] = (layer.lora_magnitude_vector.double() / v.norm(dim=1))[:, None] * v
        _close(layer.delta_weight(), expect[name] - w0, 1e-5)
    with torch.no_grad():
        out = output_of(ours, batch)
        with ours.disable_adapter():
            assert torch.equal(output_of(ours, batch), output_of(original, batch))
        ours.merge()
        _close(output_of(ours, batch), out, 1e-5)
        ours.unmerge()  # W0 = W' / g − s·B·A with the norm kept at merge time (exact up to rounding)
        for name, layer in layers.items():
            _close(layer.base_layer.weight, original.get_submodule(name).weight, 1e-5)
        _close(output_of(ours, batch), out, 1e-5)
        merged = ours.merge_and_unload()
        for name, w in expect.items():
            _close(_linear_w(merged.get_submodule(name)), w, 1e-5)
        _close(output_of(merged, batch), out, 1e-5)


def test_only_adapter_tensors_get_gradients():
    ours = sdslora.attach(
        tiny_llama(), sdslora.AdapterConfig(method="dora", r=4, target_modules=TARGETS["llama"])
    )
    _perturb(ours)
    ours.train()
    ours(**batch_for("llama")).loss.backward()
    got = {n for n, p in ours.model.named_parameters() if p.grad is not None}
    want = {f"{n}.{k}" for n in ours.adapter_layers() for k in ("lora_A", "lora_B", "lora_magnitude_vector")}
    assert got == want
    assert all(float(p.grad.abs().sum()) > 0 for n, p in ours.model.named_parameters() if n in want)
