"""Bad input gives a clear ValueError / TypeError naming the problem; failed saves never damage a good adapter."""

from __future__ import annotations

import json

import pytest
import torch
from models import batch_for, output_of, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

import sdslora
import sdslora.io as sio
from sdslora.methods.base import AdapterLayer


def _cfg(**kw) -> sdslora.AdapterConfig:
    kw.setdefault("method", "sds")
    kw.setdefault("r", 4)
    return sdslora.AdapterConfig(**kw)


def _no_adapters(model: nn.Module) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules())


# ---- config and attach -------------------------------------------------------------------------------------------
def test_rank_below_one():
    with pytest.raises(ValueError, match="r must be >= 1"):
        _cfg(r=0)
    with pytest.raises(TypeError, match="r must be an int"):
        _cfg(r=2.0)


def test_rank_above_layer_dims():
    model = tiny_llama()  # k_proj/v_proj: in 32, out 16
    with pytest.raises(ValueError, match=r"r=17 .*k_proj.*max rank 16"):
        sdslora.attach(model, _cfg(r=17))
    assert _no_adapters(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either


def test_no_target_matched_lists_what_exists():
    with pytest.raises(ValueError, match=r"no module matched.*q_proj.*up_proj"):
        sdslora.attach(tiny_llama(), _cfg(target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="no module matched"):
        sdslora.attach(tiny_llama(), _cfg(target_modules=r".*\.nothing_like_this"))
    with pytest.raises(ValueError, match="regular expression"):
        sdslora.attach(tiny_llama(), _cfg(target_modules="(unclosed"))


@pytest.mark.parametrize(
    "model,target",
    [
        (lambda: tiny_llama(), ["embed_tokens"]),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 8)), ["0"]),
    ],
    ids=["embedding", "conv2d"],
)
def test_unsupported_layer_type(model, target):
    m = model()
    with pytest.raises(TypeError, match=r"(Embedding|Conv2d).*cannot adapt"):
        sdslora.attach(m, _cfg(method="dora", target_modules=target))
    assert _no_adapters(m)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match=r"unknown method 'sdss'.*'sds'"):
        _cfg(method="sdss")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['warmup'\].*warmup_steps"):
        _cfg(options={"warmup": 5})
    with pytest.raises(ValueError, match="takes no options"):
        _cfg(method="lora", options={"warmup_steps": 5})
    with pytest.raises(ValueError, match="refresh"):
        _cfg(options={"refresh": "sometimes"})


def test_attach_wrong_types():
    with pytest.raises(TypeError, match="AdapterConfig"):
        sdslora.attach(tiny_llama(), {"method": "lora"})
    with pytest.raises(TypeError, match="nn.Module"):
        sdslora.attach("model", _cfg())


# ---- Controller --------------------------------------------------------------------------------------------------
def test_controller_needs_total_steps():
    model = sdslora.attach(tiny_llama(), _cfg())
    opt = torch.optim.AdamW(model.trainable_parameters())
    with pytest.raises(ValueError, match="needs total_steps"):
        sdslora.Controller(model, opt)
    sdslora.Controller(model, opt, total_steps=10)  # fine
    uniform = sdslora.attach(tiny_llama(), _cfg(options={"refresh": "every:3"}))
    sdslora.Controller(uniform, torch.optim.AdamW(uniform.trainable_parameters()))  # no T needed
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        sdslora.Controller(model, opt, total_steps=0)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        sdslora.Controller(model, opt, total_steps=10.0)


def test_controller_optimizer_must_hold_adapter():
    model = sdslora.attach(tiny_llama(), _cfg())
    params = model.trainable_parameters()
    with pytest.raises(ValueError, match="does not hold"):
        sdslora.Controller(model, torch.optim.AdamW(params[:3]), total_steps=10)
    with pytest.raises(ValueError, match="pass the optimizer"):
        sdslora.Controller(model, None, total_steps=10)
    with pytest.raises(TypeError, match="attach"):
        sdslora.Controller(tiny_llama(), torch.optim.AdamW(params), total_steps=10)


