"""Rank growth (``lora_grow``, ``sds_grow``, ``methods/grow.py``): the function is unchanged at a growth, the new
directions are the top singular vectors of the unreachable gradient (I − P_B) G (I − P_A), the optimizer state is
carried into the old block, grown adapters save / load / export, a run resumed across a growth is bitwise the
uninterrupted one, bad options are refused clearly."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from models import batch_for, output_of, tiny_llama
from torch import nn

import sdslora
from sdslora.diagnostics import diagnose

TARGETS = ["q_proj", "v_proj", "down_proj"]


# ---- helpers --------------------------------------------------------------------------------------------------------
def _llama(method: str, r: int = 2, dtype=torch.float32, **options) -> sdslora.AdaptedModel:
    base = tiny_llama().to(dtype)
    torch.manual_seed(1)
    cfg = sdslora.AdapterConfig(
        method=method,
        r=r,
        target_modules=TARGETS,
        options=options,
        adapter_dtype="base" if dtype == torch.float64 else "float32",
    )
    return sdslora.attach(base, cfg)


def _train(model, ctl, opt, steps, first: int = 1, on_step=None):
    for t in range(first, first + steps):
        model(**batch_for("llama", seed=t)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(t)
        ctl.step()


def _ranks(model) -> set[int]:
    return {layer.r for layer in model.adapter_layers().values()}


class Dense(nn.Module):
    """One linear layer (float64) and a fixed regression loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 10).double()

    def forward(self, x):
        return self.fc(x)


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(
        7, 10, generator=g, dtype=torch.float64
    )


def _loss(model, seed):
    x, y = _data(seed)
    return ((model(x) - y) ** 2).mean()


def _dense(method: str, **options) -> sdslora.AdaptedModel:
    torch.manual_seed(2)
    cfg = sdslora.AdapterConfig(method=method, r=2, alpha=2.0, adapter_dtype="base", options=options)
    return sdslora.attach(Dense(), cfg)


def _orth(m: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, s > 1e-10 * s.max()] if s.numel() and s.max() > 0 else u[:, :0]


# ---- the function does not change at a growth -------------------------------------------------------------------------
GROWTHS = {
    "lora": ("lora_grow", {"grow_steps": "3,5"}),
    "sds-before-reparam": ("sds_grow", {"grow_steps": "3", "warmup_steps": 5}),
    "sds-after-reparam": ("sds_grow", {"grow_steps": "3,6", "warmup_steps": 2, "refresh": "every:1"}),
    "sds-at-reparam": ("sds_grow", {"grow_steps": "4", "warmup_steps": 4, "reparam_state": "carry"}),
    "lora-random": ("lora_grow", {"grow_steps": "1,4", "directions": "random", "grow_to": 5}),
}


@pytest.mark.parametrize("case", list(GROWTHS))
def test_outputs_unchanged_at_growth_float64(case):
    method, options = GROWTHS[case]
    model = _llama(method, dtype=torch.float64, **options)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=8)
    probe = batch_for("llama", seed=99)
    grown = []

    def check(t):
        with torch.no_grad():
            before = output_of(model, probe)
        out = ctl.step()
        with torch.no_grad():
            after = output_of(model, probe)
        if any(e["event"] == "grow" for e in out.events):
            grown.append(t)
            assert float((after - before).abs().max()) < 1e-10
            for layer in model.adapter_layers().values():
                assert layer.lora_A.shape == (layer.r, layer.in_features)
                assert layer.lora_B.shape == (layer.out_features, layer.r)
                assert layer.lora_QA.shape[0] == layer.r if hasattr(layer, "lora_QA") else True
                assert not layer._armed and layer._tap is None  # disarmed: the plain forward again

    for t in range(1, 9):
        model(**batch_for("llama", seed=t)).loss.backward()
        opt.step()
        opt.zero_grad()
        check(t)
    steps = [int(s) for s in str(options["grow_steps"]).split(",")]
    assert grown == steps
    r1 = options.get("grow_to", 4)
    assert _ranks(model) == {r1}
    if method == "sds_grow":
        layer = next(iter(model.adapter_layers().values()))
        assert layer.decoupled and layer.activation_width() == 2 * r1
        qb = layer.lora_QB
        torch.testing.assert_close(qb.T @ qb, torch.eye(r1, dtype=qb.dtype), atol=1e-10, rtol=0)
    events = [e for e in ctl.events if e["event"] == "grow"]
    assert [e["rank"] for e in events][-1] == r1
    json.dumps(events, allow_nan=False)  # saved with the adapter


