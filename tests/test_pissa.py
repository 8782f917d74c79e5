"""PiSSA (SPEC.md §4.5) against PEFT ``init_lora_weights="pissa"`` / ``"pissa_niter_4"`` and its own identities."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batch_for, output_of, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import sdslora
from sdslora.io import load_adapter
from sdslora.methods.pissa import PiSSALayer, PiSSAOptions, pissa_factors

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, scale: float | None = None) -> None:
    """max|a − b| <= rtol · (scale, default max|b|)."""
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(b.abs().max()) if scale is None else scale, 1e-30)
    err = float((a - b).abs().max()) / scale
    assert err <= rtol, err


def _linear_w(module: torch.nn.Module) -> torch.Tensor:
    """Weight of a Linear / Conv1D in nn.Linear layout [out, in]."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def _sign_align(a: torch.Tensor, b: torch.Tensor, a_ref: torch.Tensor, b_ref: torch.Tensor):
    """Flip rank-one components (A row j, B column j together) of (a, b) to agree with (a_ref, b_ref): singular
    vectors are defined up to sign."""
    d = torch.sign((a * a_ref).sum(1))
    d[d == 0] = 1
    return a * d[:, None], b * d[None, :], d


def _ours_and_peft(
    kind: str, scaling: str, init: str, niter: int | None = None, r: int = 4, alpha: float = 8.0
):
    base = BUILD[kind]()
    original = copy.deepcopy(base)
    peft_base = copy.deepcopy(base)
    opts = {} if niter is None else {"pissa_niter": niter}
    cfg = sdslora.AdapterConfig(
        method="pissa", r=r, alpha=alpha, scaling=scaling, target_modules=TARGETS[kind], options=opts
    )
    ours = sdslora.attach(base, cfg)
    pcfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS[kind],
        use_rslora=scaling == "rslora",
        init_lora_weights=init,
        fan_in_fan_out=kind == "gpt2",
        lora_dropout=0.0,
    )
    peft = get_peft_model(peft_base, pcfg)
    return ours, peft, original, cfg


@pytest.mark.parametrize("kind,scaling", [("llama", "standard"), ("llama", "rslora"), ("gpt2", "rslora")])
def test_matches_peft_exact_svd(kind, scaling):
    ours, peft, original, cfg = _ours_and_peft(kind, scaling, "pissa")
    batch = batch_for(kind)
    pinner = peft.base_model.model
    for name, layer in ours.adapter_layers().items():
        pl = pinner.get_submodule(name)
        pa, pb = pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()
        a, b, _ = _sign_align(layer.lora_A.detach(), layer.lora_B.detach(), pa, pb)
        _close(a, pa, 1e-5)
        _close(b, pb, 1e-5)
        _close(layer.lora_B @ layer.lora_A, pb @ pa, 1e-5)  # sign-free
        _close(_linear_w(layer.base_layer), _linear_w(pl.base_layer), 1e-5)  # residual weight W0 − s·B0·A0
        assert layer.scale == pytest.approx(pl.scaling["default"])
        # output-preserving: s·B0·A0 + W_res == W0
        w0 = _linear_w(original.get_submodule(name))
        _close(_linear_w(layer.base_layer) + layer.scale * layer.lora_B0 @ layer.lora_A0, w0, 1e-5)
    with torch.no_grad():
        ref, out_peft, out = output_of(original, batch), output_of(peft, batch), output_of(ours, batch)
    _close(out, out_peft, 1e-5)
    _close(out, ref, 1e-5)

    # one backward: the same factor gradients (after the same sign alignment)
    ours.train(), peft.train()
    ours(**batch).loss.backward()
    peft(**batch).loss.backward()
    for name, layer in ours.adapter_layers().items():
        pl = pinner.get_submodule(name)
        pa = pl.lora_A["default"].weight
        _, _, d = _sign_align(
            layer.lora_A.detach(), layer.lora_B.detach(), pa.detach(), pl.lora_B["default"].weight
        )
        _close(layer.lora_A.grad * d[:, None], pa.grad, 1e-4)
        _close(layer.lora_B.grad * d[None, :], pl.lora_B["default"].weight.grad, 1e-4)


