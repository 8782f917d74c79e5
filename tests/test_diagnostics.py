"""diagnose() on tiny transformers models: captured G, closed forms end to end, model left untouched, one G at a
time, the paper's mechanism claim (SDS-LoRA vs LoRA from a skewed start), the recorder, the Trainer callback."""

from __future__ import annotations

import copy
import json
import math
import weakref

import pytest
import torch
from models import batch_for, tiny_bert_cls, tiny_gpt2, tiny_llama

import sdslora
from sdslora.diagnostics import (
    SUMMARY_KEYS,
    DiagnosticsRecorder,
    capture_gradients,
    cosine,
    diagnose,
    form_gradient,
    read_history,
)
from sdslora.diagnostics import probe as probe_mod
from sdslora.methods.base import layer_dims

D = torch.float64


def _adapted(
    kind: str,
    method: str = "lora",
    r: int = 4,
    dtype=torch.float32,
    seed: int = 0,
    targets="all-linear",
    **cfg,
):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}[kind](seed).to(dtype)
    ad = "base" if dtype == D else "float32"
    adapted = sdslora.attach(
        model, sdslora.AdapterConfig(method=method, r=r, target_modules=targets, adapter_dtype=ad, **cfg)
    )
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in adapted.adapter_layers().values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return adapted


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_captured_g_equals_autograd_weight_gradient(kind: str) -> None:
    adapted = _adapted(kind, dtype=D)
    batch = batch_for(kind)
    # reference: same model with the base weights as leaves; W = W0 + ΔW so ∂L/∂W0 = ∂L/∂W = G
    ref = copy.deepcopy(adapted)
    for layer in ref.adapter_layers().values():
        layer.base_weight.requires_grad_(True)
    ref.model(**batch).loss.backward()
    layers = adapted.adapter_layers()
    loss, caps, _ = capture_gradients(adapted, layers, lambda: adapted.model(**batch).loss)
    for name, layer in layers.items():
        n_in, n_out = layer_dims(layer.base_layer)
        g = form_gradient(caps[name], n_out, n_in, D)
        w_grad = ref.adapter_layers()[name].base_weight.grad
        expect = w_grad.T if layer.fan_in_fan_out else w_grad
        assert torch.allclose(g, expect, rtol=1e-10, atol=1e-13), name


def test_diagnose_closed_forms_end_to_end_lora_and_sds() -> None:
    batch = batch_for("llama")
    for method in ("lora", "sds"):
        adapted = _adapted("llama", method=method, dtype=D)
        if method == "sds":
            for layer in adapted.adapter_layers().values():
                layer.reparameterise(False)
        ref = copy.deepcopy(adapted)
        for layer in ref.adapter_layers().values():
            layer.base_weight.requires_grad_(True)
        ref.model(**batch).loss.backward()
        diag = diagnose(adapted, batch)
        for row in diag.rows:
            layer = adapted.adapter_layers()[row["name"]]
            G = ref.adapter_layers()[row["name"]].base_weight.grad
            G = G.T if layer.fan_in_fan_out else G
            s = layer.scale
            if method == "lora":
                A, B = layer.lora_A.detach(), layer.lora_B.detach()
                geff = s**2 * (G @ A.T @ A + B @ B.T @ G)
                pb = B @ torch.linalg.pinv(B)
                pa = torch.linalg.pinv(A) @ A
            else:
                qa, qb = layer.lora_QA.T, layer.lora_QB
                geff = s**2 * (G @ qa @ qa.T + qb @ qb.T @ G)
                pb, pa = qb @ qb.T, qa @ qa.T
            gstar = G - (torch.eye(G.shape[0], dtype=D) - pb) @ G @ (torch.eye(G.shape[1], dtype=D) - pa)
            assert row["cos_g_geff"] == pytest.approx(cosine(G, geff), abs=1e-10)
            assert row["cos_geff_gstar"] == pytest.approx(cosine(geff, gstar), abs=1e-10)
            assert row["cos_g_gstar"] == pytest.approx(float(gstar.norm() / G.norm()), abs=1e-10)
            sv = torch.linalg.svdvals(G)
            assert row["cos_g_gr"] == pytest.approx(float(sv[:4].norm() / sv.norm()), abs=1e-10)
        if method == "sds":  # the SDS effective gradient lies inside the tangent space: cos(G̃, G*) close to 1
            assert diag.summary["cos_geff_gstar"] > 0.7


def _snapshot(model: torch.nn.Module):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {
            n: (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()
        },
    )