# ---- the directions: top singular vectors of (I − P_B) G (I − P_A) ---------------------------------------------------
def _hand_gradient(model) -> torch.Tensor:
    """G = ∂L/∂W at W = W0 + ΔW by autograd on a dense float64 copy, summed over the two micro-batches of a step."""
    layer = model.adapter_layers()["fc"]
    dense = nn.Linear(12, 10).double()
    with torch.no_grad():
        dense.weight.copy_(layer.base_layer.weight + layer.delta_weight())
        dense.bias.copy_(layer.base_layer.bias)
    for seed in (100, 101):
        _loss(dense, seed).backward()
    return dense.weight.grad.clone()


@pytest.mark.parametrize(
    "method,options",
    [
        ("lora_grow", {"grow_steps": "3", "grow_to": 4}),
        ("sds_grow", {"grow_steps": "3", "grow_to": 4, "warmup_steps": 1, "refresh": "never"}),
    ],
)
def test_directions_are_the_top_singular_vectors_of_the_unreachable_gradient(method, options):
    model = _dense(method, **options)
    layer = model.adapter_layers()["fc"]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=5)
    for t in range(1, 3):
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    assert layer._armed  # armed after step 2 for the growth after step 3
    g = _hand_gradient(model)
    for seed in (100, 101):  # step 3: two micro-batches
        _loss(model, seed).backward()
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(layer.take_gradient(), g, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # projectors at the growth (after the optimizer step)
        if method == "sds_grow":
            assert layer.decoupled
            pb, pa = layer.lora_QB.clone(), layer.lora_QA.T.clone()
        else:
            pb, pa = _orth(layer.lora_B), _orth(layer.lora_A.T)
        a_old, b_old, dw = (
            layer.lora_A.detach().clone(),
            layer.lora_B.detach().clone(),
            layer.delta_weight().clone(),
        )
    eye_m, eye_n = torch.eye(10, dtype=torch.float64), torch.eye(12, dtype=torch.float64)
    rr = (eye_m - pb @ pb.T) @ g @ (eye_n - pa @ pa.T)
    u, s, vh = torch.linalg.svd(rr)
    ctl.step()
    assert layer.r == 4
    info = layer.growth_info
    torch.testing.assert_close(torch.tensor(info["sigma"], dtype=torch.float64), s[:2], rtol=1e-10, atol=0)
    assert info["unreachable_share"] == pytest.approx(float(rr.pow(2).sum() / g.pow(2).sum()), rel=1e-10)
    c = info["scale"]
    new_rows = layer.lora_A.detach()[2:] / c
    for i in range(2):  # equal up to sign
        assert min(float((new_rows[i] - vh[i]).abs().max()), float((new_rows[i] + vh[i]).abs().max())) < 1e-10
    torch.testing.assert_close(layer.lora_A.detach()[:2], a_old, rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_B.detach()[:, :2], b_old, rtol=0, atol=0)
    if method == "sds_grow":
        qb_new, qa_new = layer.lora_QB[:, 2:], layer.lora_QA[2:]
        torch.testing.assert_close(qa_new, new_rows, rtol=0, atol=1e-12)
        for i in range(2):
            sign = float(torch.sign((qa_new[i] * vh[i]).sum()))
            torch.testing.assert_close(qb_new[:, i], sign * u[:, i], rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.lora_B.detach()[:, 2:], -c * qb_new, rtol=0, atol=1e-14)
    else:
        assert float(layer.lora_B.detach()[:, 2:].abs().max()) == 0.0
    torch.testing.assert_close(layer.delta_weight().detach(), dw, rtol=0, atol=1e-13)
    assert not layer._armed


def test_random_directions_are_orthonormal_in_the_complement():
    model = _dense(
        "sds_grow", grow_steps="3", grow_to=5, warmup_steps=1, refresh="never", directions="random"
    )
    layer = model.adapter_layers()["fc"]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=5)
    for t in range(1, 4):
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
        if t == 2:
            assert not layer._armed  # random directions: nothing is captured
        ctl.step()
    assert layer.r == 5 and layer.growth_info["random_filled"] == 3
    for q in (layer.lora_QB, layer.lora_QA.T):
        torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)


