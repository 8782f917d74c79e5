"""nn.Embedding and nn.Conv1d / nn.Conv2d (/3d) base layers: the matrix view (ΔW as out × in, a kernel as
out × in_ch·∏k, an embedding as the map of one-hot inputs), checked against the dense ΔW and against PEFT's LoRA.

Identities are checked in float64 (base and adapter). The toy is Embedding -> Conv1d (stride, padding) -> Conv2d
(stride, padding) -> Conv2d (dilation, padding) -> Linear; PEFT 0.21 builds a convolution's lora_A without the
base's dilation (huggingface/peft#3697), so the dilated layer is compared with PEFT through ΔW / merged weights only.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

import sdslora
from sdslora.methods.base import AdapterLayer

VOCAB, PAD = 24, 0
ALL = ["emb", "c1", "c2", "c3", "fc"]
NO_DILATION = ["emb", "c1", "c2", "fc"]  # what PEFT 0.21's unmerged forward handles
OURS = ["lora", "sds", "orthogonal", "pissa"]  # the methods that adapt embeddings and convolutions
TW = 10  # SDS warm-up steps (default)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=PAD)
        self.c1 = nn.Conv1d(8, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(4, 5, 3, padding=2, dilation=2)
        self.fc = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)  # [N, 8, 12]
        h = torch.tanh(self.c1(h))  # [N, 6, 6]
        h = h.reshape(h.shape[0], 2, 3, h.shape[-1])  # [N, 2, 3, 6]
        h = torch.tanh(self.c2(h))  # [N, 4, 2, 3]
        h = torch.tanh(self.c3(h))  # [N, 5, 2, 3]
        return self.fc(h.mean((2, 3)))


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().double()


def ids(seed: int = 0, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, 12), generator=g)
    x[:, -1] = PAD  # some padding tokens
    return x


def cfg(method: str, targets=ALL, **kw) -> sdslora.AdapterConfig:
    return sdslora.AdapterConfig(method=method, r=2, alpha=2.0, target_modules=list(targets), adapter_dtype="base", **kw)


@torch.no_grad()
def randomise(model: sdslora.AdaptedModel, seed: int = 1) -> None:
    """Random factors, so that ΔW is far from 0 (an embedding's padding column of A stays 0, as training keeps it:
    its gradient is 0, like PEFT's)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.adapter_layers().values():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)
        if layer.view.kind == "embedding":
            layer.lora_A[:, PAD] = 0


def decouple(model: sdslora.AdaptedModel) -> sdslora.Controller:
    """The Controller's re-parameterisation after warm-up step TW (no optimizer step: lr 0)."""
    ctl = sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=100)
    ctl.step(t=TW)
    assert all(layer.decoupled for layer in model.adapter_layers().values())
    return ctl


def dense_weights(model: sdslora.AdaptedModel, original: nn.Module) -> dict[str, torch.Tensor]:
    """The original model's parameters with W0 + ΔW (ΔW = delta_weight(), differentiable) for every adapted layer."""
    params = dict(original.named_parameters())
    for name, layer in model.adapter_layers().items():
        params[f"{name}.weight"] = params[f"{name}.weight"].detach() + layer.view.to_base(layer.delta_weight())
    return params


def adapted(method: str, targets=ALL, phase: str = "warmup", **kw) -> sdslora.AdaptedModel:
    model = sdslora.attach(toy(), cfg(method, targets, **kw))
    randomise(model)
    if phase == "decoupled":
        decouple(model)
    return model


CASES = [(m, "warmup") for m in OURS] + [("sds", "decoupled"), ("orthogonal", "decoupled")]


# ---- the adapter path is W0 + ΔW --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,phase", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_forward_and_gradients_equal_dense_delta(method, phase):
    model = adapted(method, phase=phase)
    layers = model.adapter_layers()
    assert {n: layer.view.kind for n, layer in layers.items()} == {
        "emb": "embedding", "c1": "conv", "c2": "conv", "c3": "conv", "fc": "linear"}
    assert (layers["c2"].in_features, layers["c2"].out_features) == (2 * 9, 4)
    assert (layers["emb"].in_features, layers["emb"].out_features) == (VOCAB, 8)
    x, original = ids(), toy()
    y = model(x)
    assert float((y - original(x)).detach().abs().max()) > 1e-3  # the adapter does something
    loss = y.pow(2).sum()
    grads = torch.autograd.grad(loss, model.trainable_parameters())
    dense = functional_call(original, dense_weights(model, original), (x,))
    torch.testing.assert_close(y, dense, rtol=1e-10, atol=1e-12)
    # the gradients of the trainable tensors through the adapter path = through W0 + ΔW(A, B)
    dense_grads = torch.autograd.grad(dense.pow(2).sum(), model.trainable_parameters())
    for g, dg in zip(grads, dense_grads):
        torch.testing.assert_close(g, dg, rtol=1e-9, atol=1e-12)
    # the exact low-rank factorisation: export_lora() in the matrix view
    for layer in layers.values():
        b, a = layer.export_lora()
        torch.testing.assert_close(b @ a, layer.delta_weight().detach(), rtol=1e-10, atol=1e-12)


