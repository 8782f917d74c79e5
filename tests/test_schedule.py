"""SDS-LoRA's step schedule (SPEC.md §1.4, §1.5, §1.7): re-parameterisation, optimizer reset, basis refreshes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdslora
from sdslora.methods.sds import SDSOptions, refresh_steps

K = 5
TW = 10


def spec_refresh_steps(T: int, warmup: int = TW, k: int = K) -> list[int]:
    """SPEC.md §1.5 restated: for t > T_w refresh iff t mod (⌊t / ⌊T/k⌋⌋ + 1) = 0."""
    out = []
    for t in range(1, T + 1):
        if t <= warmup:
            continue
        phase = T // k
        if phase == 0:  # ⌊T/k⌋ = 0 only for T < k, where no step passes the warm-up anyway
            continue
        if t % (t // phase + 1) == 0:
            out.append(t)
    return out


def _layer_model(method: str = "sds", dtype=torch.float64, **options) -> sdslora.AdaptedModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10)).to(dtype)
    cfg = sdslora.AdapterConfig(method=method, r=3, adapter_dtype="base", options=options)
    return sdslora.attach(base, cfg)


def _run_schedule(model, total: int | None, steps: int, seed: int = 0):
    """Step a Controller ``steps`` times, moving A and B randomly before each step (as training would);
    return (controller, set of steps after which the bases changed, events)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=total)
    layer = next(iter(model.adapter_layers().values()))
    changed = set()
    for t in range(1, steps + 1):
        with torch.no_grad():
            layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g, dtype=layer.lora_A.dtype))
            layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
        before = layer.lora_QA.clone(), layer.lora_QB.clone()
        ctl.step()
        assert ctl.t == t
        if not (torch.equal(before[0], layer.lora_QA) and torch.equal(before[1], layer.lora_QB)):
            changed.add(t)
    return ctl, changed, ctl.events


T_VALUES = [1, 5, 9, 10, 11, 12, 14, 17, 23, 40, 49, 50, 99, 100, 101, 137, 250]


@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
@pytest.mark.parametrize("T", T_VALUES)
def test_decay_schedule_matches_spec(T, faithful):
    expected = spec_refresh_steps(T)
    assert refresh_steps(T, SDSOptions(faithful=faithful)) == expected
    if T >= 100:  # every phase visible: intervals 1, 2, 3, 4, 5 after the warm-up
        p = T // K
        for phase in range(1, K + 1):
            lo, hi = max(phase - 1, 0) * p, phase * p
            in_phase = [t for t in expected if lo <= t < hi and t > TW]
            gaps = {b - a for a, b in zip(in_phase, in_phase[1:])}
            assert gaps == {phase}, (phase, gaps)
    model = _layer_model(faithful=faithful)
    if T < TW:  # the run would end before the re-parameterisation: plain LoRA under the name sds is refused
        with pytest.raises(ValueError, match=f"total_steps={T} ends before method 'sds'"):
            _run_schedule(model, T, T)
        return
    ctl, changed, events = _run_schedule(model, T, T)
    reparam = [e["step"] for e in events if e["event"] == "reparameterise"]
    refresh = [e["step"] for e in events if e["event"] == "refresh"]
    assert reparam == [TW]
    assert refresh == expected
    assert all(e["layers"] == 1 and e["skipped"] == 0 for e in events if e["event"] == "refresh")
    # the bases change exactly at the re-parameterisation and at the refreshes, never in between
    assert changed == set(reparam) | set(expected)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_every_n_schedule(n):
    T = 40
    expected = [t for t in range(TW + 1, T + 1) if (t - TW) % n == 0]
    model = _layer_model(refresh=f"every:{n}")
    assert refresh_steps(T, model.adapter_config.method_options()) == expected
    ctl, changed, events = _run_schedule(model, None, T)  # no total_steps needed for a uniform interval
    assert [e["step"] for e in events if e["event"] == "refresh"] == expected
    assert changed == {TW, *expected}


def test_never_refresh():
    model = _layer_model(refresh="never")
    ctl, changed, events = _run_schedule(model, None, 30)
    assert [e["event"] for e in events] == ["reparameterise"]
    assert changed == {TW}


def test_custom_warmup_and_k():
    model = _layer_model(warmup_steps=4, refresh_k=3)
    T = 60
    expected = spec_refresh_steps(T, warmup=4, k=3)
    ctl, changed, events = _run_schedule(model, T, T)
    assert [e["step"] for e in events if e["event"] == "reparameterise"] == [4]
    assert [e["step"] for e in events if e["event"] == "refresh"] == expected


