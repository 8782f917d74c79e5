"""Optimizer-side methods (sdslora.optim): registry and errors, cross-checks against PEFT, float64 identities,
hand computations, state round trips, Controller resets, gradient accumulation, bf16 bases and the HF Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import batch_for, tiny_bert_cls, tiny_llama
from torch import nn

import sdslora
from sdslora.optim import OPTIMIZERS, AltLoRA, build_optimizer, lora_pro_gradients, riemannian_gradients

LORA_NAMES = ["loraplus", "scaled_adamw", "lora_pro", "altlora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(seed: int = 0, r: int = 4, dtype: torch.dtype | None = None, nonzero_b: bool = True, **cfg):
    base = tiny_llama(seed)
    if dtype is not None:
        base = base.to(dtype)
    model = sdslora.attach(base, sdslora.AdapterConfig(method="lora", r=r, target_modules=TARGETS, **cfg))
    if nonzero_b:  # B = 0 makes every preconditioner trivial: start from a generic point
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.adapter_layers().values():
                layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    return model


def train_steps(model, opt, n: int, kind: str = "llama", seed: int = 0) -> list[float]:
    losses = []
    for i in range(n):
        loss = model(**batch_for(kind, seed=seed + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_trainable_parameters()}


def assert_params_close(a: dict, b: dict, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ---- registry, pairing, errors ------------------------------------------------------------------------------------
def test_registry_names_and_unknown():
    assert set(OPTIMIZERS) == {"adamw", "loraplus", "scaled_adamw", "lora_pro", "altlora"}
    assert sdslora.build_optimizer is build_optimizer
    model = lora_llama()
    with pytest.raises(ValueError, match="available optimizers.*altlora"):
        build_optimizer(model, "lion")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ratio'\].*loraplus_lr_ratio"):
        build_optimizer(model, "loraplus", ratio=4)
    with pytest.raises(ValueError, match="takes no options"):
        build_optimizer(model, "adamw", delta=1.0)
    with pytest.raises(ValueError, match="delta"):
        build_optimizer(model, "scaled_adamw", delta=-1.0)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model, "lora_pro", betas=(0.9, 1.5))


def test_pairs_are_explicit_and_others_plain():
    model = sdslora.attach(
        tiny_bert_cls(),
        sdslora.AdapterConfig(
            method="lora", r=2, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    )
    layers = model.adapter_layers()
    head = {id(p) for p in model.model.classifier.parameters()}
    for name in ("scaled_adamw", "lora_pro", "altlora"):
        opt = build_optimizer(model, name)
        pair_groups = [g for g in opt.param_groups if g["role"] == "pair"]
        assert [g["layer"] for g in pair_groups] == list(layers)
        for g in pair_groups:
            layer = layers[g["layer"]]
            assert g["params"][0] is layer.lora_A and g["params"][1] is layer.lora_B
            assert g["scale"] == layer.scale
        (other,) = [g for g in opt.param_groups if g["role"] == "other"]
        assert {id(p) for p in other["params"]} == head
    held = [id(p) for g in build_optimizer(model, "loraplus").param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.trainable_parameters())


@pytest.mark.parametrize("name", LORA_NAMES)
def test_rejects_models_without_lora_pairs(name):
    full = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="full"))
    with pytest.raises(ValueError, match=f"optimizer '{name}' needs LoRA.*'full'"):
        build_optimizer(full, name)
    sds = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=2))
    with pytest.raises(ValueError, match=f"optimizer '{name}' needs LoRA-style.*'sds'.*SDSLayer"):
        build_optimizer(sds, name)
    xs = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="lora_xs", r=2))
    with pytest.raises(ValueError, match=f"optimizer '{name}' needs LoRA-style.*'lora_xs'"):
        build_optimizer(xs, name)
    with pytest.raises(TypeError, match="sdslora.attach"):
        build_optimizer(tiny_llama(), name)
    # plain AdamW works for every method
    assert len(build_optimizer(sds, "adamw").param_groups[0]["params"]) == len(sds.trainable_parameters())


# ---- LoRA+ against PEFT -------------------------------------------------------------------------------------------
def test_loraplus_groups_match_peft():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    ours = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="lora", r=4, target_modules=TARGETS))
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=TARGETS)
    )
    lr, ratio, wd = 1e-3, 16.0, 0.01
    popt = create_loraplus_optimizer(
        peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd
    )
    oopt = build_optimizer(ours, "loraplus", lr=lr, weight_decay=wd, loraplus_lr_ratio=ratio)
    assert type(oopt) is type(popt) is torch.optim.AdamW

    def table(opt, model, rename):
        names = {id(p): rename(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    peft_t = table(
        popt, peft_model, lambda n: n.removeprefix("base_model.model.").removesuffix(".default.weight")
    )
    ours_t = table(oopt, ours.model, lambda n: n)
    assert len(ours_t) == 2 * 7 * 2  # 2 decoder layers x 7 targets x (A, B)
    assert ours_t == peft_t
    assert {v for k, v in ours_t.items() if k.endswith("lora_B")} == {(lr * ratio, wd)}


def test_loraplus_accepts_dora_the_others_reject_it():
    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="dora", r=2, target_modules=["q_proj"]))
    opt = build_optimizer(model, "loraplus", lr=1e-3, loraplus_lr_ratio=8.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for layer in model.adapter_layers().values():
        assert lr_of[id(layer.lora_A)] == 1e-3 and lr_of[id(layer.lora_B)] == 8e-3
        assert lr_of[id(layer.lora_magnitude_vector)] == 1e-3
    assert len(lr_of) == len(model.trainable_parameters())
    for name in ("scaled_adamw", "lora_pro", "altlora"):
        with pytest.raises(ValueError, match="'dora'.*DoRALayer"):
            build_optimizer(model, name)


# ---- ScaledAdamW ----------------------------------------------------------------------------------------------------
def test_scaled_adamw_matches_peft_riemannian():
    """PEFT's create_riemannian_optimizer(AdamW, reg=δ) = our default (bias-corrected, pre-update A) in float64."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_riemannian_optimizer

    ours = lora_llama(seed=3).double()
    peft_model = get_peft_model(
        tiny_llama(3).double(), LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=TARGETS)
    )
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            for f in ("lora_A", "lora_B"):
                peft_params[f"base_model.model.{name}.{f}.default.weight"].copy_(getattr(layer, f))
    kw = dict(lr=1e-2, weight_decay=0.1, eps=1e-8, betas=(0.9, 0.99))
    oopt = build_optimizer(ours, "scaled_adamw", delta=1e-6, **kw)
    popt = create_riemannian_optimizer(peft_model, torch.optim.AdamW, reg=1e-6, **kw)
    start = adapter_params(ours)
    for i in range(3):
        for model, opt in ((ours, oopt), (peft_model, popt)):
            model(**batch_for("llama", seed=i)).loss.backward()
            opt.step()
            opt.zero_grad()
    moved = 0.0
    for name, layer in ours.adapter_layers().items():
        for f in ("lora_A", "lora_B"):
            p = peft_params[f"base_model.model.{name}.{f}.default.weight"]
            torch.testing.assert_close(getattr(layer, f), p, rtol=1e-9, atol=1e-10)
            moved = max(moved, float((p.detach() - start[f"{name}.{f}"]).abs().max()))
    assert moved > 1e-3