class ScaledEmbedding(nn.Embedding):
    """Like transformers' scaled word embeddings (Gemma): the output times embed_scale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(2.5, dtype=torch.float64), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale


SINGLE = {
    "conv1d-circular": (lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 9)),
    "conv1d-unbatched": (lambda: nn.Conv1d(3, 4, 2, stride=2, bias=False), (3, 8)),
    "conv2d-same-dilated": (lambda: nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2), (2, 3, 7, 6)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), (2, 3, 7, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 2, 4, 4, 3)),
    "conv2d-1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 3, 3)),
    "scaled-embedding": (lambda: ScaledEmbedding(11, 6), None),
}


@pytest.mark.parametrize("method", ["lora", "sds"])
@pytest.mark.parametrize("which", list(SINGLE))
def test_single_layer_geometries(which, method):
    build, shape = SINGLE[which]
    torch.manual_seed(0)
    base = nn.Sequential(build().double())
    original = nn.Sequential(build().double())
    original.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 11, (3, 5), generator=g) if shape is None else torch.randn(shape, generator=g, dtype=torch.float64)
    model = sdslora.attach(base, cfg(method, ["0"]))
    randomise(model)
    if method == "sds":
        decouple(model)
    y = model(x)
    torch.testing.assert_close(y, functional_call(original, dense_weights(model, original), (x,)), rtol=1e-10, atol=1e-12)
    model.merge()
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)


# ---- merge / unmerge --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,phase", CASES, ids=[f"{m}-{p}" for m, p in CASES])
@torch.no_grad()
def test_merge_unmerge_round_trip(method, phase):
    model = adapted(method, phase=phase)
    layers = model.adapter_layers()
    x = ids(3)
    y = model(x)
    before = {n: layer.base_weight.clone() for n, layer in layers.items()}
    model.merge()
    for n, layer in layers.items():
        expect = before[n] + layer.view.to_base(layer.delta_to_base())
        torch.testing.assert_close(layer.base_weight, expect, rtol=0, atol=1e-13)
        assert layer.base_weight.shape == before[n].shape
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    model.unmerge()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_weight, before[n], rtol=0, atol=1e-13)
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), y, rtol=1e-10, atol=1e-12)


# ---- PEFT parity ------------------------------------------------------------------------------------------------------
def _peft_set(peft_layer: nn.Module, layer: AdapterLayer) -> None:
    """Copy our (A, B) into a PEFT LoRA layer, in PEFT's layout for the layer type."""
    for key, value in layer.peft_factors(layer.lora_B.detach(), layer.lora_A.detach()).items():
        if key.startswith("lora_embedding"):
            getattr(peft_layer, key)["default"].copy_(value)
        else:
            getattr(peft_layer, key.split(".")[0])["default"].weight.copy_(value)