@pytest.mark.parametrize("method", ["sds", "orthogonal"])
def test_init_phase(method):
    """SPEC §1.7: every warmup_steps steps of the init phase A = B = 0 (ΔW = 0), bases from the SVD, optimizer
    state cleared; then the schedule runs on the remaining steps, shifted by init_phase_steps."""
    P, T = 30, 110
    model = _layer_model(method, warmup_mode="init_phase", init_phase_steps=P)
    layer = next(iter(model.adapter_layers().values()))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=T)
    x = torch.randn(6, 12, dtype=torch.float64)
    for t in range(1, T + 1):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        delta_before = layer.delta_weight().detach().clone()
        ctl.step()
        if t <= P and t % TW == 0:
            assert float(layer.delta_weight().detach().abs().max()) < 1e-12 * max(
                float(delta_before.abs().max()), 1.0
            )
            if method == "sds":
                assert not layer.lora_A.any() and not layer.lora_B.any()
            assert layer.lora_A not in opt.state and layer.lora_B not in opt.state
        elif t == P + TW:
            # the bases exist already: ΔW = s(B Q_Aᵀ + Q_B A) has rank ≤ 2r and the split keeps its rank-r SVD
            u, sv, vh = torch.linalg.svd(delta_before)
            r = layer.r
            truncated = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
            assert float(sv[r]) > 1e-6 * float(sv[0])  # the truncation is not trivial
            torch.testing.assert_close(layer.delta_weight().detach(), truncated, rtol=1e-10, atol=1e-12)
            assert layer.lora_A not in opt.state
        elif t > 1:
            assert opt.state[layer.lora_A]["step"] > 0
    resets = [e["step"] for e in ctl.events if e["event"] == "init_phase_reset"]
    assert resets == [10, 20, 30]
    assert [e["step"] for e in ctl.events if e["event"] == "reparameterise"] == [P + TW]
    expected = [P + t for t in spec_refresh_steps(T - P)]
    assert [e["step"] for e in ctl.events if e["event"] == "refresh"] == expected
    assert refresh_steps(T, model.adapter_config.method_options()) == expected


@pytest.mark.parametrize("method", ["sds", "orthogonal"])
def test_reparameterisation_preserves_delta_and_refresh_is_idempotent(method):
    model = _layer_model(method)
    layer = next(iter(model.adapter_layers().values()))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    x = torch.randn(7, 12, dtype=torch.float64, generator=g)
    before, y_before = layer.delta_weight().detach().clone(), model(x).detach()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=100)
    ctl.step(t=TW)
    after = layer.delta_weight().detach()
    assert layer.decoupled
    assert float((after - before).norm() / before.norm()) < 1e-6
    torch.testing.assert_close(model(x), y_before, rtol=1e-10, atol=1e-12)
    # SPEC §1.4: Q_B = U, Q_A = V, A = ½ΣVᵀ, B = ½UΣ of the rank-r SVD of B·A
    u, s, vh = torch.linalg.svd(before / layer.scale)
    r = layer.r
    if method == "sds":
        QA, QB = layer.lora_QA, layer.lora_QB
        torch.testing.assert_close(QB @ QB.T, u[:, :r] @ u[:, :r].T, rtol=0, atol=1e-12)
        torch.testing.assert_close(QA.T @ QA, vh[:r].T @ vh[:r], rtol=0, atol=1e-12)
        torch.testing.assert_close(
            layer.lora_B.T @ layer.lora_B, torch.diag(s[:r] ** 2) / 4, rtol=0, atol=1e-10
        )
        state = (layer.lora_QA.clone(), layer.lora_QB.clone(), layer.lora_A.detach().clone())
    else:
        torch.testing.assert_close(
            layer.lora_B.T @ layer.lora_B, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0
        )
        state = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    assert [e["event"] for e in ctl.events] == ["reparameterise"]
    ctl.step(t=TW + 1)  # a refresh right away: nothing changes
    assert [e["event"] for e in ctl.events] == ["reparameterise", "refresh"]
    now = (
        (layer.lora_QA, layer.lora_QB, layer.lora_A.detach())
        if method == "sds"
        else (layer.lora_A.detach(), layer.lora_B.detach())
    )
    for a, b in zip(state, now):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert ctl.events[-1]["jump_mean"] < 1e-10


def test_reparameterisation_float32_relative_error():
    model = _layer_model("sds", dtype=torch.float32)
    layer = next(iter(model.adapter_layers().values()))
    with torch.no_grad():
        layer.lora_B.normal_()
    before = layer.delta_weight().detach().clone()
    sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=50).step(
        t=TW
    )
    assert float((layer.delta_weight().detach() - before).norm() / before.norm()) < 1e-5