def test_scaled_sgd_step_is_scaled_gradient_descent():
    """Float64, SGD, δ = 0: s(B ĝ_A + ĝ_B A) = s²(P_B G + G P_A), with ∇_A, ∇_B from autograd through a layer."""
    torch.manual_seed(0)
    m, n, r, s = 9, 7, 3, 1.7
    layer = sdslora.methods.LoRALayer(nn.Linear(n, m, dtype=torch.float64), r, s, 0.0, "base", None)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(m, r, dtype=torch.float64))
    x, R = torch.randn(5, n, dtype=torch.float64), torch.randn(5, m, dtype=torch.float64)
    (layer(x) * R).sum().backward()
    G = R.T @ x  # ∂L/∂W
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(layer.lora_A.grad, s * B.T @ G)
    gA, gB = riemannian_gradients(A, B, layer.lora_A.grad, layer.lora_B.grad, delta=0.0)
    P_B = B @ torch.linalg.solve(B.T @ B, B.T)
    P_A = A.T @ torch.linalg.solve(A @ A.T, A)
    torch.testing.assert_close(s * (B @ gA + gB @ A), s**2 * (P_B @ G + G @ P_A), rtol=1e-10, atol=1e-10)


def _adam_ref(p, g, st, lr, betas, eps, wd, correct_bias=True):
    b1, b2 = betas
    st["t"] = st.get("t", 0) + 1
    st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
    st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    c1, c2 = (1 - b1 ** st["t"], 1 - b2 ** st["t"]) if correct_bias else (1.0, 1.0)
    return p * (1 - lr * wd) - lr / c1 * st["m"] / ((st["v"] / c2).sqrt() + eps)