def _peft_grads(peft_layer: nn.Module, layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's gradients of A and B in our matrix layout."""
    if layer.view.kind == "embedding":
        return peft_layer.lora_embedding_A["default"].grad, peft_layer.lora_embedding_B["default"].grad
    ga = peft_layer.lora_A["default"].weight.grad
    gb = peft_layer.lora_B["default"].weight.grad
    return ga.reshape(ga.shape[0], -1), gb.reshape(gb.shape[0], -1)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_lora_matches_peft_outputs_and_gradients(use_rslora):
    r, alpha = 2, 3.0
    scaling = "rslora" if use_rslora else "standard"
    ours = sdslora.attach(toy(), sdslora.AdapterConfig(method="lora", r=r, alpha=alpha, scaling=scaling,
                                                       target_modules=ALL, adapter_dtype="base"))
    randomise(ours)
    peft_model = get_peft_model(toy(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=ALL,
                                                  lora_dropout=0.0)).double()
    pairs = {}
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            assert layer.scale == pytest.approx(peft_layer.scaling["default"])
            _peft_set(peft_layer, layer)
            pairs[name] = (layer, peft_layer)
            # PEFT's ΔW (in the base weight's layout) from the same A, B is ours, the dilated layer included
            torch.testing.assert_close(peft_layer.get_delta_weight("default"), layer.view.to_base(layer.delta_weight()),
                                       rtol=1e-10, atol=1e-13)
        # PEFT 0.21's unmerged forward cannot run the dilated layer: compare it with the adapter disabled there
        pairs.pop("c3")
        ours.model.c3.disabled = True
        peft_model.base_model.model.c3.enable_adapters(False)
    x = ids(7)
    y_ours, y_peft = ours(x), peft_model(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-10, atol=1e-12)
    y_ours.pow(2).sum().backward()
    y_peft.pow(2).sum().backward()
    for layer, peft_layer in pairs.values():
        ga, gb = _peft_grads(peft_layer, layer)
        assert float(layer.lora_A.grad.abs().max()) > 0
        torch.testing.assert_close(layer.lora_A.grad, ga, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.grad, gb, rtol=1e-9, atol=1e-12)


def _trained(method: str, targets=ALL, steps: int = 13) -> sdslora.AdaptedModel:
    """A few AdamW steps driven by a Controller (T = 30: SDS re-parameterises after step 10 and refreshes after 12,
    not after 13, so its ΔW has rank 2r)."""
    torch.manual_seed(0)
    model = sdslora.attach(toy(), cfg(method, targets))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=30)
    for t in range(steps):
        model(ids(t)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    if method in ("sds", "orthogonal"):
        assert all(layer.decoupled for layer in model.adapter_layers().values())
    return model


@pytest.mark.parametrize("method", OURS)
@pytest.mark.parametrize("dilated", [False, True], ids=["unmerged", "dilated-merged"])
def test_export_loads_in_peft(tmp_path, method, dilated):
    targets = ALL if dilated else NO_DILATION
    model = _trained(method, targets)
    layers = model.adapter_layers()
    x = ids(99)
    with torch.no_grad():
        ours = model(x)
        assert float((ours - toy()(x)).abs().max()) > 1e-4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.export_peft(tmp_path / "peft", dtype=torch.float64)
    dilation_warnings = [w for w in caught if "dilation" in str(w.message)]
    assert len(dilation_warnings) == (1 if dilated else 0)
    rank = 2 * 2 if method in ("sds", "orthogonal", "pissa") else 2
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["r"] == rank and conf["lora_alpha"] == rank and sorted(conf["target_modules"]) == sorted(targets)
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in saved.items()}
    expect = {
        "emb.lora_embedding_A": (rank, VOCAB), "emb.lora_embedding_B": (8, rank),
        "c1.lora_A.weight": (rank, 8, 3), "c1.lora_B.weight": (6, rank, 1),
        "c2.lora_A.weight": (rank, 2, 3, 3), "c2.lora_B.weight": (4, rank, 1, 1),
        "fc.lora_A.weight": (rank, 5), "fc.lora_B.weight": (3, rank),
    }
    if dilated:
        expect.update({"c3.lora_A.weight": (rank, 4, 3, 3), "c3.lora_B.weight": (5, rank, 1, 1)})
    assert shapes == expect
    loaded = PeftModel.from_pretrained(toy(), tmp_path / "peft")
    with torch.no_grad():
        for name, layer in layers.items():  # per layer: PEFT's ΔW (scale 1) is ours
            peft_layer = loaded.base_model.model.get_submodule(name)
            assert peft_layer.scaling["default"] == 1.0
            torch.testing.assert_close(peft_layer.get_delta_weight("default"), layer.view.to_base(layer.delta_weight()),
                                       rtol=1e-9, atol=1e-12)
        if not dilated:
            torch.testing.assert_close(loaded(x), ours, rtol=1e-9, atol=1e-11)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(x), ours, rtol=1e-9, atol=1e-11)


# ---- SDS-LoRA's schedule ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sds", "orthogonal"])
@torch.no_grad()
def test_reparameterisation_and_refresh_preserve_the_function(method):
    model = adapted(method, options={"refresh": "every:1"})
    layers = model.adapter_layers()
    x = ids(5)
    y, deltas = model(x), {n: layer.delta_weight().clone() for n, layer in layers.items()}
    ctl = decouple(model)  # after warm-up step TW: SVD of B·A, ΔW unchanged
    for n, layer in layers.items():
        assert float((layer.delta_weight() - deltas[n]).norm() / deltas[n].norm()) < 1e-10
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    if method == "sds":  # the default refresh ("preserve") re-expresses A and B: ΔW unchanged
        for layer in layers.values():  # move A, B off the bases (as training does), then refresh
            layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
        y, deltas = model(x), {n: layer.delta_weight().clone() for n, layer in layers.items()}
        ctl.step(t=TW + 1)
        assert [e["step"] for e in ctl.events if e["event"] == "refresh"] == [TW + 1]
        for n, layer in layers.items():
            assert float((layer.delta_weight() - deltas[n]).norm() / deltas[n].norm()) < 1e-10
        torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)