def test_optimizer_state_cleared_at_reparameterisation_only():
    """SPEC §1.4 step 3: the AdamW state of A and B (moments and step counters) restarts after step 10; other
    trainable tensors (modules_to_save) keep theirs; refreshes leave the optimizer alone."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    cfg = sdslora.AdapterConfig(method="sds", r=3, target_modules=["0"], modules_to_save=["2"])
    model = sdslora.attach(base, cfg)
    layer = model.adapter_layers()["0"]
    head = model.model[2].weight
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=100)
    x = torch.randn(8, 12)
    for t in range(1, 16):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        if t == TW:
            assert layer.lora_A not in opt.state and layer.lora_B not in opt.state
        else:
            n_a = t if t < TW else t - TW
            assert int(opt.state[layer.lora_A]["step"]) == n_a
            assert int(opt.state[layer.lora_B]["step"]) == n_a
        assert int(opt.state[head]["step"]) == t
    assert [e["step"] for e in ctl.events if e["event"] == "refresh"] == [11, 12, 13, 14, 15]


def _signfixed_qr(x: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(x)
    return q * torch.sign(torch.diagonal(r))[None, :]


@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
def test_what_a_refresh_does(faithful):
    """faithful=True (SPEC §1.3/§1.5): Q_A, Q_B become the sign-fixed QR bases of the current Aᵀ and B, A and B are
    kept, so ΔW moves. Default (``refresh_align="preserve"``): bases of the same spans, rotated to be closest to the
    old bases, and A, B re-expressed so that ΔW does not move at all."""
    model = _layer_model(faithful=faithful)
    layer = next(iter(model.adapter_layers().values()))
    assert layer.options.refresh_align == ("qr" if faithful else "preserve")
    ctl = sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=100)
    ctl.step(t=TW)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # training moves A and B off the bases
        layer.lora_A.add_(0.3 * torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64))
        layer.lora_B.add_(0.3 * torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    A, B, delta = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.delta_weight().detach().clone()
    old_qa, old_qb = layer.lora_QA.T.clone(), layer.lora_QB.clone()
    ctl.step(t=TW + 1)
    qa, qb = layer.lora_QA.T, layer.lora_QB
    proj = lambda q: q @ q.T  # noqa: E731
    # both modes: orthonormal bases of row(A) and col(B) as they were before the refresh
    torch.testing.assert_close(proj(qa), proj(_signfixed_qr(A.T)), rtol=0, atol=1e-12)
    torch.testing.assert_close(proj(qb), proj(_signfixed_qr(B)), rtol=0, atol=1e-12)
    jump = float((layer.delta_weight().detach() - delta).norm() / delta.norm())
    if faithful:
        torch.testing.assert_close(qa, _signfixed_qr(A.T), rtol=0, atol=1e-12)
        torch.testing.assert_close(qb, _signfixed_qr(B), rtol=0, atol=1e-12)
        assert torch.equal(layer.lora_A.detach(), A) and torch.equal(layer.lora_B.detach(), B)
        assert jump > 1e-2 and ctl.events[-1]["jump_mean"] == pytest.approx(jump, rel=1e-6)
    else:
        assert jump < 1e-12 and ctl.events[-1]["jump_mean"] < 1e-12
        # the closest basis of the new span to the old one: Q_newᵀ Q_old is symmetric positive definite
        for new, old in ((qa, old_qa), (qb, old_qb)):
            m = new.T @ old
            torch.testing.assert_close(m, m.T, rtol=0, atol=1e-12)
            assert float(torch.linalg.eigvalsh(m).min()) > 0


def test_guard_skips_rank_deficient_layer():
    """A refresh skips a layer whose factor is numerically rank deficient (relative guard)."""
    model = _layer_model("sds")
    layer = next(iter(model.adapter_layers().values()))
    with torch.no_grad():
        layer.lora_B.normal_()
    ctl = sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=100)
    ctl.step(t=TW)
    qa, qb = layer.lora_QA.clone(), layer.lora_QB.clone()
    with torch.no_grad():
        layer.lora_B[:, 1] = layer.lora_B[:, 0]  # rank-deficient B
        layer.lora_A.add_(0.5)
    ctl.step(t=TW + 1)
    assert ctl.events[-1]["skipped"] == 1 and ctl.events[-1]["layers"] == 0
    assert torch.equal(qa, layer.lora_QA) and torch.equal(qb, layer.lora_QB)
