"""LoRA-XS ("lora_xs") and LoRA-SB ("lora_sb"): initialisations against SPEC.md §3 in float64, only R trains,
trainable-parameter counts, export to PEFT and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batch_for, output_of, tiny_gpt2, tiny_llama
from torch import nn

import sdslora
from sdslora import AdapterConfig, attach
from sdslora.init import estimate_gradients
from sdslora.methods.xs import XSLayer

R = 4


def _batches(kind="llama"):
    return [batch_for(kind, seed=s) for s in range(2)]


def _linear_weight(module):
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def test_lora_xs_init_float64():
    original = tiny_llama().double()
    cfg = AdapterConfig(method="lora_xs", r=R, alpha=16, scaling="standard", adapter_dtype="base")
    model = copy.deepcopy(original)
    torch.manual_seed(7)
    adapted = attach(model, cfg)
    torch.manual_seed(7)
    for n, layer in adapted.adapter_layers().items():  # layers are built in this order, each draws one R
        w0 = original.get_submodule(n).weight.detach()
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        r_ref = torch.randn(R, R) * 1e-5
        torch.testing.assert_close(
            layer.lora_B @ layer.lora_A, u[:, :R] * s[:R] @ vh[:R], rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            layer.lora_B.T @ layer.lora_B, torch.eye(R, dtype=torch.float64), atol=1e-12, rtol=0
        )
        torch.testing.assert_close(
            layer.lora_A @ layer.lora_A.T, torch.diag(s[:R] ** 2), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(layer.lora_R, r_ref.double(), rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.base_weight, w0, rtol=0, atol=0)  # W0 not modified
        torch.testing.assert_close(
            layer.delta_weight(),
            cfg.scale * layer.lora_B @ layer.lora_R @ layer.lora_A,
            rtol=1e-12,
            atol=1e-15,
        )


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb"])
def test_only_r_trains_and_its_gradient_is_s_Bt_G_At(method):
    """One layer, float64: ∇_R = s·BᵀGAᵀ with G = ∂L/∂W; A, B get no gradient; forward equals W0x + ΔWx."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10)).double()
    x, c = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    cfg = AdapterConfig(
        method=method, r=3, alpha=2.0, scaling="standard", adapter_dtype="base", target_modules=["0"]
    )
    adapted = attach(copy.deepcopy(net), cfg, init_data=[x], init_loss=lambda m, xb: (m(xb) * c).sum())
    layer = adapted.adapter_layers()["0"]
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == ["model.0.lora_R"]
    y = adapted(x)
    torch.testing.assert_close(y, net(x) + x @ layer.delta_weight().T, rtol=1e-12, atol=1e-12)
    (y * c).sum().backward()
    g = c.T @ x  # ∂L/∂W for L = Σ c ⊙ (W x)
    torch.testing.assert_close(
        layer.lora_R.grad, cfg.scale * layer.lora_B.T @ g @ layer.lora_A.T, rtol=1e-10, atol=1e-12
    )
    assert layer.lora_A.grad is None and layer.lora_B.grad is None and not layer.lora_A.requires_grad


# alpha = r: s = 1 (recommended); s = 0.5 keeps the same ΔW; GPT-2: Conv1D layout
@pytest.mark.parametrize("alpha,kind", [(4.0, "llama"), (2.0, "gpt2")])
def test_lora_sb_init_is_rank_r_truncation_of_first_step_float64(alpha, kind):
    original = (tiny_llama() if kind == "llama" else tiny_gpt2()).double()
    batches = _batches(kind)
    eta = 3e-4
    cfg = AdapterConfig(
        method="lora_sb",
        r=R,
        alpha=alpha,
        scaling="standard",
        adapter_dtype="base",
        options={"lr_first_step": eta},
    )
    adapted = attach(copy.deepcopy(original), cfg, init_data=batches)
    names = list(adapted.adapter_layers())
    grads = estimate_gradients(copy.deepcopy(original), names, batches, reduce="sum")
    for n, layer in adapted.adapter_layers().items():
        d1 = -eta * torch.sign(grads[n])  # approximated first AdamW step
        u, s, vh = torch.linalg.svd(d1, full_matrices=False)
        d1_r = u[:, :R] * s[:R] @ vh[:R]
        torch.testing.assert_close(layer.delta_weight(), d1_r, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(layer.lora_R, torch.diag(s[:R]) / cfg.scale, rtol=1e-10, atol=1e-14)
        eye = torch.eye(R, dtype=torch.float64)
        torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            _linear_weight(layer.base_layer), _linear_weight(original.get_submodule(n)), rtol=0, atol=0
        )  # W0 not corrected
    # the model starts at W0 + (rank-r first step): merging gives exactly that
    merged = adapted.merge_and_unload()
    for n in names:
        w = _linear_weight(merged.get_submodule(n))
        assert not torch.equal(w, _linear_weight(original.get_submodule(n)))


