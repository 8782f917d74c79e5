"""Merge-and-restart (ReLoRA over LoRA and SDS-LoRA): the restart identities in float64, the jagged schedule, the
partial optimizer reset against a hand computation, save / load / exact resume across restarts, unload, export."""

from __future__ import annotations

import json

import pytest
import torch
from models import batch_for, output_of, tiny_gpt2, tiny_llama
from peft import PeftModel

import sdslora
from sdslora.control import NonFiniteError
from sdslora.methods.restart import ReLoRAOptions, ReLoRAPlan, ReLoRASDSOptions, ReLoRASDSPlan

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
SDS_CYCLE = {"restart_every": 6, "warmup_steps": 2, "refresh": "every:2", "restart_warmup": 2}


def _attach(
    method: str, options: dict, dtype: torch.dtype = torch.float32, build=tiny_llama, targets=TARGETS
):
    base = build().to(dtype)
    torch.manual_seed(3)
    cfg = sdslora.AdapterConfig(
        method=method,
        r=3,
        alpha=3.0,
        target_modules=targets,
        options=options,
        adapter_dtype="float32" if dtype == torch.float32 else "base",
    )
    return sdslora.attach(base, cfg)


def _steps(model, opt, ctl, ts, kind="llama"):
    for t in ts:
        model(**batch_for(kind, seed=t)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.step()


@pytest.mark.parametrize(
    "method,options", [("relora", {"restart_every": 4, "restart_warmup": 1}), ("relora_sds", SDS_CYCLE)]
)
def test_a_restart_keeps_the_function_and_accumulates_the_update_float64(method, options):
    model = _attach(method, options, torch.float64)
    layers = model.adapter_layers()
    w0 = {n: layer.weight_matrix().detach().clone() for n, layer in layers.items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=30)
    every = options["restart_every"]
    probe = batch_for("llama", seed=99)
    merged = {n: torch.zeros_like(w) for n, w in w0.items()}
    for t in range(1, 2 * every + 1):
        model(**batch_for("llama", seed=t)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            before = output_of(model, probe)
            cycle = {
                n: (layer.delta_weight() - layer.lora_merged).detach().clone() for n, layer in layers.items()
            }
        ctl.step()
        with torch.no_grad():
            after = output_of(model, probe)
        assert float((after - before).abs().max()) < 1e-10, t  # no duty changes the function
        if t % every == 0:  # restarted: M grew by the cycle's ΔW, the factors start again
            for n, layer in layers.items():
                merged[n] += cycle[n]
                torch.testing.assert_close(layer.lora_merged, merged[n], rtol=0, atol=1e-14)
                assert not layer.lora_B.detach().any()  # B = 0: ΔW_cycle = 0
                if method == "relora_sds":
                    assert not layer.decoupled and not layer.lora_QA.any()
                # the weight the layer computes with is W0 + M, in one rounding
                assert torch.equal(layer.weight_matrix(), w0[n] + layer.lora_merged)
    restarts = [e for e in ctl.events if e["event"] == "restart"]
    assert [e["step"] for e in restarts] == [every, 2 * every] and [e["cycle"] for e in restarts] == [1, 2]
    for layer in layers.values():  # ΔW relative to the original weight
        torch.testing.assert_close(layer.delta_weight().detach(), layer.lora_merged, rtol=0, atol=1e-14)
    if method == "relora_sds":  # every cycle ran SDS-LoRA's own schedule, logged at the run's steps
        reparam = [e["step"] for e in ctl.events if e["event"] == "reparameterise"]
        refresh = [e["step"] for e in ctl.events if e["event"] == "refresh"]
        assert reparam == [2, 8] and refresh == [4, 10]


def test_plan_due_steps_and_jagged_learning_rate():
    plan = ReLoRAPlan(ReLoRAOptions(restart_every=5, restart_warmup=2), total_steps=20)
    assert [t for t in range(1, 21) if plan.due(t)] == [5, 10, 15, 20]
    # first cycle: the user's schedule alone; after each restart j/(W+1) for j = 1..W, then 1
    assert [plan.lr_factor(t) for t in range(1, 11)] == [1, 1, 1, 1, 1, 1 / 3, 2 / 3, 1, 1, 1]
    assert ReLoRAPlan.scales_lr(ReLoRAOptions(restart_every=5, restart_warmup=0)) is False
    assert ReLoRAOptions(restart_every=250).restart_warmup == 10  # default min(10, N // 10)
    assert ReLoRAOptions(restart_every=30).restart_warmup == 3
    sds = ReLoRASDSPlan(
        ReLoRASDSOptions(restart_every=6, warmup_steps=2, refresh="every:2", restart_warmup=1), 24
    )
    assert [t for t in range(1, 13) if sds.due(t)] == [2, 4, 6, 8, 10, 12]
    assert sds.lr_factor(7) == 0.5 and sds.lr_factor(8) == 1.0


def test_partial_optimizer_reset_equals_hand_computation():
    model = _attach("relora", {"restart_every": 3, "prune": 0.75, "restart_warmup": 0})
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=10)
    _steps(model, opt, ctl, [1, 2])
    model(**batch_for("llama", seed=3)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    layer = next(iter(model.adapter_layers().values()))
    want = {}
    for p in (layer.lora_A, layer.lora_B):
        st = opt.state[p]
        v = st["exp_avg_sq"].reshape(-1)
        keep = v.numel() - round(0.75 * v.numel())
        order = torch.argsort(v.abs(), descending=True)[:keep]
        mask = torch.zeros(v.numel(), dtype=torch.bool)
        mask[order] = True
        want[p] = {
            k: torch.where(mask, st[k].reshape(-1), 0).reshape(p.shape) for k in ("exp_avg", "exp_avg_sq")
        }
        want[p]["step"] = st["step"].clone()
    ctl.step()  # restart after step 3
    for p, expected in want.items():
        st = opt.state[p]
        assert torch.equal(st["step"], expected["step"])  # the step counter is kept
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], expected[k]), k
        assert int((st["exp_avg_sq"] != 0).sum()) == p.numel() - round(0.75 * p.numel())
    # prune=1.0 forgets the state; prune=0.0 keeps it
    for share, kept in ((1.0, False), (0.0, True)):
        m = _attach("relora", {"restart_every": 2, "prune": share, "restart_warmup": 0})
        o = torch.optim.AdamW(m.trainable_parameters(), lr=1e-3)
        c = sdslora.Controller(m, o, total_steps=10)
        _steps(m, o, c, [1])
        lay = next(iter(m.adapter_layers().values()))
        before = o.state[lay.lora_A]["exp_avg"].clone()
        _steps(m, o, c, [2])
        assert (lay.lora_A in o.state) is kept
        if kept:
            assert not torch.equal(o.state[lay.lora_A]["exp_avg"], before)