def single_layer_model(m=6, n=5, r=2, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n, m))
    model = sdslora.attach(
        base, sdslora.AdapterConfig(method="lora", r=r, alpha=3.0, target_modules=["0"])
    ).double()
    layer = model.adapter_layers()["0"]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(m, r, dtype=torch.float64))
    return model, layer


@pytest.mark.parametrize("correct_bias,sequential", [(True, False), (False, True)])
def test_scaled_adamw_hand_computation(correct_bias, sequential):
    model, layer = single_layer_model()
    hp = dict(lr=0.05, betas=(0.8, 0.9), eps=1e-8, wd=0.1)
    opt = build_optimizer(
        model,
        "scaled_adamw",
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
        correct_bias=correct_bias,
        sequential=sequential,
        delta=1e-6,
    )
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    sa, sb = {}, {}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        dA, dB = (
            torch.randn(A.shape, generator=g, dtype=A.dtype),
            torch.randn(B.shape, generator=g, dtype=A.dtype),
        )
        layer.lora_A.grad, layer.lora_B.grad = dA.clone(), dB.clone()
        opt.step()
        eye = torch.eye(2, dtype=A.dtype)
        hA = torch.linalg.inv(B.T @ B + 1e-6 * eye) @ dA
        A_new = _adam_ref(A, hA, sa, hp["lr"], hp["betas"], hp["eps"], hp["wd"], correct_bias)
        A_pre = A_new if sequential else A
        hB = dB @ torch.linalg.inv(A_pre @ A_pre.T + 1e-6 * eye)
        B = _adam_ref(B, hB, sb, hp["lr"], hp["betas"], hp["eps"], hp["wd"], correct_bias)
        A = A_new
        torch.testing.assert_close(layer.lora_A.detach(), A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.detach(), B, rtol=1e-10, atol=1e-12)


# ---- LoRA-Pro -----------------------------------------------------------------------------------------------------
def _tangent_projection(G, A, B):
    P_B = B @ torch.linalg.solve(B.T @ B, B.T)
    P_A = A.T @ torch.linalg.solve(A @ A.T, A)
    eye_m, eye_n = torch.eye(G.shape[0], dtype=G.dtype), torch.eye(G.shape[1], dtype=G.dtype)
    return G - (eye_m - P_B) @ G @ (eye_n - P_A)


def test_lora_pro_equivalent_gradient_is_tangent_projection():
    g = torch.Generator().manual_seed(0)
    m, n, r, s = 10, 8, 3, 0.7
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    dA, dB = s * B.T @ G, s * G @ A.T
    gA, gB, X = lora_pro_gradients(A, B, dA, dB, s, delta=0.0)
    torch.testing.assert_close(s * (B @ gA + gB @ A), _tangent_projection(G, A, B), rtol=1e-10, atol=1e-10)
    # X solves the Sylvester equation
    rhs = -(1 / s**2) * torch.linalg.solve(B.T @ B, dA) @ A.T
    torch.testing.assert_close(B.T @ B @ X + X @ A @ A.T, rhs, rtol=1e-10, atol=1e-10)
    # ... and minimises ‖g_A − ∇_A‖² + ‖g_B − ∇_B‖² over X (brute-force least squares over the r² entries)
    gA0, gB0 = gA - X @ A, gB + B @ X
    cols = []
    for k in range(r * r):
        E = torch.zeros(r * r, dtype=torch.float64)
        E[k] = 1.0
        E = E.view(r, r)
        cols.append(torch.cat([(E @ A).flatten(), (-B @ E).flatten()]))
    target = torch.cat([(dA - gA0).flatten(), (dB - gB0).flatten()])
    X_ls = torch.linalg.lstsq(torch.stack(cols, 1), target[:, None]).solution.view(r, r)
    torch.testing.assert_close(X, X_ls, rtol=1e-8, atol=1e-10)
    f = lambda Y: ((gA0 + Y @ A - dA) ** 2).sum() + ((gB0 - B @ Y - dB) ** 2).sum()  # noqa: E731
    assert f(X) < f(X + 1e-3 * torch.randn(r, r, generator=g, dtype=torch.float64))
    # the default δ = 1e-8 barely changes anything on a well-conditioned pair
    gA8, gB8, _ = lora_pro_gradients(A, B, dA, dB, s)
    torch.testing.assert_close(s * (B @ gA8 + gB8 @ A), _tangent_projection(G, A, B), rtol=1e-6, atol=1e-7)


