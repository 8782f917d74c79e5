"""Nothing lost, nothing silent: one row per bad input or fault, each a clear error (or warning) naming the
problem, and the user's model / saved adapter exactly as they were. Saves are tested at every point of the switch
by injected crashes (not by luck)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import batch_for, output_of, tiny_bert_cls, tiny_llama

import sdslora
import sdslora.io as sio
from sdslora.control import NonFiniteError
from sdslora.methods.base import AdapterLayer
from sdslora.methods.sds import SDSLayer


def _cfg(**kw) -> sdslora.AdapterConfig:
    kw.setdefault("method", "sds")
    kw.setdefault("r", 4)
    return sdslora.AdapterConfig(**kw)


def _state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _same_state(model: torch.nn.Module, before: dict[str, tuple[torch.Tensor, bool]]) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == before.keys() and all(
        torch.equal(now[n].detach(), t) and now[n].requires_grad == g for n, (t, g) in before.items()
    ) and not any(isinstance(m, AdapterLayer) for m in model.modules())


# ---- bad values: one row per case ----------------------------------------------------------------------------------
BAD_CONFIGS = [
    ("guard_rtol-string", dict(options={"guard_rtol": "x"}), "guard_rtol='x' must be a finite number"),
    ("lr_scale-inf", dict(options={"lr_scale": float("inf")}), "lr_scale=inf must be a finite number"),
    ("warmup-bool", dict(options={"warmup_steps": True}), "warmup_steps=True must be an integer"),
    ("faithful-int", dict(options={"faithful": 1}), "faithful=1 must be true or false"),
    ("refresh_k-float", dict(options={"refresh_k": 5.0}), "refresh_k=5.0 must be an integer"),
    ("dropout-string", dict(dropout="0.1"), "dropout='0.1' must be a finite number"),
    ("dropout-nan", dict(dropout=float("nan")), "dropout=nan must be a finite number"),
    ("alpha-inf", dict(alpha=float("inf")), "alpha must be a positive finite number"),
    ("pissa-niter-bool", dict(method="pissa", options={"pissa_niter": False}), "pissa_niter=False must be"),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**kw)


BAD_OPTIMIZERS = [
    ("lr-nan", dict(lr=float("nan")), "lr must be a finite number > 0"),
    ("lr-inf", dict(lr=float("inf")), "lr must be a finite number > 0"),
    ("lr-negative", dict(lr=-1e-3), "lr must be a finite number > 0"),
    ("eps-zero", dict(eps=0.0), "eps must be a finite number > 0"),
    ("wd-string", dict(weight_decay="0.1"), "weight_decay must be a finite number"),
    ("betas", dict(betas=(0.9, 1.0)), "betas must be two numbers in"),
    ("option-type", dict(name="loraplus", loraplus_lr_ratio="16"), "loraplus_lr_ratio='16' must be"),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in BAD_OPTIMIZERS], ids=[c[0] for c in BAD_OPTIMIZERS])
def test_bad_optimizer_values(kw, match):
    model = sdslora.attach(tiny_llama(), _cfg(method="lora"))
    with pytest.raises(ValueError, match=match):
        sdslora.build_optimizer(model, **kw)


# ---- the Controller ----------------------------------------------------------------------------------------------
def _sds_run(warmup: int = 2, total: int = 20, **opt_kw):
    model = sdslora.attach(tiny_llama(), _cfg(options={"warmup_steps": warmup}))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, **opt_kw)
    return model, opt, sdslora.Controller(model, opt, total_steps=total)


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def test_total_steps_before_the_warmup_is_refused():
    model = sdslora.attach(tiny_llama(), _cfg(options={"warmup_steps": 10}))
    opt = torch.optim.AdamW(model.trainable_parameters())
    with pytest.raises(ValueError, match="total_steps=5 ends before method 'sds'.*plain LoRA"):
        sdslora.Controller(model, opt, total_steps=5)
    sdslora.Controller(model, opt, total_steps=10)  # the re-parameterisation falls on the last step: fine


def test_step_past_total_steps_warns_once():
    _, _, ctl = _sds_run(total=3)
    for _ in range(3):
        ctl.step()
    with pytest.warns(UserWarning, match="optimizer step 4 is past total_steps=3"):
        ctl.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctl.step()  # once is enough


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_factor_before_a_duty(bad):
    model, _, ctl = _sds_run(warmup=2)
    ctl.step()
    name, layer = next(iter(model.adapter_layers().items()))
    with torch.no_grad():
        layer.lora_B[0, 0] = bad
    before = _adapter_tensors(model)
    with pytest.raises(NonFiniteError, match=rf"optimizer step 2, layer '{name}' holds 1 NaN/Inf value\(s\) in "
                                             r"lora_B.*learning rate too high"):
        ctl.step()
    after = _adapter_tensors(model)
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
    assert ctl.t == 1 and not layer.decoupled  # nothing happened: not re-parameterised, counter not advanced


def test_duty_that_produces_nonfinite_values_is_rolled_back(monkeypatch):
    model, _, ctl = _sds_run(warmup=2)
    ctl.step()
    before = _adapter_tensors(model)
    real = SDSLayer.reparameterise

    def overflowing(self, *a, **kw):
        out = real(self, *a, **kw)
        self.lora_QA.mul_(float("inf"))
        return out

    monkeypatch.setattr(SDSLayer, "reparameterise", overflowing)
    with pytest.raises(NonFiniteError, match="duty after optimizer step 2 produced .* NaN/Inf value.* lora_QA"):
        ctl.step()
    after = _adapter_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.decoupled for layer in model.adapter_layers().values())  # phase rolled back too
    monkeypatch.undo()
    ctl.step()  # the same step now succeeds
    assert ctl.t == 2 and all(layer.decoupled for layer in model.adapter_layers().values())


def _to_first_refresh(**options):
    """An SDS run past its re-parameterisation (step 2) whose next duty, step 4, is a refresh (every:2)."""
    model = sdslora.attach(tiny_llama(), _cfg(options={"warmup_steps": 2, "refresh": "every:2", **options}))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    batch = batch_for(tiny_llama())
    for _ in range(3):  # trained steps: B gains full rank, so that the refresh refreshes every layer
        output_of(model, batch).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    assert ctl.plan.atomic(ctl.layers, 4) and not ctl.plan.atomic(ctl.layers, 2)
    return model, ctl


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_factor_before_a_refresh_is_named_and_nothing_changes(bad):
    model, ctl = _to_first_refresh()
    name, layer = list(model.adapter_layers().items())[3]
    with torch.no_grad():
        layer.lora_A[1, 2] = bad
    before = _adapter_tensors(model)
    with pytest.raises(NonFiniteError, match=rf"optimizer step 4, layer '{name}' holds 1 NaN/Inf value\(s\) in "
                                             r"lora_A.*learning rate too high"):
        ctl.step()
    after = _adapter_tensors(model)
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
    assert ctl.t == 3


@pytest.mark.parametrize(
    "align,match",
    [
        ("qr", "would hold NaN/Inf values after the basis refresh .nothing was written"),
        ("preserve", "a factorisation in method 'sds''s duty failed .* left as it was"),  # its Procrustes SVD fails
    ],
)
def test_refresh_that_would_produce_nonfinite_values_writes_nothing(monkeypatch, align, match):
    import sdslora.methods.sds as sds_mod

    model, ctl = _to_first_refresh(refresh_align=align)
    before = _adapter_tensors(model)
    real = sds_mod.qr_signfixed

    def poisoned(x):
        q, d = real(x)
        return q * float("inf"), d

    monkeypatch.setattr(sds_mod, "qr_signfixed", poisoned)
    with pytest.raises(NonFiniteError, match=match):
        ctl.step()
    after = _adapter_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and ctl.t == 3
    monkeypatch.undo()
    ctl.step()  # the same step now succeeds
    assert ctl.t == 4 and ctl.events[-1]["event"] == "refresh"


def test_large_finite_factors_whose_sum_overflows_are_not_called_nonfinite(monkeypatch):
    # the Controller checks finiteness with one sum over all adapter tensors of a dtype; a sum that overflows
    # float32 although every value is finite must send it to the exact per-tensor scan, which finds nothing
    model, _, ctl = _sds_run(warmup=2)
    ctl.step()
    calls = []
    monkeypatch.setattr(SDSLayer, "reparameterise", lambda self, *a, **kw: calls.append(self))  # a duty that works
    first, second = list(model.adapter_layers().values())[:2]
    with torch.no_grad():
        first.lora_A[0, 0] = second.lora_A[0, 0] = 3e38  # finite, each tensor's sum too; their total is inf
    assert bool(torch.isfinite(first.lora_A.sum())) and not bool(torch.isfinite(first.lora_A.sum() * 2))
    ctl.step()
    assert ctl.t == 2 and len(calls) == len(model.adapter_layers())


def test_rollback_restores_every_dtype_of_a_mixed_adapter(monkeypatch):
    model, _, ctl = _sds_run(warmup=2)
    ctl.step()
    layers = list(model.adapter_layers().values())
    with torch.no_grad():  # a float64 layer beside float32 ones: the snapshot keeps one buffer per dtype
        layers[0].to(torch.float64)
    before = _adapter_tensors(model)
    assert {v.dtype for v in before.values()} >= {torch.float32, torch.float64}
    real = SDSLayer.reparameterise

    def failing(self, *a, **kw):
        out = real(self, *a, **kw)
        if self is layers[-1]:
            raise RuntimeError("boom")
        return out

    monkeypatch.setattr(SDSLayer, "reparameterise", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ctl.step()
    after = _adapter_tensors(model)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_factorisation_error_in_a_duty_is_named(monkeypatch):
    model, _, ctl = _sds_run(warmup=2)
    ctl.step()
    before = _adapter_tensors(model)

    def failing(*a, **kw):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr("sdslora.methods.sds.svd_of_product", failing)
    with pytest.raises(NonFiniteError, match="step 2: a factorisation .* failed .*left as it was"):
        ctl.step()
    assert all(torch.equal(before[k], v) for k, v in _adapter_tensors(model).items())


def test_fp16_adapter_with_tiny_eps_warns():
    model = sdslora.attach(tiny_llama().half(), _cfg(adapter_dtype="base"))
    with pytest.warns(UserWarning, match="float16 and the optimizer's eps=1e-08"):
        sdslora.Controller(model, torch.optim.AdamW(model.trainable_parameters(), eps=1e-8), total_steps=20)


@pytest.mark.parametrize("state,match", [
    ({"t": "abc", "total_steps": 20, "method": "sds"}, "step t='abc'"),
    ({"t": -1, "total_steps": 20, "method": "sds"}, "step t=-1"),
    ({"t": 3, "total_steps": "20", "method": "sds"}, "total_steps='20'"),
    ({"t": 3, "total_steps": 20, "method": "sds", "events": "x"}, "'events' must be a list"),
    ({"t": 3, "total_steps": 20, "method": "lora"}, "controller state is for method 'lora'"),
])
def test_bad_controller_state(state, match):
    model, opt, ctl = _sds_run()
    with pytest.raises(ValueError, match=match):
        ctl.load_state_dict(state)


def test_controller_step_t_must_be_a_step():
    _, _, ctl = _sds_run()
    with pytest.raises(ValueError, match="t must be an int >= 1"):
        ctl.step("3")


# ---- attach / load leave the model as they found it ------------------------------------------------------------
def test_attach_with_unmatched_modules_to_save_changes_nothing():
    base = tiny_bert_cls()
    base.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a user's own choice, kept
    before = _state(base)
    with pytest.raises(ValueError, match=r"modules_to_save=\['nothing_here'\] matched no module"):
        sdslora.attach(base, _cfg(modules_to_save=["nothing_here"], exclude_modules=["classifier"]))
    assert _same_state(base, before)


def test_failed_attach_midway_restores_modules_and_flags(monkeypatch):
    base = tiny_llama()
    before = _state(base)
    calls = {"n": 0}
    real = sdslora.model._set_module

    def failing(model, name, new):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(model, name, new)

    monkeypatch.setattr(sdslora.model, "_set_module", failing)
    with pytest.raises(RuntimeError, match="injected"):
        sdslora.attach(base, _cfg())
    monkeypatch.undo()
    assert _same_state(base, before)


def _edit(path, fn) -> None:
    meta = json.loads((path / sio.CONFIG_NAME).read_text())
    fn(meta)
    (path / sio.CONFIG_NAME).write_text(json.dumps(meta))


def _set_alpha(m):
    m["config"]["alpha"] = 8.0


def _set_method(m):
    m["config"]["method"] = "orthogonal"


def _set_rank_in_config(m):
    m["config"]["r"] = 2


def _set_version(m):
    m["format_version"] = "2"


BAD_FILES = [
    ("alpha-edited", _set_alpha, "saved with scale 2 but the config .*alpha=8.0.* gives 4.*edited"),
    ("method-edited", _set_method, "saved by method 'sds' but the config says 'orthogonal'"),
    ("rank-edited", _set_rank_in_config, "saved at rank 4 but the config says r=2"),
    ("version-string", _set_version, "format_version must be an integer"),
]


@pytest.mark.parametrize("fn,match", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_edited_adapter_config_is_refused_and_the_model_untouched(saved, fn, match):
    path, _ = saved
    _edit(path, fn)
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(ValueError, match=match):
        sdslora.load_adapter(base, path)
    assert _same_state(base, before)


def test_nan_adapter_is_refused_on_save_and_load(saved, tmp_path):
    path, _ = saved
    model = sdslora.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        next(iter(model.adapter_layers().values())).lora_A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf values .*lora_A.*nothing was saved"):
        model.save_adapter(path)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").glob("*.safetensors"))
    # a file holding NaN (written by other means) does not load either
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / sio.WEIGHTS_NAME))
    key = sorted(tensors)[0]
    tensors[key][..., 0] = float("inf")
    save_file(tensors, str(path / sio.WEIGHTS_NAME))
    _edit(path, lambda m: m.pop("weights_sha256"))
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(ValueError, match=f"NaN/Inf values .*{key}.*diverged"):
        sdslora.load_adapter(base, path)
    assert _same_state(base, before)


def test_weights_from_another_save_are_detected(saved, tmp_path):
    path, _ = saved
    other = sdslora.attach(tiny_llama(seed=5), _cfg())
    other.save_adapter(tmp_path / "other")
    (path / sio.WEIGHTS_NAME).write_bytes((tmp_path / "other" / sio.WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="SHA-256 differs"):
        sdslora.load_adapter(tiny_llama(), path)


# ---- atomic saves: a crash injected at every point of the switch -------------------------------------------------
class _Crash(BaseException):
    """Stands for SIGKILL: no ``except Exception`` clean-up runs."""


SAVE_POINTS = ["written", "committed", f"replace:{sio.WEIGHTS_NAME}", f"replace:{sio.CONFIG_NAME}", "replaced"]


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_adapter(saved, monkeypatch, point):
    path, old_out = saved
    (path / "notes.txt").write_text("mine")
    parent_before = sorted(p.name for p in path.parent.iterdir())
    new = sdslora.attach(tiny_llama(), _cfg())
    with torch.no_grad():
        for layer in new.adapter_layers().values():
            layer.lora_B.normal_(std=3.0)
    new_out = output_of(new, batch_for("llama")).detach()

    def crash(p: str) -> None:
        if p == point:
            raise _Crash

    monkeypatch.setattr(sio, "_fault_hook", crash)
    with pytest.raises(_Crash):
        new.save_adapter(path)
    monkeypatch.setattr(sio, "_fault_hook", None)
    assert sorted(p.name for p in path.parent.iterdir()) == parent_before  # staging lives inside the target
    committed = point != "written"
    loaded = sdslora.load_adapter(tiny_llama(), path)  # finishes (committed) or discards (not) the killed save
    assert torch.equal(output_of(loaded, batch_for("llama")), new_out if committed else old_out)
    assert not list(path.glob(sio.STAGING_PREFIX + "*"))
    assert (path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("point", SAVE_POINTS[:2])
def test_the_next_save_cleans_a_killed_one(saved, monkeypatch, point):
    path, _ = saved
    model = sdslora.attach(tiny_llama(seed=3), _cfg())
    monkeypatch.setattr(sio, "_fault_hook", lambda p: (_ for _ in ()).throw(_Crash) if p == point else None)
    with pytest.raises(_Crash):
        model.save_adapter(path)
    monkeypatch.setattr(sio, "_fault_hook", None)
    assert len(list(path.glob(sio.STAGING_PREFIX + "*"))) == 1
    model.save_adapter(path)
    assert not list(path.glob(sio.STAGING_PREFIX + "*"))
    assert sorted(p.name for p in path.iterdir()) == sorted([sio.CONFIG_NAME, sio.WEIGHTS_NAME])


def test_an_ordinary_failure_cleans_up_at_once(saved, monkeypatch):
    path, old_out = saved
    monkeypatch.setattr(sio, "_fault_hook", lambda p: (_ for _ in ()).throw(OSError("disk full")) if p == "written"
                        else None)
    with pytest.raises(OSError, match="disk full"):
        sdslora.attach(tiny_llama(seed=3), _cfg()).save_adapter(path)
    assert not list(path.glob(sio.STAGING_PREFIX + "*"))
    assert torch.equal(output_of(sdslora.load_adapter(tiny_llama(), path), batch_for("llama")), old_out)


def test_an_export_drops_the_files_the_new_version_lacks(saved, tmp_path):
    path, _ = saved
    model = sdslora.load_adapter(tiny_llama(), path)
    model.export_peft(tmp_path / "peft", max_rank=2)
    assert (tmp_path / "peft" / "export_report.json").is_file()
    model.export_peft(tmp_path / "peft")  # no max_rank: a stale report would describe another export
    assert not (tmp_path / "peft" / "export_report.json").exists()


# ---- privacy -----------------------------------------------------------------------------------------------------
def test_the_local_model_path_is_not_written(tmp_path):
    folder = tmp_path / "home" / "alice" / "models" / "tiny-llama"
    base = tiny_llama()
    base.config._name_or_path = str(folder)
    folder.mkdir(parents=True)
    model = sdslora.attach(base, _cfg())
    model.save_adapter(tmp_path / "ad")
    model.export_peft(tmp_path / "peft")
    for f in (tmp_path / "ad" / sio.CONFIG_NAME, tmp_path / "peft" / sio.CONFIG_NAME):
        text = f.read_text()
        assert "alice" not in text and "tiny-llama" in text, f
    info = json.loads((tmp_path / "ad" / sio.CONFIG_NAME).read_text())["base_model"]
    assert info["local_path_withheld"] and len(info["config_sha256"]) == 64
    model.export_peft(tmp_path / "peft2", record_path=True)  # asked for: written
    assert json.loads((tmp_path / "peft2" / sio.CONFIG_NAME).read_text())["base_model_name_or_path"] == str(folder)
    base.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"  # a hub id is kept as it is
    model.save_adapter(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / sio.CONFIG_NAME).read_text())["base_model"]["name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("method", ["lora_ga", "lora_sb"])
def test_nonfinite_init_gradient_is_refused_and_the_model_untouched(method):
    base = tiny_llama()
    with torch.no_grad():
        base.lm_head.weight[0, 0] = float("nan")  # the loss, and so every gradient, is NaN
    before = _state(base)
    with pytest.raises(ValueError, match="estimated gradient of .* has NaN/Inf entries.*loss is not finite"):
        sdslora.attach(base, _cfg(method=method), init_data=[batch_for("llama")])
    now = dict(base.named_parameters())
    assert all(torch.equal(now[n], t.detach()) or torch.isnan(t).any() for n, (t, _g) in before.items())
    assert all(now[n].requires_grad == g for n, (_t, g) in before.items())
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_rank_too_large_for_another_model_names_the_right_cause(tmp_path):
    model = sdslora.attach(tiny_llama(), _cfg(r=16, target_modules=["q_proj"]))
    model.save_adapter(tmp_path / "ad")
    cfg = tiny_llama().config
    cfg.hidden_size, cfg.intermediate_size = 8, 16  # q_proj 8x8: rank 16 cannot exist there
    other = type(tiny_llama())(cfg)
    with pytest.raises(ValueError, match="does not fit this model .*load it on the base model it was trained from"):
        sdslora.load_adapter(other, tmp_path / "ad")
    assert not any(isinstance(m, AdapterLayer) for m in other.modules())


LOAD_POINTS = ["read_adapter_meta", "_sha256", "load_file", "_check_layer_meta", "attach_layers", "load_extra_state",
               "sync_state", "post_load"]


@pytest.mark.parametrize("point", LOAD_POINTS)
def test_a_load_failing_at_any_step_leaves_the_model_as_it_was(saved, monkeypatch, point):
    path, out = saved
    base = tiny_llama()
    base.model.embed_tokens.weight.requires_grad_(False)  # the user's own flags are kept
    before = _state(base)

    def fail(*a, **kw):
        raise OSError(f"injected at {point}")

    if point in ("load_extra_state", "sync_state", "post_load"):
        monkeypatch.setattr(SDSLayer, point, fail)
    else:
        monkeypatch.setattr(sio, point, fail)
    with pytest.raises((OSError, ValueError), match=f"injected at {point}"):  # load_file's: "corrupt (...)"
        sdslora.load_adapter(base, path)
    monkeypatch.undo()
    assert _same_state(base, before)
    assert torch.equal(output_of(sdslora.load_adapter(base, path), batch_for("llama")), out)  # and it still loads
