"""The memory-bounded gradient estimator (sdslora.init.estimate_gradients) against plain autograd and PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batch_for, tiny_gpt2, tiny_llama
from torch import nn

from sdslora.init import estimate_gradients


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def _reference_grads(model: nn.Module, names: list[str], batches, reduce: str) -> dict[str, torch.Tensor]:
    """Plain autograd: every parameter trainable, one backward per batch, grads summed by .grad accumulation."""
    ref = copy.deepcopy(model).train()
    for p in ref.parameters():
        p.requires_grad_(True)
    for b in batches:
        ref(**b).loss.backward()
    out = {}
    for n in names:
        g = ref.get_submodule(n).weight.grad
        out[n] = g / len(batches) if reduce == "mean" else g
    return out


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_matches_plain_autograd_float64(reduce):
    model = tiny_llama().double()
    names = _targets(model)
    batches = [batch_for("llama", seed=s) for s in range(3)]
    ref = _reference_grads(model, names, batches, reduce)
    got = estimate_gradients(model, names, batches, reduce=reduce)
    assert set(got) == set(names)
    for n in names:
        assert got[n].dtype == torch.float64 and got[n].device.type == "cpu"
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-13)
        assert got[n].abs().sum() > 0


def test_matches_peft_preprocess_loraga_and_conv1d_layout():
    """PEFT's own LoRA-GA gradient estimate (mean over train_step batches) on GPT-2 (Conv1D, stored [in, out])."""
    from peft import LoraConfig, LoraGAConfig, preprocess_loraga

    model = tiny_gpt2()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    batches = [batch_for("gpt2", seed=s) for s in range(3)]
    ours = estimate_gradients(model, names, batches)
    peft_model = copy.deepcopy(model)
    cfg = LoraConfig(
        r=2,
        target_modules=["c_attn", "c_proj", "c_fc"],
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
        fan_in_fan_out=True,
    )

    def train_step():
        for b in batches:
            peft_model(**b).loss.backward()

    preprocess_loraga(peft_model, cfg, train_step)
    for n in names:
        g_peft = peft_model.get_submodule(n)._peft_loraga_grad  # weight layout [in, out]
        assert ours[n].shape == g_peft.T.shape == (model.get_submodule(n).nf, model.get_submodule(n).nx)
        torch.testing.assert_close(ours[n], g_peft.T, rtol=1e-5, atol=1e-7)


def test_restores_flags_grads_mode_and_hooks_also_on_error():
    model = tiny_llama()
    names = _targets(model)[:3]
    model.model.embed_tokens.weight.requires_grad_(False)
    w0 = model.get_submodule(names[0]).weight
    sentinel = torch.full_like(w0, 7.0)
    w0.grad = sentinel
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = [batch_for("llama", seed=s) for s in range(2)]

    def check():
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert w0.grad is sentinel
        assert all(p.grad is None for n, p in model.named_parameters() if p is not w0)
        assert not model.training
        for n in names:
            assert not model.get_submodule(n).weight._post_accumulate_grad_hooks

    got = estimate_gradients(model, names, batches)
    check()
    ref = _reference_grads(model, names, batches, "mean")
    torch.testing.assert_close(
        got[names[0]], ref[names[0]], rtol=1e-5, atol=1e-7
    )  # the old .grad not counted

    calls = []

    def failing_loss(m, b):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return m(**b).loss

    with pytest.raises(RuntimeError, match="boom"):
        estimate_gradients(model, names, batches, loss_fn=failing_loss)
    check()


class _Stack(nn.Module):
    """Several large-ish linear layers of different sizes."""

    def __init__(self):
        super().__init__()
        dims = [64, 256, 128, 384, 64]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_peak_live_gradient_bounded_by_largest_layer():
    torch.manual_seed(0)
    model = _Stack()
    names = [f"layers.{i}" for i in range(4)]
    weights = [model.get_submodule(n).weight for n in names]
    sizes = [w.numel() * w.element_size() for w in weights]
    live_max, calls = [0], [0]

    def probe(_p):  # registered before the estimator's hooks, so it runs first: sees the layer's fresh .grad
        calls[0] += 1
        live = sum(w.grad.numel() * w.grad.element_size() for w in weights if w.grad is not None)
        live_max[0] = max(live_max[0], live)

    handles = [w.register_post_accumulate_grad_hook(probe) for w in weights]
    batches = [torch.randn(8, 64) for _ in range(3)]
    try:
        got = estimate_gradients(model, names, batches, loss_fn=lambda m, x: m(x).pow(2).mean())
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == len(names) * len(batches)
    assert live_max[0] == max(sizes) < sum(sizes)  # one layer at a time, never all of them
    assert all(w.grad is None for w in weights)
    # and the result is still the full summed gradient
    ref = copy.deepcopy(model)
    for x in batches:
        ref(x).pow(2).mean().backward()
    for n in names:
        torch.testing.assert_close(got[n], ref.get_submodule(n).weight.grad / 3, rtol=1e-5, atol=1e-7)


def test_errors():
    model = tiny_llama()
    names = _targets(model)
    b = batch_for("llama")
    with pytest.raises(ValueError, match="no batches"):
        estimate_gradients(model, names, [])
    with pytest.raises(ValueError, match="reduce"):
        estimate_gradients(model, names, [b], reduce="max")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        estimate_gradients(model, ["model.norm"], [b])
    with pytest.raises(ValueError, match="no .loss"):
        estimate_gradients(model, names, [{"input_ids": b["input_ids"]}])
    with pytest.raises(TypeError, match="dicts"):
        estimate_gradients(model, names, [b["input_ids"]])
    assert all(p.requires_grad for p in model.parameters())