class Toy(nn.Module):
    """Embedding -> Conv1d -> Linear (float64), the layer kinds whose weight gradient the capture forms."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)
        self.double()

    def forward(self, ids):
        h = torch.tanh(self.conv(self.emb(ids).transpose(1, 2)))
        return self.fc(h.mean(-1))


@pytest.mark.parametrize("method", ["lora_grow", "sds_grow"])
def test_capture_equals_autograd_for_embedding_and_convolution(method):
    options = {"grow_steps": "3", "grow_to": 3} | ({"warmup_steps": 1} if method == "sds_grow" else {})
    model = sdslora.attach(
        Toy(),
        sdslora.AdapterConfig(
            method=method,
            r=1,
            alpha=1.0,
            target_modules=["emb", "conv", "fc"],
            adapter_dtype="base",
            options=options,
        ),
    )
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=4)
    ids = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(0))

    def loss():
        return model(ids).pow(2).sum()

    for _ in range(2):
        loss().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    layers = model.adapter_layers()
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)
    loss().backward()
    for name, layer in layers.items():
        ref = layer.view.from_base(layer.base_layer.weight.grad)
        torch.testing.assert_close(layer.take_gradient(), ref, rtol=1e-10, atol=1e-12, msg=name)
        layer.base_layer.weight.requires_grad_(False)
        layer.base_layer.weight.grad = None
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        before = model(ids)
    ctl.step()
    with torch.no_grad():
        assert float((model(ids) - before).abs().max()) < 1e-12
    assert _ranks(model) == {3}


def test_a_probe_between_arming_and_growth_does_not_change_the_growth():
    """diagnose() (torch.autograd.grad) between arming and growth: G is the training backward's only."""
    runs = []
    for probe in (False, True):
        model = _llama("lora_grow", grow_steps="3")
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        ctl = sdslora.Controller(model, opt, total_steps=6)

        def on_step(t, model=model, probe=probe):
            if probe and t == 3:
                diagnose(model, batch_for("llama", seed=50))

        _train(model, ctl, opt, 2)
        if probe:
            diagnose(model, batch_for("llama", seed=50))  # armed now
        _train(model, ctl, opt, 2, first=3, on_step=on_step)
        runs.append(model.adapter_state_dict())
        diag = diagnose(model, batch_for("llama", seed=51))  # diagnostics work on a grown model
        assert len(diag.rows) == len(model.adapter_layers())
        assert all(row["stable_rank_A"] == row["stable_rank_A"] for row in diag.rows)  # finite factor metrics
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