# ---- save / load --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", OURS)
def test_save_load_round_trip(tmp_path, method):
    model = _trained(method, steps=12)
    x = ids(42)
    with torch.no_grad():
        y = model(x)
    model.save_adapter(tmp_path / "a")
    loaded = sdslora.load_adapter(toy(), tmp_path / "a")
    for name, layer in loaded.adapter_layers().items():
        mine = model.adapter_layers()[name]
        assert layer.view == mine.view
        assert getattr(layer, "decoupled", None) == getattr(mine, "decoupled", None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=1e-12, atol=1e-13)


# ---- what is refused ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dora", "lora_xs", "lora_sb", "lora_ga"])
@pytest.mark.parametrize("target,type_name", [("emb", "nn.Embedding"), ("c1", "nn.Conv1d"), ("c2", "nn.Conv2d")])
def test_other_methods_refuse_these_layers(method, target, type_name):
    m = toy()
    with pytest.raises(TypeError) as err:
        sdslora.attach(m, cfg(method, [target, "fc"]))
    text = str(err.value)
    assert f"module {target!r} is a {type_name}" in text and f"method {method!r} cannot adapt" in text
    kind = "embedding" if target == "emb" else "conv"
    able = sorted(n for n, s in sdslora.METHODS.items() if s.layer_cls is not None and kind in s.layer_cls.layer_kinds)
    assert {"lora", "orthogonal", "pissa", "sds"} <= set(able) and method not in able
    assert str(able) in text  # the message names every method that can
    assert not any(isinstance(mod, AdapterLayer) for mod in m.modules())


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: nn.Conv2d(4, 4, 3, groups=2), r"nn.Conv2d with groups=2: sdslora cannot adapt"),
        (lambda: nn.Embedding(10, 4, max_norm=1.0), r"nn.Embedding with max_norm=1.0: sdslora cannot adapt"),
        (lambda: nn.ConvTranspose2d(4, 4, 3), r"nn.ConvTranspose2d, which sdslora cannot adapt"),
    ],
    ids=["grouped-conv", "max-norm-embedding", "conv-transpose"],
)
def test_layer_configurations_without_a_matrix_view_are_refused(build, match):
    m = nn.Sequential(build())
    with pytest.raises(TypeError, match=match):
        sdslora.attach(m, cfg("lora", ["0"]))
    assert not any(isinstance(mod, AdapterLayer) for mod in m.modules())


def test_all_linear_stays_linear():
    model = sdslora.attach(toy(), sdslora.AdapterConfig(method="sds", r=2, target_modules="all-linear"))
    assert list(model.adapter_layers()) == ["fc"]


