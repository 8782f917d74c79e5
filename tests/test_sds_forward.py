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