# ---- optimizer state --------------------------------------------------------------------------------------------------
def test_optimizer_state_carried_into_the_old_block():
    model = _llama("lora_grow", grow_steps="3")
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=6)
    _train(model, ctl, opt, 2)
    model(**batch_for("llama", seed=3)).loss.backward()
    opt.step()
    opt.zero_grad()
    layers = list(model.adapter_layers().values())
    order = [id(p) for g in opt.param_groups for p in g["params"]]
    old = {}
    for layer in layers:
        for p in (layer.lora_A, layer.lora_B):
            old[id(p)] = (order.index(id(p)), {k: v.clone() for k, v in opt.state[p].items()})
    olds = [(layer.lora_A, layer.lora_B) for layer in layers]
    out = ctl.step()
    assert len(out.replaced) == 2 * len(layers)
    new_order = [p for g in opt.param_groups for p in g["params"]]
    for layer, (a_old, b_old) in zip(layers, olds, strict=True):
        assert layer.r == 4
        for p_old, p_new, where in (
            (a_old, layer.lora_A, (slice(0, 2), slice(None))),
            (b_old, layer.lora_B, (slice(None), slice(0, 2))),
        ):
            pos, st = old[id(p_old)]
            assert new_order[pos] is p_new and id(p_old) not in {id(p) for p in opt.state}
            new_st = opt.state[p_new]
            assert torch.equal(new_st["step"], st["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                expected = torch.zeros_like(p_new)
                expected[where] = st[key]
                assert torch.equal(new_st[key], expected), key
    _train(model, ctl, opt, 2, first=4)  # AdamW keeps stepping the grown parameters
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())


def test_a_duty_failing_after_the_growth_leaves_the_layers_and_optimizer_as_they_were():
    model = _llama("lora_grow", grow_steps="3")
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=6)
    _train(model, ctl, opt, 2)
    model(**batch_for("llama", seed=3)).loss.backward()
    opt.step()
    layers = list(model.adapter_layers().values())
    held = [(layer.lora_A, layer.lora_B, layer.lora_A.detach().clone(), layer.r) for layer in layers]
    grow = ctl.plan.run

    def grow_then_fail(layers_, t):
        grow(layers_, t)  # the layers now hold new, larger parameters
        raise RuntimeError("boom after the growth")

    ctl.plan.run = grow_then_fail
    with pytest.raises(RuntimeError, match="boom"):
        ctl.step()
    held_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    for layer, (a, b, a_val, r) in zip(layers, held, strict=True):
        assert layer.lora_A is a and layer.lora_B is b and layer.r == r == 2
        assert torch.equal(layer.lora_A, a_val) and id(a) in held_ids
    assert ctl.t == 2
    assert float(model(**batch_for("llama", seed=9)).loss) > 0  # still runs at the old rank


def test_growth_at_the_reparameterisation_maps_then_pads_the_state():
    """sds_grow growing at the step SDS re-parameterises with reparam_state="carry": the old blocks hold exactly the
    moments plain SDS-LoRA maps there, the new parts zeros."""
    states = []
    for method in ("sds", "sds_grow"):
        opts = {"warmup_steps": 3, "reparam_state": "carry", "refresh": "never"}
        model = _llama(method, **(opts | ({"grow_steps": "3"} if method == "sds_grow" else {})))
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        ctl = sdslora.Controller(model, opt, total_steps=6)
        _train(model, ctl, opt, 3)
        states.append(
            [(opt.state[layer.lora_A], opt.state[layer.lora_B]) for layer in model.adapter_layers().values()]
        )
    for (a, b), (ga, gb) in zip(*states, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ga[key][:2], a[key], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(gb[key][:, :2], b[key], rtol=1e-5, atol=1e-8)
            assert float(ga[key][2:].abs().max()) == 0.0 and float(gb[key][:, 2:].abs().max()) == 0.0


def test_growth_at_the_reparameterisation_with_reset_starts_fresh():
    model = _llama("sds_grow", grow_steps="3", warmup_steps=3, refresh="never")
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=6)
    _train(model, ctl, opt, 3)
    assert [e["event"] for e in ctl.events] == ["reparameterise", "grow"]
    for layer in model.adapter_layers().values():
        assert layer.r == 4 and layer.lora_A not in opt.state and layer.lora_B not in opt.state