def _assert_same(a, b) -> None:
    params, grads, flags, modes, hooks = a
    params2, grads2, flags2, modes2, hooks2 = b
    for n in params:
        assert torch.equal(params[n], params2[n]), n
        assert (grads[n] is None) == (grads2[n] is None), n
        if grads[n] is not None:
            assert torch.equal(grads[n], grads2[n]), n
    assert flags == flags2 and modes == modes2 and hooks == hooks2


def test_diagnose_leaves_the_model_unchanged_also_on_error() -> None:
    adapted = _adapted("bert", modules_to_save=["classifier"])
    adapted.train()
    adapted.model.bert.encoder.layer[0].eval()  # a mixed mode must come back as it was
    batch = batch_for("bert")
    adapted.model(**batch).loss.backward()  # pre-existing .grad on the trainable tensors
    before = _snapshot(adapted)
    diag = diagnose(adapted, batch, optimizer=torch.optim.AdamW(adapted.trainable_parameters()))
    assert set(SUMMARY_KEYS) | {"loss", "cos_g_geff_opt"} <= set(diag.summary)
    _assert_same(before, _snapshot(adapted))

    def bad_loss(model, b):
        model(**b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        diagnose(adapted, batch, loss_fn=bad_loss)
    _assert_same(before, _snapshot(adapted))
    with pytest.raises(ValueError, match="not finite"):
        diagnose(adapted, batch, loss_fn=lambda m, b: m(**b).loss * float("nan"))
    _assert_same(before, _snapshot(adapted))
    adapted.merge()
    with pytest.raises(ValueError, match="unmerge"):
        diagnose(adapted, batch)


def test_g_is_materialised_one_layer_at_a_time(monkeypatch) -> None:
    adapted = _adapted("llama")
    alive: list[weakref.ref] = []
    seen: list[int] = []
    form, row = probe_mod._form_g, probe_mod._layer_row

    def counting_form(*a, **k):
        g = form(*a, **k)
        alive.append(weakref.ref(g))
        return g

    def counting_row(*a, **k):
        seen.append(sum(r() is not None for r in alive))
        return row(*a, **k)

    monkeypatch.setattr(probe_mod, "_form_g", counting_form)
    monkeypatch.setattr(probe_mod, "_layer_row", counting_row)
    diag = diagnose(adapted, batch_for("llama"))
    n = len(adapted.adapter_layers())
    assert len(seen) == n == len(diag.rows) and max(seen) == 1
    assert all(r() is None for r in alive)


def _skew(layer, ratio: float = 0.25) -> None:
    geo = ratio ** torch.arange(layer.r, dtype=layer.lora_A.dtype)
    g = torch.Generator().manual_seed(layer.in_features * 7 + layer.out_features)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * geo[:, None] * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * geo[None, :] * 0.3)


def test_sds_aligns_better_than_lora_from_a_skewed_start() -> None:
    """The paper's mechanism claim (SPEC.md §5, Fig. 3): same ΔW, same probe, SDS's effective gradient is better
    aligned with G and its factor gradients have a higher effective rank than LoRA's."""
    torch.manual_seed(0)
    lora = _adapted("llama", method="lora")
    for layer in lora.adapter_layers().values():
        _skew(layer)
    opt = torch.optim.AdamW(lora.trainable_parameters(), lr=1e-3)
    for step in range(3):
        opt.zero_grad()
        lora.model(**batch_for("llama", seed=10 + step)).loss.backward()
        opt.step()
    sds = _adapted("llama", method="sds")
    for name, layer in sds.adapter_layers().items():
        src = lora.adapter_layers()[name]
        with torch.no_grad():
            layer.lora_A.copy_(src.lora_A)
            layer.lora_B.copy_(src.lora_B)
        layer.reparameterise(False)  # ΔW unchanged, bases from the SVD of B A
        assert torch.allclose(layer.delta_weight(), src.delta_weight(), atol=1e-6)
    probe = batch_for("llama", seed=99, n=8)
    d_lora, d_sds = diagnose(lora, probe), diagnose(sds, probe)
    assert d_lora.summary["loss"] == pytest.approx(d_sds.summary["loss"], rel=1e-5)
    assert d_sds.summary["cos_g_geff"] > d_lora.summary["cos_g_geff"] + 0.05
    er = {
        k: (d.summary["erank_grad_A"] + d.summary["erank_grad_B"]) / 2
        for k, d in (("lora", d_lora), ("sds", d_sds))
    }
    assert er["sds"] > er["lora"] + 0.5
    assert d_sds.summary["cos_geff_gstar"] > d_lora.summary["cos_geff_gstar"]
    assert d_lora.summary["kappa_A"] > 10  # the skew is visible in the factors