def test_trainable_parameter_counts_r_squared_vs_lora():
    counts = {}
    for method in ("lora", "lora_xs", "lora_sb"):
        cfg = AdapterConfig(method=method, r=R, alpha=R, scaling="standard")
        adapted = attach(tiny_llama(), cfg, init_data=_batches())
        layers = adapted.adapter_layers()
        counts[method] = adapted.trainable_summary()["trainable"]
        if method == "lora":
            assert counts[method] == sum(R * (lay.in_features + lay.out_features) for lay in layers.values())
        else:
            assert counts[method] == len(layers) * R * R
    assert counts["lora_xs"] == counts["lora_sb"]
    ratio = counts["lora"] / counts["lora_sb"]
    print(
        f"tiny llama r={R}: LoRA {counts['lora']} vs LoRA-SB/XS {counts['lora_sb']} trainable, ratio {ratio:.1f}"
    )
    assert ratio == pytest.approx(
        sum((lay.in_features + lay.out_features) for lay in layers.values()) / (len(layers) * R)
    )


@pytest.mark.parametrize(
    "method,kind", [("lora_xs", "gpt2"), ("lora_sb", "llama")]
)  # all pairs: test_checklist
def test_export_peft_save_load_merge(tmp_path, method, kind):
    from peft import PeftModel

    make = tiny_llama if kind == "llama" else tiny_gpt2
    original = make()
    cfg = AdapterConfig(
        method=method,
        r=R,
        alpha=R,
        scaling="standard",
        options={"init_std": 1e-2} if method == "lora_xs" else {"lr_first_step": 1e-2},
    )
    adapted = attach(copy.deepcopy(original), cfg, init_data=_batches(kind))
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    for s in range(2):
        adapted(**batch_for(kind, seed=10 + s)).loss.backward()
        opt.step()
        opt.zero_grad()
    b = batch_for(kind, seed=3)
    with torch.no_grad():
        out = output_of(adapted, b)
        assert not torch.allclose(out, output_of(original, b), atol=1e-4)
        adapted.merge()
        torch.testing.assert_close(output_of(adapted, b), out, rtol=1e-5, atol=1e-5)
        adapted.unmerge()
    for layer in adapted.adapter_layers().values():
        bb, aa = layer.export_lora()
        assert bb.shape[1] == R
        torch.testing.assert_close(bb @ aa, layer.delta_weight(), rtol=1e-5, atol=1e-7)

    adapted.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output_of(peft_model, b), out, rtol=1e-5, atol=1e-5)

    adapted.save_adapter(tmp_path / "native")
    torch.manual_seed(12345)
    loaded = sdslora.load_adapter(copy.deepcopy(original), tmp_path / "native")  # no init data needed
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, b), out, rtol=0, atol=1e-6)
    assert all(isinstance(lay, XSLayer) for lay in loaded.adapter_layers().values())


def test_lora_sb_without_data_and_bad_options():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LoRA-SB .*needs init_data: a few batches of training data"):
        attach(model, AdapterConfig(method="lora_sb", r=R))
    assert not any(isinstance(m, XSLayer) for m in model.modules())
    attach(tiny_llama(), AdapterConfig(method="lora_xs", r=R), init_data=None)  # LoRA-XS needs no data
    with pytest.raises(ValueError, match="lr_first_step"):
        AdapterConfig(method="lora_sb", options={"lr_first_step": 0})
    with pytest.raises(ValueError, match="svd"):
        AdapterConfig(method="lora_xs", options={"svd": "qr"})


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb"])
def test_lowrank_svd_option_exact_on_rank_r_matrices(method):
    """svd="lowrank" (the authors' torch.svd_lowrank(q=r)) recovers a matrix of rank exactly r."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(16, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64))
    x = torch.randn(4, 20, dtype=torch.float64)
    cfg = AdapterConfig(
        method=method,
        r=3,
        alpha=3,
        scaling="standard",
        adapter_dtype="base",
        target_modules=["0"],
        options={"svd": "lowrank", "svd_niter": 2},
    )
    # LoRA-SB: a loss whose gradient sign pattern has rank 1 (G = c xᵀ with one input row, sign(G) = sign(c) sign(x)ᵀ)
    c = torch.randn(16, dtype=torch.float64)
    adapted = attach(copy.deepcopy(net), cfg, init_data=[x[:1]], init_loss=lambda m, xb: (m(xb) @ c).sum())
    layer = adapted.adapter_layers()["0"]
    if method == "lora_xs":
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, net[0].weight, rtol=1e-10, atol=1e-10)
    else:
        target = -1e-4 * torch.outer(torch.sign(c), torch.sign(x[0]))
        torch.testing.assert_close(layer.delta_weight(), target, rtol=1e-10, atol=1e-12)