# ---- save / load / export -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options",
    [
        ("lora_grow", {"grow_steps": "2,4", "grow_to": 5}),
        ("sds_grow", {"grow_steps": "2,4", "grow_to": 5, "warmup_steps": 3}),
    ],
)
def test_save_load_round_trip_after_growth(tmp_path, method, options):
    model = _llama(method, **options)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=8)
    _train(model, ctl, opt, 5)
    assert _ranks(model) == {5}
    probe = batch_for("llama", seed=99)
    with torch.no_grad():
        out = output_of(model, probe)
    model.save_adapter(tmp_path / "a")
    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "a")
    assert _ranks(loaded) == {5}
    with torch.no_grad():
        assert torch.equal(output_of(loaded, probe), out)
    ours, theirs = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # in place (a Trainer resuming): a model at the initial rank takes the grown tensors
    fresh = _llama(method, **options)
    sdslora.io.load_adapter_state(fresh, tmp_path / "a")
    assert _ranks(fresh) == {5}
    with torch.no_grad():
        assert torch.equal(output_of(fresh, probe), out)
    # an edited rank is refused: outside [r, grow_to], or not the saved tensors' rank
    meta_file = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(meta_file.read_text())
    name = next(iter(meta["layers"]))
    for bad, match in ((6, "holds ranks 2 to 5"), (1, "holds ranks 2 to 5"), (4, "does not fit")):
        edited = copy.deepcopy(meta)
        edited["layers"][name]["r"] = bad
        meta_file.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=match):
            sdslora.load_adapter(tiny_llama(), tmp_path / "a")
    meta_file.write_text(json.dumps(meta))
    # a load_adapter_state that fails leaves the model as it was
    other = fresh
    edited = copy.deepcopy(meta)
    edited["layers"][name]["r"] = 4
    meta_file.write_text(json.dumps(edited))
    before = {k: v.clone() for k, v in other.adapter_state_dict().items()}
    with pytest.raises(ValueError, match="do not match"):
        sdslora.io.load_adapter_state(other, tmp_path / "a")
    after = other.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "method,options,rank",
    [("lora_grow", {"grow_steps": "3"}, 4), ("sds_grow", {"grow_steps": "3,5", "warmup_steps": 4}, 8)],
)
def test_peft_export_after_growth(tmp_path, method, options, rank):
    peft = pytest.importorskip("peft")
    model = _llama(method, **options)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2)
    ctl = sdslora.Controller(model, opt, total_steps=8)
    _train(model, ctl, opt, 7)
    probe = batch_for("llama", seed=99)
    with torch.no_grad():
        ours = output_of(model, probe)
        assert float((ours - output_of(tiny_llama(), probe)).abs().max()) > 1e-3
    model.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["rank_pattern"] == {}
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, probe), ours, rtol=0, atol=1e-5)


# ---- exact resume -----------------------------------------------------------------------------------------------------
def _state(model, opt):
    tensors = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    moments = [
        {k: v.clone() for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
        if p in opt.state
    ]
    return tensors, moments


@pytest.mark.parametrize(
    "method,options",
    [
        ("lora_grow", {"grow_steps": "4,6"}),
        ("sds_grow", {"grow_steps": "4,6", "warmup_steps": 2, "refresh": "every:1"}),
        ("lora_grow", {"grow_steps": "4", "directions": "random"}),
    ],
)
def test_resume_across_growth_is_bitwise(tmp_path, method, options):
    total = 7

    def fresh_run():
        model = _llama(method, **options)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        return model, opt, sdslora.Controller(model, opt, total_steps=total)

    model, opt, ctl = fresh_run()
    _train(model, ctl, opt, total)
    assert _ranks(model) == {4}
    ref, ref_events = _state(model, opt), list(ctl.events)
    for kill_after in (2, 3, 4):  # before arming, between arming and growth, right after the first growth
        model, opt, ctl = fresh_run()
        _train(model, ctl, opt, kill_after)
        model.save_adapter(tmp_path / f"ck{kill_after}")
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        del model, opt, ctl
        resumed = sdslora.load_adapter(tiny_llama(), tmp_path / f"ck{kill_after}")
        opt = torch.optim.AdamW(resumed.trainable_parameters(), lr=1e-2)
        buf.seek(0)
        opt.load_state_dict(torch.load(buf))
        ctl = sdslora.Controller(resumed, opt, total_steps=total)
        assert ctl.t == kill_after
        if kill_after == 3 and options.get("directions", "gradient") == "gradient":
            # re-armed from the adapter
            assert all(layer._armed for layer in resumed.adapter_layers().values())
        _train(resumed, ctl, opt, total - kill_after, first=kill_after + 1)
        got = _state(resumed, opt)
        assert sorted(got[0]) == sorted(ref[0])
        for k in ref[0]:
            assert torch.equal(got[0][k], ref[0][k]), (kill_after, k)
        assert len(got[1]) == len(ref[1])
        for a, b in zip(got[1], ref[1], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in b), kill_after
        assert ctl.events == ref_events


# ---- options ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,match",
    [
        ({"grow_to": 2}, "must be larger than the rank r=2"),
        ({"grow_to": 40}, "larger than this layer allows"),
        ({"grow_to": True}, "grow_to"),
        ({"grow_steps": "5,3"}, "strictly increasing"),
        ({"grow_steps": "0"}, "neither an optimizer step"),
        ({"grow_steps": "ten"}, "neither an optimizer step"),
        ({"grow_steps": "1.5"}, "neither an optimizer step"),
        ({"grow_steps": ""}, "is empty"),
        ({"grow_steps": "1"}, "step 2 at the earliest"),
        ({"grow_steps": "3,4,5", "grow_to": 4}, "grows by only 2"),
        ({"directions": "pca"}, "directions must be one of"),
        ({"seed": -1}, "seed must be"),
        ({"grow_stepz": "3"}, "unknown option"),
    ],
)
@pytest.mark.parametrize("method", ["lora_grow", "sds_grow"])
def test_bad_options_are_refused(method, options, match):
    with pytest.raises(ValueError, match=match):
        _llama(method, **options)


