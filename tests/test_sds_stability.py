"""SDS-LoRA robustness options (issue 7, docs/sds_stability.md): aligned refreshes, carried optimizer state at the
re-parameterisation, learning-rate factor (re-warm, lr_scale) applied by the Controller; exact resume."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import tiny_llama
from torch import nn

import sdslora
from sdslora.methods.sds import SDSOptions, SDSPlan

IN, OUT, R = 14, 11, 3


def _orth(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def _decoupled_layer(seed: int = 0, span_noise: float = 0.0):
    """A float64 SDS layer in its decoupled phase with random bases; A = K Q_Aᵀ (+ noise), B = Q_B L (+ noise):
    with ``span_noise = 0`` row(A) and col(B) equal the bases' spans, but K and L are not triangular, so QR returns
    another basis of the same span."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT).double()
    model = sdslora.attach(nn.Sequential(base), sdslora.AdapterConfig(method="sds", r=R, adapter_dtype="base"))
    layer = next(iter(model.adapter_layers().values()))
    qa, qb = _orth(IN, R, g), _orth(OUT, R, g)
    k, ll = torch.randn(R, R, generator=g, dtype=torch.float64), torch.randn(R, R, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_QA.copy_(qa.T)
        layer.lora_QB.copy_(qb)
        layer.lora_A.copy_(k @ qa.T + span_noise * torch.randn(R, IN, generator=g, dtype=torch.float64))
        layer.lora_B.copy_(qb @ ll + span_noise * torch.randn(OUT, R, generator=g, dtype=torch.float64))
    layer._set_decoupled()
    return layer


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def _closest_basis(m: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Direct computation: project the old basis onto span(m) and orthonormalise it symmetrically (Löwdin),
    P Q (Qᵀ P Q)^(-1/2): the orthonormal basis of span(m) closest to ``old`` in Frobenius norm."""
    proj = m @ torch.linalg.pinv(m)
    x = proj @ old
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


@pytest.mark.parametrize("align", ["procrustes", "preserve"])
def test_aligned_refresh_with_unchanged_span_keeps_delta(align):
    layer = _decoupled_layer()
    before = layer.delta_weight().detach().clone()
    qa_before, qb_before = layer.lora_QA.clone(), layer.lora_QB.clone()
    jump, sim_a, sim_b = layer.refresh(1e-6, align)
    assert _rel(layer.delta_weight().detach(), before) < 1e-10
    assert float(jump) < 1e-10
    assert float(sim_a) == pytest.approx(1.0, abs=1e-12) and float(sim_b) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(layer.lora_QA, qa_before, rtol=0, atol=1e-12)  # the same basis, not only span
    torch.testing.assert_close(layer.lora_QB, qb_before, rtol=0, atol=1e-12)


def test_qr_refresh_with_unchanged_span_rotates_inside_it():
    """The faithful refresh moves ΔW although the span did not change (the rotation inside the span)."""
    layer = _decoupled_layer()
    before = layer.delta_weight().detach().clone()
    jump, sim_a, sim_b = layer.refresh(1e-6, "qr")
    after = layer.delta_weight().detach()
    assert float(sim_a) == pytest.approx(1.0, abs=1e-12)  # same span ...
    assert _rel(after, before) > 0.05  # ... but ΔW jumped
    assert float(jump) == pytest.approx(_rel(after, before), rel=1e-9)


def test_procrustes_refresh_jump_is_the_part_forced_by_the_span_change():
    layer = _decoupled_layer(seed=3, span_noise=0.05)
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    qa_old, qb_old = layer.lora_QA.T.clone(), layer.lora_QB.clone()
    before = layer.delta_weight().detach().clone()
    s = layer.scale
    # direct: new bases = the orthonormal bases of the new spans closest to the old ones; A and B kept
    qa_new, qb_new = _closest_basis(A.T, qa_old), _closest_basis(B, qb_old)
    expected = s * ((qb_new - qb_old) @ A + B @ (qa_new - qa_old).T)
    forced = float(torch.linalg.norm(expected) / torch.linalg.norm(before))
    jump, _sa, _sb = layer.refresh(1e-6, "procrustes")
    after = layer.delta_weight().detach()
    torch.testing.assert_close(layer.lora_QA.T, qa_new, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.lora_QB, qb_new, rtol=0, atol=1e-10)
    torch.testing.assert_close(after - before, expected, rtol=1e-8, atol=1e-12)
    assert float(jump) == pytest.approx(forced, rel=1e-8)
    assert forced > 1e-4
    # the faithful QR refresh of the same state jumps further
    layer2 = _decoupled_layer(seed=3, span_noise=0.05)
    assert float(layer2.refresh(1e-6, "qr")[0]) > 2 * forced


def test_preserve_refresh_keeps_delta_with_changed_span():
    layer = _decoupled_layer(seed=4, span_noise=0.05)
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    qa_old, qb_old = layer.lora_QA.T.clone(), layer.lora_QB.clone()
    before = layer.delta_weight().detach().clone()
    jump, _sa, _sb = layer.refresh(1e-6, "preserve")
    assert _rel(layer.delta_weight().detach(), before) < 1e-10
    assert float(jump) < 1e-10
    # the bases are the Procrustes-aligned bases of the old factors' spans
    torch.testing.assert_close(layer.lora_QA.T, _closest_basis(A.T, qa_old), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.lora_QB, _closest_basis(B, qb_old), rtol=0, atol=1e-10)


def _linear_model(**options):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN, OUT)).double()
    cfg = sdslora.AdapterConfig(method="sds", r=R, adapter_dtype="base", options={"warmup_steps": 2, **options})
    return sdslora.attach(base, cfg)


def _loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, IN, generator=g, dtype=torch.float64)
    y = torch.randn(6, OUT, generator=g, dtype=torch.float64)
    return (model(x) - y).pow(2).mean()


def test_carried_state_matches_hand_computation():
    model = _linear_model(reparam_state="carry")
    layer = next(iter(model.adapter_layers().values()))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.05, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    for t in (1, 2):
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
        if t == 1:
            ctl.step()
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    st_a = {k: v.clone() for k, v in opt.state[layer.lora_A].items()}
    st_b = {k: v.clone() for k, v in opt.state[layer.lora_B].items()}
    # the LoRA gradient of a probe loss at this point
    probe = _loss(model, 99)
    ga_lora, gb_lora = torch.autograd.grad(probe, [layer.lora_A, layer.lora_B])
    out = ctl.step()  # t = 2: re-parameterisation with carried state
    assert [e.get("state_carried") for e in out.events] == [1] and not out.reset_params
    u, v = layer.lora_QB, layer.lora_QA.T
    # hand computation: ∇A' = Uᵀ (B⁺)ᵀ ∇A, ∇B' = ∇B (Aᵀ)⁺ V
    left = u.T @ torch.linalg.pinv(B).T
    right = torch.linalg.pinv(A.T) @ v
    new_a, new_b = opt.state[layer.lora_A], opt.state[layer.lora_B]
    torch.testing.assert_close(new_a["exp_avg"], left @ st_a["exp_avg"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(new_a["exp_avg_sq"], (left * left) @ st_a["exp_avg_sq"], rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(new_b["exp_avg"], st_b["exp_avg"] @ right, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(new_b["exp_avg_sq"], st_b["exp_avg_sq"] @ (right * right), rtol=1e-10, atol=1e-16)
    assert float(new_a["step"]) == 2.0  # the step counter is kept (no bias-correction restart)
    # the maps are the exact gradient maps at this point: SDS's gradient of the same probe loss
    ga_sds, gb_sds = torch.autograd.grad(_loss(model, 99), [layer.lora_A, layer.lora_B])
    torch.testing.assert_close(ga_sds, left @ ga_lora, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gb_sds, gb_lora @ right, rtol=1e-9, atol=1e-12)


def test_reset_is_the_default_and_clears_state():
    model = _linear_model()
    layer = next(iter(model.adapter_layers().values()))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.05)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    for _t in (1, 2):
        _loss(model, _t).backward()
        opt.step()
        opt.zero_grad()
        out = ctl.step()
    assert not out.state_maps and layer.lora_A in out.reset_params and layer.lora_A not in opt.state


def test_lr_factor_rewarm_and_scale_applied_around_the_step():
    model = _linear_model(reparam_state="rewarm:3", lr_scale=0.5)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.01 * i)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))  # runs after the Controller's
    for t in range(1, 9):
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1.0 - 0.01 * t))  # the scheduler's value is intact
    opts = SDSOptions(warmup_steps=2, reparam_state="rewarm:3", lr_scale=0.5)
    expected = [0.1 * (1.0 - 0.01 * (t - 1)) * (1.0 if t <= 2 else 0.5 * min(t - 2, 4) / 4) for t in range(1, 9)]
    assert ctl.plan.lr_factor(3) == pytest.approx(0.125) == SDSPlan(opts, 20).lr_factor(3)
    assert seen == pytest.approx(expected)


def test_a_new_controller_on_the_same_optimizer_scales_the_lr_once():
    """Re-creating the Controller on the same optimizer (a resumed or re-wired run) replaces the lr hooks."""
    model = _linear_model(lr_scale=0.5)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    sdslora.Controller(model, opt, total_steps=20)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for t in range(1, 5):
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05])  # warm-up 2 steps at the lr, then x 0.5 (not x 0.25)
    assert opt.param_groups[0]["lr"] == 0.1


def test_lr_scale_warns_when_a_param_group_mixes_in_other_tensors():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, 3)).double()
    cfg = sdslora.AdapterConfig(method="sds", r=R, target_modules=["0"], modules_to_save=["1"],
                                options={"warmup_steps": 2, "lr_scale": 0.5})
    model = sdslora.attach(base, cfg)
    with pytest.warns(UserWarning, match=r"param group 0 also holds 2 non-adapter tensor\(s\).*own param group"):
        sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.1), total_steps=20)
    groups = model.trainable_param_groups(other={"lr": 0.01})
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["lr"] == 0.01
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.trainable_parameters()}
    assert all("lora_" in n for n, p in model.named_trainable_parameters() if any(p is q for q in groups[0]["params"]))
    opt = torch.optim.SGD(groups, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdslora.Controller(model, opt, total_steps=20)  # separate groups: no warning


@pytest.mark.parametrize("bad", [{"refresh_align": "svd"}, {"reparam_state": "rewarm:0"}, {"reparam_state": "x"},
                                 {"lr_scale": 0.0}, {"lr_scale": True}, {"faithful": "yes"}])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        SDSOptions(**bad)


def test_faithful_is_the_paper_and_refuses_other_choices():
    assert SDSOptions().refresh_align == "preserve"  # the measured default (docs/sds_stability.md)
    paper = SDSOptions(faithful=True)
    assert (paper.refresh_align, paper.reparam_state, paper.lr_scale) == ("qr", "reset", 1.0)
    assert SDSOptions(faithful=True, refresh_align="qr") == paper  # restating the paper's values is fine
    for clash in ({"refresh_align": "preserve"}, {"reparam_state": "carry"}, {"lr_scale": 0.5}):
        with pytest.raises(ValueError, match="faithful=True is the paper's algorithm") as err:
            SDSOptions(faithful=True, **clash)
        assert next(iter(clash)) in str(err.value)
    # a saved config (resolved options) parses back to the same options in both modes
    for opts in ({}, {"faithful": True}, {"refresh_align": "qr"}):
        cfg = sdslora.AdapterConfig(method="sds", options=opts)
        again = sdslora.AdapterConfig.from_dict(cfg.to_dict())
        assert again.method_options() == cfg.method_options()


ROBUST = {"refresh_align": "procrustes", "reparam_state": "rewarm:3", "lr_scale": 0.5}


def _batch(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    ids = (torch.randint(0, 64, (4,), generator=g)[:, None] + torch.arange(12)[None, :]) % 64
    return {"input_ids": ids, "labels": ids.clone()}


def _steps(model, opt, ctl, steps, losses):
    for t in steps:
        loss = model(**_batch(t)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        losses[t] = float(loss.detach())


@pytest.mark.filterwarnings("ignore:sds. lr_scale / rewarm")  # lm_head shares the group on purpose
@pytest.mark.parametrize("options", [ROBUST, {"refresh_align": "preserve", "reparam_state": "carry"}])
def test_robust_variant_resumes_exactly(tmp_path, options):
    total = 24
    torch.manual_seed(0)
    cfg = sdslora.AdapterConfig(method="sds", r=4, alpha=4.0, modules_to_save=["lm_head"], options=options)
    model = sdslora.attach(tiny_llama(), cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=total)
    losses: dict[int, float] = {}
    _steps(model, opt, ctl, range(1, 12), losses)  # stops inside the re-warm window (steps 11-13)
    model.save_adapter(tmp_path / "mid")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    _steps(model, opt, ctl, range(12, total + 1), losses)
    assert losses[total] < losses[1]
    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "mid")
    opt2 = torch.optim.AdamW(loaded.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    ctl2 = sdslora.Controller(loaded, opt2)
    losses2: dict[int, float] = {}
    _steps(loaded, opt2, ctl2, range(12, total + 1), losses2)
    for t in range(12, total + 1):
        assert losses2[t] == pytest.approx(losses[t], rel=1e-6), t
    final1, final2 = model.adapter_state_dict(), loaded.adapter_state_dict()
    for k in final1:
        torch.testing.assert_close(final2[k], final1[k], rtol=1e-6, atol=1e-7)