def test_randomised_svd_matches_peft_niter4_per_layer():
    """pissa_niter=4 draws the same random test matrix as PEFT's "pissa_niter_4" under the same seed."""
    base = tiny_llama()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    names = [n for n, m in base.named_modules() if n.split(".")[-1] in TARGETS["llama"]]
    assert len(names) == 14
    for i, name in enumerate(names):
        pl = peft.base_model.model.get_submodule(name)
        torch.manual_seed(100 + i)
        pl.pissa_init("default", "pissa_niter_4")
        torch.manual_seed(100 + i)
        layer = PiSSALayer(copy.deepcopy(base.get_submodule(name)), 4, 8 / 4, 0.0, "float32", PiSSAOptions(4))
        pa, pb = pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()
        a, b, _ = _sign_align(layer.lora_A.detach(), layer.lora_B.detach(), pa, pb)
        _close(a, pa, 1e-5)
        _close(b, pb, 1e-5)
        _close(layer.base_layer.weight, pl.base_layer.weight, 1e-5)
    # a different seed gives a different (randomised) start: the comparison above can fail
    torch.manual_seed(7)
    other = PiSSALayer(copy.deepcopy(base.get_submodule(names[0])), 4, 2.0, 0.0, "float32", PiSSAOptions(0))
    torch.manual_seed(8)
    other2 = PiSSALayer(copy.deepcopy(base.get_submodule(names[0])), 4, 2.0, 0.0, "float32", PiSSAOptions(0))
    assert not torch.allclose(other.lora_B @ other.lora_A, other2.lora_B @ other2.lora_A, atol=1e-4)


def test_factors_are_principal_part_float64():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    a, b = pissa_factors(w, 3, 0.5)
    assert a.dtype == torch.float64
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    _close(0.5 * b @ a, (u[:, :3] * s[:3]) @ vh[:3], 1e-12)
    # A = diag(√(S_r/s)) V_rᵀ: A Aᵀ = diag(S_r/s) = BᵀB
    _close(a @ a.T, torch.diag(s[:3] / 0.5), 1e-12)
    _close(b.T @ b, torch.diag(s[:3] / 0.5), 1e-12)
    with pytest.raises(ValueError, match="rank"):
        pissa_factors(w, 10, 1.0)


