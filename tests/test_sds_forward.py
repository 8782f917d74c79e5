"""SDS-LoRA's memory-lean decoupled forward equals autograd through the concatenated rank-2r path."""

import pytest
import torch
import torch.nn.functional as F

from sdslora.methods.sds import _TwoBlockLinear


def _blocks(dtype, m=7, n=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, grad: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    x = mk(3, 4, n, grad=True)
    # SDS layout: u1 = Q_B (buffer), u2 = B (trainable), d1 = A (trainable), d2 = Q_Aᵀ (buffer)
    return x, mk(m, r, grad=False), mk(m, r, grad=True), mk(r, n, grad=True), mk(r, n, grad=False)


def test_gradcheck_float64():
    x, u1, u2, d1, d2 = _blocks(torch.float64)
    u1.requires_grad_(True)
    d2.requires_grad_(True)  # every input differentiable: all five gradient formulas are exercised
    assert torch.autograd.gradcheck(lambda *t: _TwoBlockLinear.apply(*t, 0.7), (x, u1, u2, d1, d2))


def test_matches_concatenated_path_and_skips_buffers():
    x, u1, u2, d1, d2 = _blocks(torch.float64)
    y = _TwoBlockLinear.apply(x, u1, u2, d1, d2, 1.3)
    ref = F.linear(F.linear(x, torch.cat([d1, d2], 0)), torch.cat([u1, u2], 1)) * 1.3
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), (x, u2, d1))
    exp = torch.autograd.grad((ref * w).sum(), (x, u2, d1))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    y = _TwoBlockLinear.apply(x, u1, u2, d1, d2, 1.3)
    y.sum().backward()
    assert u1.grad is None and d2.grad is None  # buffers get nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_backward_close_to_reference(dtype):
    x, u1, u2, d1, d2 = _blocks(torch.float32, m=16, n=12, r=3)
    with torch.autocast("cpu", dtype=dtype):
        y = _TwoBlockLinear.apply(x, u1, u2, d1, d2, 0.5)
    assert y.dtype == dtype
    gx, gu2, gd1 = torch.autograd.grad(y.float().sum(), (x, u2, d1))
    assert gx.dtype == gu2.dtype == gd1.dtype == torch.float32
    ref = F.linear(F.linear(x, torch.cat([d1, d2], 0)), torch.cat([u1, u2], 1)) * 0.5
    ex, eu2, ed1 = torch.autograd.grad(ref.sum(), (x, u2, d1))
    for a, b in ((gx, ex), (gu2, eu2), (gd1, ed1)):
        assert torch.isfinite(a).all()
        assert (a - b).norm() / b.norm() < 3e-2


def _sds_layers(n_layers=3, seed=0, dtype=torch.float64):
    import copy

    from torch import nn

    import sdslora

    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(10, 12, dtype=dtype) for _ in range(n_layers)])
    adapted = sdslora.attach(model, sdslora.AdapterConfig(method="sds", r=3, adapter_dtype="base"))
    layers = list(adapted.adapter_layers().values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()
            layer.reparameterise(reset_to_zero=False)
            layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))  # training moved the factors
            layer.lora_B.add_(0.3 * torch.randn_like(layer.lora_B))
    return layers, copy.deepcopy(layers)


@pytest.mark.parametrize("align", ["qr", "procrustes", "preserve"])
def test_batched_refresh_equals_one_layer_at_a_time(align):
    from sdslora.methods.sds import SDSLayer

    batched, single = _sds_layers()
    with torch.no_grad():  # the middle layer is rank deficient: it must be skipped, the others refreshed
        for group in (batched, single):
            group[1].lora_B[:, 2] = 0.0
    rows = SDSLayer.refresh_batch(batched, 1e-6, align)
    assert rows[:, 3].tolist() == [1.0, 0.0, 1.0]
    for i, (b, s) in enumerate(zip(batched, single)):
        stats = s.refresh(1e-6, align)
        assert (stats is None) == (i == 1)
        if stats is not None:
            torch.testing.assert_close(rows[i, :3], torch.stack(stats), rtol=1e-10, atol=1e-12)
        for name in ("lora_QA", "lora_QB", "lora_A", "lora_B"):
            torch.testing.assert_close(getattr(b, name), getattr(s, name), rtol=1e-12, atol=1e-12)