def test_full_finetuning_and_plain_model() -> None:
    model = tiny_llama(0)
    full = sdslora.attach(model, sdslora.AdapterConfig(method="full"))
    diag = diagnose(full, batch_for("llama"), layers=["model.layers.0.mlp.up_proj"], rank=3)
    (row,) = diag.rows
    assert row["cos_g_geff"] == pytest.approx(1.0) and row["cos_g_gstar"] == 1.0
    assert math.isnan(row["kappa_A"]) and diag.summary["kappa_A"] is None
    # a plain (un-attached) GPT-2 with Conv1D layers, Adam direction against the true update
    plain = tiny_gpt2(0)
    for p in plain.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    d = diagnose(plain, batch_for("gpt2"), optimizer=opt, layers=["transformer.h.0.attn.c_attn"])
    assert 0.0 < d.summary["cos_g_geff_opt"] < 1.0  # Adam's first step ~ sign(G)
    with pytest.raises(ValueError, match="no diagnosable layer"):
        diagnose(plain, batch_for("gpt2"), layers=["nope"])


def test_unsupported_optimizer_says_sgd_direction_only() -> None:
    adapted = _adapted("llama", targets=["v_proj"])
    opt = torch.optim.RMSprop(adapted.trainable_parameters())
    with pytest.warns(UserWarning, match="SGD direction only"):
        diag = diagnose(adapted, batch_for("llama"), optimizer=opt)
    assert "cos_g_geff_opt" not in diag.summary and diag.summary["cos_g_geff"] is not None


def test_recorder_writes_jsonl_with_controller_events(tmp_path) -> None:
    adapted = _adapted(
        "llama",
        method="sds",
        targets=["q_proj", "up_proj"],
        options={"warmup_steps": 2, "refresh": "every:1"},
    )
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-3)
    ctl = sdslora.Controller(adapted, opt, total_steps=6)
    path = tmp_path / "diag.jsonl"
    rec = DiagnosticsRecorder(adapted, batch_for("llama", seed=5), every=2, path=path, optimizer=opt)
    calls = 0
    for step in range(1, 7):
        opt.zero_grad()
        adapted.model(**batch_for("llama", seed=step)).loss.backward()
        opt.step()
        ctl.step()
        calls += rec.maybe_record(step) is not None
    assert calls == 3
    records = read_history(path)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert set(SUMMARY_KEYS) | {"loss", "cos_g_geff_opt"} <= set(records[0]["summary"])
    assert len(records[0]["layers"]) == len(adapted.adapter_layers())
    all_events = [e for r in records for e in r["events"]]
    assert all_events == json.loads(json.dumps(ctl.events))  # every event surfaced exactly once
    assert records[0]["events"][0]["event"] == "reparameterise"
    assert any("sim_A_mean" in e for e in records[1]["events"])
    assert records == rec.records
    with pytest.raises(ValueError, match="every"):
        DiagnosticsRecorder(adapted, None, every=0)


def test_plot_history(tmp_path) -> None:
    from sdslora.diagnostics import plot_history

    recs = [
        {
            "step": s,
            "summary": {"cos_g_geff": 0.1 * s, "stable_rank_A": 3 - 0.1 * s},
            "events": [
                {"step": s, "event": "refresh", "sim_A_mean": 0.9, "sim_B_mean": 0.95, "jump_mean": 0.1}
            ],
        }
        for s in (1, 2, 3)
    ]
    paths = plot_history({"lora": recs, "sds": recs[:2]}, tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {"alignment.png", "stable_rank.png", "basis_similarity.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("method", sorted(sdslora.METHODS))
def test_every_registered_method_is_diagnosable(method: str) -> None:
    """The generic path (hooks + JVP through delta_weight) works for any AdapterLayer; factor metrics appear only
    where the layer has lora_A / lora_B."""
    model, batch = tiny_llama(0), batch_for("llama")
    cfg = sdslora.AdapterConfig(method=method, r=2, target_modules=["q_proj", "down_proj"])
    adapted = sdslora.attach(model, cfg, init_data=[batch])
    before = _snapshot(adapted)
    diag = diagnose(adapted, batch, optimizer=torch.optim.AdamW(adapted.trainable_parameters()))
    _assert_same(before, _snapshot(adapted))
    assert len(diag.rows) == (len(adapted.adapter_layers()) or len(diag.rows)) > 0
    for key in ("cos_g_geff", "cos_g_gr", "cos_g_geff_opt"):
        assert -1.0 - 1e-6 <= diag.summary[key] <= 1.0 + 1e-6, key
    for row in diag.rows:
        layer = adapted.adapter_layers().get(row["name"])
        has_factors = layer is not None and hasattr(layer, "lora_A") and hasattr(layer, "lora_B")
        assert math.isfinite(row["stable_rank_A"]) == has_factors
