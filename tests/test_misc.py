"""Small checks: config validation, parameter counts, attach twice, unload, CLI."""

from __future__ import annotations

import math

import pytest
import torch
from models import batch_for, output_of, tiny_bert_cls, tiny_gpt2, tiny_llama

import sdslora
from sdslora.cli import main


@pytest.mark.parametrize(
    "kw,err,msg",
    [
        ({"alpha": 0}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"scaling": "sqrt"}, ValueError, "scaling"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"adapter_dtype": "float16"}, ValueError, "adapter_dtype"),
        ({"target_modules": []}, ValueError, "empty"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"target_modules": ["q_proj", 1]}, TypeError, "target_modules"),
        ({"modules_to_save": [1]}, TypeError, "modules_to_save"),
        ({"options": "warmup"}, TypeError, "options"),
        ({"options": {"warmup_steps": 0}}, ValueError, "warmup_steps"),
        ({"options": {"refresh": "every:0"}}, ValueError, "refresh"),
        ({"options": {"refresh_k": 0}}, ValueError, "refresh_k"),
        ({"options": {"warmup_mode": "prephase"}}, ValueError, "warmup_mode"),
        ({"options": {"warmup_mode": "init_phase", "init_phase_steps": 5}}, ValueError, "init_phase_steps"),
        ({"options": {"guard_rtol": 1.5}}, ValueError, "guard_rtol"),
    ],
)
def test_config_validation(kw, err, msg):
    with pytest.raises(err, match=msg):
        sdslora.AdapterConfig(method="sds", **kw)


def test_config_scale_and_round_trip():
    cfg = sdslora.AdapterConfig(
        method="sds", r=16, alpha=4, options={"refresh": "every:4"}, modules_to_save="head"
    )
    assert cfg.scale == pytest.approx(4 / math.sqrt(16))
    assert sdslora.AdapterConfig(method="lora", r=16, alpha=32, scaling="standard").scale == pytest.approx(
        2.0
    )
    assert cfg.modules_to_save == ["head"]
    assert cfg.options["refresh"] == "every:4" and cfg.options["warmup_steps"] == 10  # defaults filled in
    again = sdslora.AdapterConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown AdapterConfig field"):
        sdslora.AdapterConfig.from_dict({**cfg.to_dict(), "rank": 3})


@pytest.mark.parametrize("method", ["lora", "sds", "orthogonal", "full"])
def test_trainable_summary_counts(method):
    base = tiny_llama()
    total = sum(p.numel() for p in base.parameters())
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    model = sdslora.attach(base, sdslora.AdapterConfig(method=method, r=3))
    s = model.trainable_summary()
    if method == "full":
        assert s["trainable"] == total and s["layers"] == 0 and s["adapter"] == 0
    else:
        expected = sum(3 * (m.in_features + m.out_features) for m in linears.values())
        assert s["layers"] == len(linears) == 14
        assert s["adapter"] == s["trainable"] == expected
        assert s["total"] == total + expected
        assert s["trainable"] == sum(p.numel() for p in model.trainable_parameters())
    assert s["trainable_percent"] == pytest.approx(100 * s["trainable"] / s["total"])
    assert s["method"] == method


def test_trainable_summary_with_modules_to_save():
    base = tiny_bert_cls()
    head = sum(p.numel() for p in base.classifier.parameters())
    model = sdslora.attach(base, sdslora.AdapterConfig(method="lora", r=2, modules_to_save=["classifier"]))
    s = model.trainable_summary()
    assert "classifier" not in model.adapter_layers()
    assert s["trainable"] == s["adapter"] + head


def test_attach_twice_raises():
    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="lora", r=2))
    with pytest.raises(ValueError, match="already has sdslora adapters"):
        sdslora.attach(model, sdslora.AdapterConfig(method="lora", r=2))
    with pytest.raises(ValueError, match="already has sdslora adapters"):
        sdslora.attach(model.model, sdslora.AdapterConfig(method="sds", r=2))


@pytest.mark.parametrize("build,kind", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2")])
def test_unload_restores_the_original_modules(build, kind):
    base = build()
    originals = dict(base.named_modules())
    x = batch_for(kind)
    ref = output_of(base, x).detach()
    model = sdslora.attach(base, sdslora.AdapterConfig(method="sds", r=2))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_()
    assert not torch.equal(output_of(model, x), ref)
    names = list(model.adapter_layers())
    model.merge()  # unload() un-merges first
    plain = model.unload()
    assert plain is base
    for n in names:
        assert plain.get_submodule(n) is originals[n]
    assert dict(plain.named_modules()).keys() == originals.keys()
    torch.testing.assert_close(output_of(plain, x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="unloaded"):
        model.adapter_layers()
    sdslora.attach(plain, sdslora.AdapterConfig(method="lora", r=2))  # can be adapted again


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdslora {sdslora.__version__}"


def test_cli_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert listed == set(sdslora.METHODS)
    assert "warmup_steps=10" in out


def test_cli_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: sdslora" in capsys.readouterr().out


def test_a_copied_or_pickled_model_is_its_own_and_the_controller_finds_it(tmp_path):
    """The inner model's way back to its AdaptedModel (a trainer handed the inner model still finds the adapter)
    is not stored on the inner model: a deep copy finds its own wrapper, not the original's, and a whole adapted
    model can be pickled (torch.save)."""
    import copy

    from sdslora.control import find_adapted_model

    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=2, target_modules=["q_proj"]))
    twin = copy.deepcopy(model)
    assert find_adapted_model(model.model) is model and find_adapted_model(twin.model) is twin
    torch.save(model, tmp_path / "whole.pt")
    back = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert find_adapted_model(back.model) is back
    batch = batch_for("llama")
    assert torch.equal(output_of(back, batch), output_of(model, batch))
    ctl = sdslora.Controller(back.model, torch.optim.AdamW(back.trainable_parameters()), total_steps=30)
    assert ctl.model is back
    model.unload()
    with pytest.raises(Exception, match="AdaptedModel|attach"):
        find_adapted_model(model.model)