@pytest.mark.parametrize(
    "method,options", [("relora", {"restart_every": 4, "restart_warmup": 1}), ("relora_sds", SDS_CYCLE)]
)
def test_exact_resume_across_a_restart(tmp_path, method, options):
    every = options["restart_every"]
    total, stop = 3 * every, every - 1  # saved one step before a restart, resumed across two more

    def fresh():
        m = _attach(method, options)
        return m, torch.optim.AdamW(m.trainable_parameters(), lr=5e-3, weight_decay=0.0)

    ref, ref_opt = fresh()
    ref_ctl = sdslora.Controller(ref, ref_opt, total_steps=total)
    torch.manual_seed(11)  # the restarts draw new factors from torch's RNG
    _steps(ref, ref_opt, ref_ctl, range(1, stop + 1))
    rng = torch.get_rng_state()
    _steps(ref, ref_opt, ref_ctl, range(stop + 1, total + 1))

    run, opt = fresh()
    ctl = sdslora.Controller(run, opt, total_steps=total)
    torch.manual_seed(11)
    _steps(run, opt, ctl, range(1, stop + 1))
    run.save_adapter(tmp_path / "ckpt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "ckpt")
    opt2 = torch.optim.AdamW(loaded.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    ctl2 = sdslora.Controller(loaded, opt2)
    assert ctl2.t == stop and ctl2.total_steps == total
    torch.set_rng_state(rng)
    _steps(loaded, opt2, ctl2, range(stop + 1, total + 1))
    mine, want = loaded.adapter_state_dict(), ref.adapter_state_dict()
    assert sorted(mine) == sorted(want)
    for k in want:
        assert torch.equal(mine[k], want[k]), k
    for (n, a), b in zip(loaded.adapter_layers().items(), ref.adapter_layers().values(), strict=True):
        assert torch.equal(a.base_weight, b.base_weight), n  # the re-derived W0 + M, bit for bit
    assert [e for e in ctl2.events] == [e for e in ref_ctl.events]


def test_unload_merge_and_save_load_after_restarts(tmp_path):
    model = _attach("relora", {"restart_every": 3, "restart_warmup": 0})
    originals = {
        n: m.weight.detach().clone() for n, m in tiny_llama().named_modules() if hasattr(m, "weight")
    }
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    _steps(model, opt, ctl, range(1, 8))  # restarts after 3 and 6; one step into the third cycle
    probe = batch_for("llama", seed=50)
    out = output_of(model, probe).detach()
    model.save_adapter(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["controller"]["t"] == 7
    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(loaded, probe), out)
    # merged model = W0 + M + ΔW_cycle
    merged = sdslora.load_adapter(tiny_llama(), tmp_path / "a").merge_and_unload()
    torch.testing.assert_close(output_of(merged, probe), out, rtol=1e-4, atol=1e-5)
    # unload without merging gives the original weights back exactly
    plain = loaded.unload()
    for n, mod in plain.named_modules():
        if n in originals and hasattr(mod, "weight"):
            assert torch.equal(mod.weight, originals[n]), n


def test_peft_export_is_exact_after_restarts(tmp_path):
    model = _attach(
        "relora", {"restart_every": 3, "restart_warmup": 0}, build=tiny_gpt2, targets=["c_attn", "c_fc"]
    )
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    _steps(model, opt, ctl, range(1, 8), kind="gpt2")
    probe = batch_for("gpt2", seed=50)
    ours = output_of(model, probe).detach()
    model.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    layers = model.adapter_layers()
    assert cfg["r"] == max(min(layer.in_features, layer.out_features) for layer in layers.values())
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(output_of(loaded, probe), ours, rtol=0, atol=1e-5)
    model.export_peft(tmp_path / "small", max_rank=4)  # compressed, with the error reported
    report = json.loads((tmp_path / "small" / "export_report.json").read_text())
    assert sorted(report["relative_error"]) == sorted(layers)
    assert all(0 < e < 1 for e in report["relative_error"].values())


def test_a_failed_restart_leaves_weight_and_merged_update_as_they_were():
    model = _attach("relora", {"restart_every": 2, "restart_warmup": 0})
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=10)
    _steps(model, opt, ctl, [1, 2, 3])
    layer = next(iter(model.adapter_layers().values()))
    w, m = layer.base_weight.detach().clone(), layer.lora_merged.clone()
    model(**batch_for("llama", seed=4)).loss.backward()
    opt.step()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        ctl.step()
    assert torch.equal(layer.base_weight, w) and torch.equal(layer.lora_merged, m)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"restart_every": 0}, "restart_every must be an int >= 1"),
        ({"restart_every": 5, "restart_warmup": 5}, "must be shorter than restart_every"),
        ({"restart_every": 5, "prune": 1.5}, "prune must be a number in"),
        ({"restart_every": 5, "prune": True}, "prune"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sdslora.AdapterConfig(method="relora", r=2, options=options)


def test_sds_cycle_must_hold_its_warmup():
    with pytest.raises(ValueError, match="warmup_steps .* must be shorter than restart_every"):
        sdslora.AdapterConfig(method="relora_sds", r=2, options={"restart_every": 10, "warmup_steps": 10})


def test_a_run_shorter_than_a_cycle_is_refused():
    model = _attach("relora", {"restart_every": 50})
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="ends before method 'relora' runs any"):
        sdslora.Controller(model, opt, total_steps=20)


def test_mixed_rank_export_sets_peft_rank_and_alpha_patterns(tmp_path):
    """After a restart each layer exports at rank min(out, in): q_proj (32×32) at 32, k_proj (16×32) at 16. PEFT
    scales a layer by lora_alpha / r unless alpha_pattern says otherwise: without the pattern k_proj's update
    would be doubled."""
    model = _attach("relora", {"restart_every": 2, "restart_warmup": 0}, targets=["q_proj", "k_proj"])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=10)
    _steps(model, opt, ctl, range(1, 4))
    probe = batch_for("llama", seed=60)
    ours = output_of(model, probe).detach()
    model.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    k_layers = sorted(n for n in model.adapter_layers() if n.endswith("k_proj"))
    assert cfg["r"] == cfg["lora_alpha"] == 32
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {n: 16 for n in k_layers}
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(output_of(loaded, probe), ours, rtol=0, atol=1e-5)
    for name in k_layers:  # PEFT's own scale of those layers is 1
        assert loaded.base_model.model.get_submodule(name).scaling["default"] == 1.0