@pytest.mark.parametrize(
    "options,total,match",
    [
        ({"grow_steps": "10"}, 8, "after the run's last step"),
        ({"grow_steps": "0.5"}, None, "needs total_steps"),
        ({"grow_steps": "0.1"}, 8, "after step 2 or later"),
        ({"grow_steps": "0.5,4"}, 8, "strictly increasing"),
    ],
)
def test_bad_schedules_are_refused_by_the_controller(options, total, match):
    model = _llama("lora_grow", **options)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        sdslora.Controller(model, opt, total_steps=total)


def test_fractions_of_the_run():
    model = _llama("lora_grow", grow_steps="0.25,0.75", grow_to=6)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=8)
    assert ctl.plan.grow_steps == [2, 6]
    _train(model, ctl, opt, 8)
    assert [(e["step"], e["rank"]) for e in ctl.events] == [(2, 4), (6, 6)]


# ---- through the Trainer: `sdslora train` killed around a growth resumes to the uninterrupted result -------------------
class _Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` clean-up runs."""


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from harness_fixtures import cls_files, tiny_bert_dir

    d = tmp_path_factory.mktemp("grow_cli")
    return tiny_bert_dir(d / "bert"), *cls_files(d / "data")


def test_cli_resume_across_growth(cli_files, tmp_path, monkeypatch):
    """Checkpoints after steps 3 and 6 (the capture is armed after 3, the rank grows after 4); killed at step 5 the
    run resumes from the armed checkpoint, killed at 7 from the grown one (layers built at r, resized)."""
    from safetensors.torch import load_file

    from sdslora.cli import main
    from sdslora.integrations.hf import SDSLoRACallback

    model, train, dev = cli_files

    def argv(out):
        return [
            "train",
            "--model",
            str(model),
            "--train-file",
            str(train),
            "--eval-file",
            str(dev),
            "--format",
            "cls",
            "--method",
            "sds_grow",
            "--option",
            "warmup_steps=2",
            "--option",
            "grow_steps=4",
            "--steps",
            "8",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--checkpoint-every",
            "3",
            "-o",
            str(out),
            "--no-progress",
        ]

    assert main(argv(tmp_path / "straight")) == 0
    ref = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    meta = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert {rec["r"] for rec in meta["layers"].values()} == {16}  # r = 8 (the CLI default) grown to 2r
    events = [e["event"] for e in meta["controller"]["events"]]
    assert events.count("grow") == 1 and events[0] == "reparameterise"
    for kill_at in (5, 7):
        out = tmp_path / f"killed{kill_at}"
        original = SDSLoRACallback.on_step_end

        def on_step_end(self, args, state, control, _original=original, _kill=kill_at, **kw):
            if state.global_step == _kill:
                raise _Killed
            return _original(self, args, state, control, **kw)

        with monkeypatch.context() as m:
            m.setattr(SDSLoRACallback, "on_step_end", on_step_end)
            with pytest.raises(_Killed):
                main(argv(out))
        assert main(argv(out)) == 0
        got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (kill_at, k)