# ---- transformers models, precision, export options -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "sds"])
def test_llama_embedding_export_loads_in_peft(tmp_path, method):
    """A transformers model's input embedding next to linear layers, trained past SDS's re-parameterisation."""
    from models import batch_for, output_of, tiny_llama

    cfgs = sdslora.AdapterConfig(method=method, r=4, alpha=4.0, target_modules=["embed_tokens", "q_proj", "v_proj"])
    model = sdslora.attach(tiny_llama(), cfgs)
    assert model.adapter_layers()["model.embed_tokens"].view.kind == "embedding"
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=30)
    for t in range(13):
        model(**batch_for("llama", seed=t)).loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    batch = batch_for("llama", seed=99)
    ours = output_of(model, batch).detach()
    assert float((ours - output_of(tiny_llama(), batch).detach()).abs().max()) > 1e-3
    model.export_peft(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    rank = 8 if method == "sds" else 4
    assert tuple(loaded.base_model.model.model.embed_tokens.lora_embedding_A["default"].shape) == (rank, 64)
    torch.testing.assert_close(output_of(loaded, batch), ours, rtol=0, atol=1e-5)


def test_tied_embedding():
    """GPT-2's input embedding is tied to its LM head: LoRA warns that merging changes both, PiSSA (which re-bases
    the weight at attach) refuses."""
    from models import tiny_gpt2

    with pytest.warns(UserWarning, match=r"'transformer.wte' shares its weight with \['lm_head.weight'\]"):
        sdslora.attach(tiny_gpt2(), sdslora.AdapterConfig(method="lora", r=2, target_modules=["wte"]))
    m = tiny_gpt2()
    with pytest.raises(ValueError, match="tied weights.*'pissa' re-bases"):
        sdslora.attach(m, sdslora.AdapterConfig(method="pissa", r=2, target_modules=["wte"]))
    assert not any(isinstance(mod, AdapterLayer) for mod in m.modules())


@pytest.mark.parametrize("method", ["lora", "sds"])
def test_bfloat16_base_float32_adapter(method):
    torch.manual_seed(0)
    base = Toy().to(torch.bfloat16)
    model = sdslora.attach(base, sdslora.AdapterConfig(method=method, r=2, target_modules=ALL))
    layers = {n: layer for n, layer in model.adapter_layers().items()}
    with torch.no_grad():
        for layer in layers.values():
            assert layer.lora_A.dtype == torch.float32
            layer.lora_B.normal_(std=0.3)
            layer.lora_A.normal_(std=0.3)
    if method == "sds":
        decouple(model)
    x = ids(2)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert all(layer.lora_A.grad is not None for layer in layers.values())
    with torch.no_grad():
        model.merge()
        torch.testing.assert_close(model(x).float(), y.float(), rtol=0.05, atol=0.05)


@pytest.mark.filterwarnings("ignore:layer 'c3'")
def test_export_max_rank_conv_and_embedding(tmp_path):
    model = _trained("sds")
    model.export_peft(tmp_path / "x", max_rank=1, dtype=torch.float64)
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert sorted(report["relative_error"]) == sorted(ALL)
    saved = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    assert tuple(saved["base_model.model.c2.lora_A.weight"].shape) == (1, 2, 3, 3)
    assert tuple(saved["base_model.model.emb.lora_embedding_B"].shape) == (8, 1)
    loaded = PeftModel.from_pretrained(toy(), tmp_path / "x")
    for name, layer in model.adapter_layers().items():  # PEFT's ΔW is the best rank-1 approximation of ours
        dw = layer.delta_weight().detach()
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        best = layer.view.to_base(s[0] * u[:, :1] @ vh[:1])
        got = loaded.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(got, best, rtol=1e-8, atol=1e-11)


# ---- diagnostics on these layer types ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "sds"])
def test_captured_full_gradient_matches_autograd_for_every_layer_type(method):
    from sdslora.diagnostics import diagnose
    from sdslora.diagnostics.capture import capture_gradients, form_gradient
    from sdslora.methods.base import matrix_view

    model = toy()
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, -2:] = PAD
    names = ["emb", "c1", "c2", "c3", "fc"]
    modules = {n: model.get_submodule(n) for n in names}

    def loss_of(m):
        return m(ids).pow(2).sum()

    _, caps, _ = capture_gradients(model, modules, lambda: loss_of(model))
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss_of(model).backward()
    for n, mod in modules.items():
        view = matrix_view(mod)
        g = form_gradient(caps[n], view.out_features, view.in_features, torch.float64, mod)
        assert torch.allclose(g, view.from_base(mod.weight.grad), rtol=1e-10, atol=1e-12), n

    adapted = sdslora.attach(toy(), sdslora.AdapterConfig(method=method, r=2, target_modules=names))
    diag = diagnose(adapted, ids, loss_fn=lambda m, b: loss_of(m))
    assert [r["name"] for r in diag.rows] == names
    assert all(math.isfinite(r["g_norm"]) and r["g_norm"] > 0 for r in diag.rows)
    assert all(-1.0 <= r["cos_g_geff"] <= 1.0 for r in diag.rows)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2),
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", stride=2),
    lambda: nn.Conv3d(2, 3, 2),
], ids=["reflect1d", "same-dilated2d", "circular2d", "plain3d"])
def test_captured_conv_gradient_with_every_padding(conv):
    from sdslora.diagnostics.capture import capture_gradients, form_gradient
    from sdslora.methods.base import matrix_view

    torch.manual_seed(0)
    mod = conv().double()
    nd = mod.weight.dim() - 2
    x = torch.randn(2, mod.in_channels, *([6] * nd), dtype=torch.float64)
    _, caps, _ = capture_gradients(mod, {"c": mod}, lambda: mod(x).pow(2).sum())
    mod.zero_grad()
    mod(x).pow(2).sum().backward()
    view = matrix_view(mod)
    g = form_gradient(caps["c"], view.out_features, view.in_features, torch.float64, mod)
    assert torch.allclose(g, view.from_base(mod.weight.grad), rtol=1e-10, atol=1e-12)