def _train(model, kind: str, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    for t in range(steps):
        model(**batch_for(kind, seed=t)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_to_peft_relative_to_original_base(kind, tmp_path):
    base = BUILD[kind]()
    original = copy.deepcopy(base)
    cfg = sdslora.AdapterConfig(
        method="pissa", r=4, alpha=8.0, target_modules=TARGETS[kind], options={"pissa_niter": 4}
    )
    ours = sdslora.attach(base, cfg)
    _train(ours, kind)
    for layer in ours.adapter_layers().values():
        b2, a2 = layer.export_lora()
        assert b2.shape[1] == 2 * layer.r
        delta = layer.delta_weight().detach()
        assert float(delta.abs().max()) > 1e-3  # training moved the factors
        # ΔW relative to the original W0 (cancellation of two rank-r terms: error relative to ‖s·B·A‖)
        _close(
            b2 @ a2,
            delta,
            1e-5,
            scale=float((layer.scale * layer.lora_B @ layer.lora_A).detach().abs().max()),
        )
    ours.export_peft(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(original, tmp_path / "peft").eval()
    batch = batch_for(kind, seed=11)
    with torch.no_grad():
        _close(output_of(loaded, batch), output_of(ours, batch), 1e-5)


def test_save_load_onto_fresh_original_base(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    cfg = sdslora.AdapterConfig(
        method="pissa", r=4, target_modules=TARGETS["llama"], options={"pissa_niter": 4}
    )
    torch.manual_seed(1)
    ours = sdslora.attach(base, cfg)
    _train(ours, "llama")
    ours.save_adapter(tmp_path / "a")
    torch.manual_seed(123)  # a different seed at load time: nothing random may matter
    loaded = load_adapter(fresh, tmp_path / "a")
    for name, layer in ours.adapter_layers().items():
        other = loaded.adapter_layers()[name]
        assert torch.equal(other.base_layer.weight, layer.base_layer.weight)  # W_res re-created exactly
        for k, t in layer.adapter_tensors().items():
            assert torch.equal(other.adapter_tensors()[k], t), k
    batch = batch_for("llama", seed=5)
    with torch.no_grad():
        assert torch.equal(output_of(loaded, batch), output_of(ours, batch))
    # post_load on a layer that is already re-based would subtract the principal part twice
    first = next(iter(ours.adapter_layers().values()))
    with pytest.raises(RuntimeError, match="already shifted"):
        first.post_load()
    # restore_base undoes the re-basing: the original weight again, up to rounding
    first_name = next(iter(ours.adapter_layers()))
    w_res = first.base_layer.weight.detach().clone()
    first.restore_base()
    w0 = tiny_llama().get_submodule(first_name).weight.detach()
    assert float((w_res - w0).abs().max()) > 1e-3  # the principal part is not small
    torch.testing.assert_close(first.base_layer.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="base weight is shifted"):
        first.restore_base()


def test_merge_gives_original_plus_update_and_disable_gives_residual():
    base = tiny_llama()
    original = copy.deepcopy(base)
    ours = sdslora.attach(base, sdslora.AdapterConfig(method="pissa", r=4, target_modules=TARGETS["llama"]))
    _train(ours, "llama")
    batch = batch_for("llama", seed=3)
    layers = ours.adapter_layers()
    expect = {}
    for name, layer in layers.items():
        w0 = original.get_submodule(name).weight.double()
        s = layer.scale
        a, b = layer.lora_A.double(), layer.lora_B.double()
        a0, b0 = layer.lora_A0.double(), layer.lora_B0.double()
        expect[name] = w0 + s * b @ a - s * b0 @ a0
        _close(layer.delta_weight().detach(), expect[name] - w0, 1e-5)
    with torch.no_grad():
        out = output_of(ours, batch)
        # disabled: the residual base W0 − s·B0·A0 (this method re-bases W0)
        assert PiSSALayer.rebases_base_weight
        with ours.disable_adapter():
            off = output_of(ours, batch)
        residual = copy.deepcopy(original)
        for name, layer in layers.items():
            residual.get_submodule(name).weight.copy_(layer.base_layer.weight)
        assert torch.equal(off, output_of(residual, batch))
        assert not torch.allclose(off, output_of(original, batch), atol=1e-3)
        ours.merge()
        _close(output_of(ours, batch), out, 1e-5)
        ours.unmerge()
        _close(output_of(ours, batch), out, 1e-6)
        merged = ours.merge_and_unload()
        for name, w in expect.items():
            _close(merged.get_submodule(name).weight, w, 1e-5)
        _close(output_of(merged, batch), out, 1e-5)


def test_only_factors_get_gradients():
    base = tiny_llama()
    ours = sdslora.attach(base, sdslora.AdapterConfig(method="pissa", r=4, target_modules=TARGETS["llama"]))
    ours.train()
    ours(**batch_for("llama")).loss.backward()
    got = {n for n, p in ours.model.named_parameters() if p.grad is not None}
    want = {f"{n}.{k}" for n in ours.adapter_layers() for k in ("lora_A", "lora_B")}
    assert got == want
    assert all(p.grad.abs().sum() > 0 for n, p in ours.model.named_parameters() if n in want)
    for layer in ours.adapter_layers().values():
        assert not layer.lora_A0.requires_grad and not layer.lora_B0.requires_grad
        assert set(layer.adapter_tensors()) == {"lora_A", "lora_B", "lora_A0", "lora_B0"}


@pytest.mark.parametrize("bad", [-1, 1.5, "4", True])
def test_bad_niter_raises(bad):
    with pytest.raises(ValueError, match="pissa_niter"):
        sdslora.AdapterConfig(method="pissa", r=2, options={"pissa_niter": bad})