def test_lora_pro_first_step_b_zero():
    g = torch.Generator().manual_seed(2)
    m, n, r, s = 7, 9, 2, 2.0
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.zeros(m, r, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    dA, dB = s * B.T @ G, s * G @ A.T
    gA, gB, _ = lora_pro_gradients(A, B, dA, dB, s, delta=0.0)
    torch.testing.assert_close(gA, dA)
    torch.testing.assert_close(gB, dB @ torch.linalg.inv(A @ A.T) / s**2)
    P_A = A.T @ torch.linalg.solve(A @ A.T, A)
    torch.testing.assert_close(s * (B @ gA + gB @ A), G @ P_A, rtol=1e-10, atol=1e-10)  # = G* when B = 0


def test_lora_pro_optimizer_uses_layer_scale():
    model, layer = single_layer_model()
    opt = build_optimizer(model, "lora_pro", lr=0.01, betas=(0.5, 0.9))
    dA, dB = torch.randn_like(layer.lora_A), torch.randn_like(layer.lora_B)
    layer.lora_A.grad, layer.lora_B.grad = dA.clone(), dB.clone()
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    opt.step()
    gA, gB, _ = lora_pro_gradients(A0, B0, dA, dB, layer.scale, 1e-8)
    assert layer.scale == 3.0 / math.sqrt(2)
    st_a, st_b = {}, {}
    torch.testing.assert_close(layer.lora_A.detach(), _adam_ref(A0, gA, st_a, 0.01, (0.5, 0.9), 1e-8, 0.0))
    torch.testing.assert_close(layer.lora_B.detach(), _adam_ref(B0, gB, st_b, 0.01, (0.5, 0.9), 1e-8, 0.0))


# ---- AltLoRA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", [True, False])
def test_altlora_hand_computation(transport):
    model, layer = single_layer_model(m=7, n=5, r=3, seed=4)
    lr, (b1, b2), eps, wd, d = 0.03, (0.9, 0.95), 1e-8, 0.05, 1e-6
    opt = build_optimizer(
        model, "altlora", lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, transport=transport
    )
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    eye = torch.eye(3, dtype=A.dtype)
    mA, vA, mB, vB = (torch.zeros_like(A), torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(B))
    B_prev = A_prev = None
    g = torch.Generator().manual_seed(5)
    for t in range(1, 4):
        dA, dB = (
            torch.randn(A.shape, generator=g, dtype=A.dtype),
            torch.randn(B.shape, generator=g, dtype=A.dtype),
        )
        layer.lora_A.grad, layer.lora_B.grad = dA.clone(), dB.clone()
        opt.step()
        c1, c2 = 1 - b1**t, 1 - b2**t
        # A with B_t fixed
        PB = torch.linalg.inv(B.T @ B + d * eye)
        hA = PB @ dA
        TA = PB @ B.T @ B_prev if (transport and B_prev is not None) else eye
        mA = b1 * TA @ mA + (1 - b1) * hA
        vA = b2 * vA + (1 - b2) * hA**2
        B_prev = B.clone()
        A = A * (1 - lr * wd) - lr / c1 * mA / ((vA / c2).sqrt() + eps)
        # B with the new A fixed, gradient of the same backward
        PA = torch.linalg.inv(A @ A.T + d * eye)
        hB = dB @ PA
        TB = A_prev @ A.T @ PA if (transport and A_prev is not None) else eye
        mB = b1 * mB @ TB + (1 - b1) * hB
        vB = b2 * vB + (1 - b2) * hB**2
        A_prev = A.clone()
        B = B * (1 - lr * wd) - lr / c1 * mB / ((vB / c2).sqrt() + eps)
        torch.testing.assert_close(layer.lora_A.detach(), A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.detach(), B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[layer.lora_A]["exp_avg"], mA)
    torch.testing.assert_close(opt.state[layer.lora_B]["exp_avg"], mB)


# ---- every optimizer: state round trip, Controller reset, modules_to_save, bf16, accumulation, Trainer ----------
@pytest.mark.parametrize("name", LORA_NAMES)
def test_state_dict_round_trip(name):
    model = lora_llama(seed=1)
    opt = build_optimizer(model, name, lr=1e-2, weight_decay=0.01)
    train_steps(model, opt, 2)
    saved_params = {n: p.detach().clone() for n, p in model.model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, 1, seed=2)
    expected = adapter_params(model)

    model2 = lora_llama(seed=1)
    model2.model.load_state_dict(saved_params)
    opt2 = build_optimizer(model2, name, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved_opt)
    train_steps(model2, opt2, 1, seed=2)
    assert_params_close(adapter_params(model2), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_controller_reset_reinitialises_lazily(name):
    model = lora_llama(seed=2)
    opt = build_optimizer(model, name, lr=1e-2)
    train_steps(model, opt, 2)
    start = {n: p.detach().clone() for n, p in model.model.state_dict().items()}
    ctl = sdslora.Controller(model, opt)
    ctl.reset_optimizer_state(model.trainable_parameters())
    assert len(opt.state) == 0
    train_steps(model, opt, 1, seed=5)
    after_reset = adapter_params(model)

    fresh = lora_llama(seed=2)
    fresh.model.load_state_dict(start)
    train_steps(fresh, build_optimizer(fresh, name, lr=1e-2), 1, seed=5)
    assert_params_close(after_reset, adapter_params(fresh), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["scaled_adamw", "lora_pro", "altlora"])
def test_other_parameters_get_plain_adamw(name):
    model = sdslora.attach(
        tiny_bert_cls(),
        sdslora.AdapterConfig(
            method="lora", r=2, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    )
    head = list(model.model.classifier.parameters())
    ref_params = [p.detach().clone().requires_grad_(True) for p in head]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, name, lr=1e-2, weight_decay=0.1)
    for i in range(3):
        model(**batch_for("bert", seed=i)).loss.backward()
        for rp, p in zip(ref_params, head):
            rp.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    for rp, p in zip(ref_params, head):
        torch.testing.assert_close(p, rp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_float32_adapter_on_bf16_base(name):
    model = lora_llama(seed=0, dtype=torch.bfloat16)
    layer = next(iter(model.adapter_layers().values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    opt = build_optimizer(model, name, lr=1e-2)
    before = adapter_params(model)
    losses = train_steps(model, opt, 6, seed=0)
    after = adapter_params(model)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert opt.state[layer.lora_A]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("name", ["lora_pro", "altlora"])
def test_gradient_accumulation_equivalence(name):
    full = batch_for("llama", seed=7, n=4)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    results = []
    for batches, weight in (([full], 1.0), (halves, 0.5)):
        model = lora_llama(seed=6)
        opt = build_optimizer(model, name, lr=1e-2)
        for b in batches:
            (weight * model(**b).loss).backward()
        opt.step()
        results.append(adapter_params(model))
    assert_params_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    start = adapter_params(lora_llama(seed=6))
    assert any(not torch.allclose(start[k], results[0][k]) for k in start)


def _trainer_args(tmp_path, steps):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )


def _trainer_data():
    batch = batch_for("llama", seed=0, n=8)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in batch["input_ids"]]


def test_hf_trainer_with_our_optimizer(tmp_path):
    from transformers import Trainer

    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="lora", r=4, target_modules=TARGETS))
    opt = sdslora.build_optimizer(model, "lora_pro", lr=1e-2)
    trainer = Trainer(
        model=model, args=_trainer_args(tmp_path, 12), train_dataset=_trainer_data(), optimizers=(opt, None)
    )
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05


def test_hf_trainer_optimizer_cls_and_kwargs(tmp_path):
    """The optimizer classes take the model first, so the Trainer's ``{"model": model}`` convention builds them."""
    from transformers import Trainer

    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="lora", r=4, target_modules=TARGETS))
    start = adapter_params(model)
    trainer = Trainer(
        model=model,
        args=_trainer_args(tmp_path, 2),
        train_dataset=_trainer_data(),
        optimizer_cls_and_kwargs=(AltLoRA, {"model": model, "lr": 1e-2, "transport": True}),
    )
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, AltLoRA) and inner.param_groups[0]["lr"] == 1e-2
    layer = next(iter(model.adapter_layers().values()))
    assert inner.state[layer.lora_A]["step"] == 2
    after = adapter_params(model)
    assert all(not torch.equal(start[k], after[k]) for k in start)