# ---- loading -----------------------------------------------------------------------------------------------------
def test_load_into_other_shapes(saved):
    path, _ = saved
    cfg = tiny_llama().config
    cfg.intermediate_size = 40
    other = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"does not fit this model.*up_proj"):
        sdslora.load_adapter(other, path)
    assert _no_adapters(other)  # left as it was
    with pytest.raises(ValueError, match="no module"):
        sdslora.load_adapter(tiny_gpt2(), path)


def test_load_truncated_weights(saved):
    path, _ = saved
    f = path / sio.WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    base = tiny_llama()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        sdslora.load_adapter(base, path)
    assert _no_adapters(base)


def test_load_missing_key(saved):
    path, _ = saved
    f = path / sio.WEIGHTS_NAME
    tensors = load_file(str(f))
    victim = sorted(tensors)[3]
    del tensors[victim]
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match="incomplete.*missing"):
        sdslora.load_adapter(tiny_llama(), path)


def test_load_garbage_json(saved):
    path, _ = saved
    (path / sio.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        sdslora.load_adapter(tiny_llama(), path)
    (path / sio.CONFIG_NAME).write_text(json.dumps({"format": "sdslora-adapter", "format_version": 1}))
    with pytest.raises(ValueError, match="incomplete"):
        sdslora.load_adapter(tiny_llama(), path)
    (path / sio.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="PEFT"):
        sdslora.load_adapter(tiny_llama(), path)


def test_load_missing_files(saved, tmp_path):
    path, _ = saved
    with pytest.raises(ValueError, match="does not exist"):
        sdslora.load_adapter(tiny_llama(), tmp_path / "nowhere")
    (path / sio.WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=f"{sio.WEIGHTS_NAME} is missing"):
        sdslora.load_adapter(tiny_llama(), path)
    (path / sio.CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=f"{sio.CONFIG_NAME} is missing"):
        sdslora.load_adapter(tiny_llama(), path)


def test_load_bad_config_values(saved):
    path, _ = saved
    meta = json.loads((path / sio.CONFIG_NAME).read_text())
    meta["config"]["r"] = 0
    (path / sio.CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="r must be >= 1"):
        sdslora.load_adapter(tiny_llama(), path)
    meta["config"]["r"] = 4
    meta["config"]["colour"] = "red"
    (path / sio.CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown AdapterConfig field"):
        sdslora.load_adapter(tiny_llama(), path)


# ---- failed saves ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["save_adapter", "export_peft"])
def test_failed_save_keeps_the_old_adapter(saved, monkeypatch, what):
    path, out = saved
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "keep.bin").write_bytes(b"\x00\x01")
    if what == "export_peft":
        good = sdslora.load_adapter(tiny_llama(), path)
        good.export_peft(path / "peft")
        path_written = path / "peft"
    else:
        path_written = path
    before = {p.name: p.read_bytes() for p in path_written.iterdir() if p.is_file()}
    real_save = sio.save_file

    def failing_save(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:2]), filename, metadata=metadata)  # a partial file...
        raise OSError("disk full")  # ...then the failure

    monkeypatch.setattr(sio, "save_file", failing_save)
    model = sdslora.attach(tiny_llama(seed=1), _cfg())
    with pytest.raises(OSError, match="disk full"):
        getattr(model, what)(path_written)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in path_written.iterdir() if p.is_file()}
    assert after == before
    assert (path / "notes.txt").read_text() == "mine" and (
        path / "sub" / "keep.bin"
    ).read_bytes() == b"\x00\x01"
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # no staging folder left behind
    loaded = sdslora.load_adapter(tiny_llama(), path)
    assert torch.equal(output_of(loaded, batch_for("llama")), out)


def test_successful_save_leaves_other_files_alone(saved):
    path, _ = saved
    (path / "notes.txt").write_text("mine")
    model = sdslora.attach(tiny_llama(seed=2), _cfg())
    model.save_adapter(path)
    assert (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in path.iterdir()) == sorted([sio.CONFIG_NAME, sio.WEIGHTS_NAME, "notes.txt"])


def test_save_to_a_file_path(tmp_path):
    model = sdslora.attach(tiny_llama(), _cfg())
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        model.save_adapter(tmp_path / "f")


def test_save_merged_or_unloaded_raises(tmp_path):
    model = sdslora.attach(tiny_llama(), _cfg())
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.save_adapter(tmp_path / "a")
    model.unmerge()
    model.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        model.save_adapter(tmp_path / "a")
