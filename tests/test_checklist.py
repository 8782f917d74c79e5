"""The anchor's checklist for every registered method on every tiny model (DESIGN.md, "What the anchor tests").

The case table is built from the registry ``sdslora.METHODS`` x the tiny models of ``tests/models.py``: a new
method is covered without touching this file (or with one row in ``OPTIONS`` / ``REBASES`` below).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import MODELS, batch_for, output_of

import sdslora
from sdslora.methods.base import AdapterLayer

# per-method AdapterConfig options for these tests (a row here is the most a new method should need)
OPTIONS: dict[str, dict] = {
    "relora": {"restart_every": 5, "restart_warmup": 2},  # restarts after steps 5 and 10
    # SDS cycles of 7 steps: re-parameterise after local step 2, refresh after 4 and 6, restart after 7
    "relora_sds": {"restart_every": 7, "warmup_steps": 2, "refresh": "every:2", "restart_warmup": 1},
    "lora_grow": {"grow_steps": "4,8"},  # rank 4 -> 6 -> 8
    "sds_grow": {"grow_steps": "5,11"},  # grows in the warm-up and decoupled (re-param. 10, refresh 12)
    "adalora": {"target_r": 3, "tinit": 2, "tfinal": 20, "deltaT": 2},  # prunes 4 -> 3 per layer on average at steps 4-10
}
# layers whose factors may rightly get no gradient from the task loss: AdaLoRA's A and B once every triplet of the
# layer is pruned (E = 0); its E still gets one
NO_TASK_GRADIENT = {"adalora": lambda layer, pname: pname in ("lora_A", "lora_B") and bool((layer.lora_E == 0).all())}
# fallback for methods whose layer class does not say whether it re-bases the frozen weight
REBASES = {"pissa": True, "lora_ga": True}
TOTAL = 30  # Controller total_steps: re-parameterisation after step 10, refresh after 12, not after 11
STEPS = 12

# extra rows: a registered method with options, named "method:variant" (the paper-faithful SDS-LoRA beside the default)
VARIANTS: dict[str, dict] = {"sds:faithful": {"faithful": True}}
CASES = [(method, kind) for method in [*sdslora.METHODS, *VARIANTS] for kind in MODELS]


def base_method(case_method: str) -> str:
    """The registered method of a case ("sds:faithful" -> "sds")."""
    return case_method.split(":", 1)[0]


def needs_init_data(method: str) -> bool:
    spec = sdslora.METHODS[base_method(method)]
    return spec.layer_cls is not None and spec.layer_cls.needs_init_data


def rebases_base(method: str) -> bool:
    layer_cls = sdslora.METHODS[base_method(method)].layer_cls
    flag = getattr(layer_cls, "rebases_base_weight", None)
    return bool(flag) if flag is not None else REBASES.get(base_method(method), False)


def _config(method: str, kind: str) -> sdslora.AdapterConfig:
    return sdslora.AdapterConfig(
        method=base_method(method),
        r=4,
        alpha=4.0,
        modules_to_save=["classifier"] if kind == "bert" else None,
        options=VARIANTS.get(method, OPTIONS.get(method, {})),
    )


def _attach(method: str, kind: str, seed: int = 0) -> sdslora.AdaptedModel:
    base = MODELS[kind](seed=0)
    torch.manual_seed(seed)
    cfg = _config(method, kind)
    if needs_init_data(method):
        return sdslora.attach(base, cfg, init_data=[batch_for(kind, seed=50), batch_for(kind, seed=51)])
    return sdslora.attach(base, cfg)


_TRAINED: dict[tuple[str, str], tuple[sdslora.AdaptedModel, list]] = {}


def _train(method: str, kind: str) -> tuple[sdslora.AdaptedModel, list]:
    model = _attach(method, kind)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=TOTAL)
    for t in range(STEPS):
        model(**batch_for(kind, seed=t)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.step()
    model.controller = None  # each check brings its own optimizer
    return model, list(ctl.events)


def trained(method: str, kind: str) -> sdslora.AdaptedModel:
    """A copy of the case's model after STEPS AdamW steps driven by a Controller (SDS / orthogonal: past the
    re-parameterisation and a refresh, i.e. in the decoupled phase)."""
    key = (method, kind)
    if key not in _TRAINED:
        with torch.enable_grad():
            _TRAINED[key] = _train(method, kind)
    model, events = _TRAINED[key]
    if base_method(method) in ("sds", "orthogonal"):
        assert [e["step"] for e in events if e["event"] == "reparameterise"] == [10]
        assert [e["step"] for e in events if e["event"] == "refresh"] == [12]
        assert all(layer.decoupled for layer in model.adapter_layers().values())
    return copy.deepcopy(model)


def _x(kind: str) -> dict[str, torch.Tensor]:
    return batch_for(kind, seed=123)


def _base_output(kind: str) -> torch.Tensor:
    return output_of(MODELS[kind](seed=0), _x(kind)).detach()


@pytest.fixture(params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request):
    return request.param


@torch.no_grad()
def test_training_changed_the_outputs(case):
    method, kind = case
    model = trained(method, kind)
    assert float((output_of(model, _x(kind)) - _base_output(kind)).abs().max()) > 1e-4


@torch.no_grad()
def test_save_load_round_trip(case, tmp_path):
    method, kind = case
    model = trained(method, kind)
    out = output_of(model, _x(kind))
    model.save_adapter(tmp_path / "a")
    fresh = MODELS[kind](seed=0)
    torch.manual_seed(4321)  # a different adapter initialisation on the fresh base
    loaded = sdslora.load_adapter(fresh, tmp_path / "a")
    assert loaded.method == base_method(method)
    assert loaded.adapter_config == model.adapter_config
    assert torch.equal(output_of(loaded, _x(kind)), out)
    ours, theirs = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@torch.no_grad()
def test_merge_unmerge_merge_and_unload(case):
    method, kind = case
    model = trained(method, kind)
    x = _x(kind)
    out = output_of(model, x)
    model.merge()
    assert all(layer.merged for layer in model.adapter_layers().values())
    torch.testing.assert_close(output_of(model, x), out, rtol=1e-4, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(output_of(model, x), out, rtol=1e-4, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(output_of(plain, x), out, rtol=1e-4, atol=1e-5)


def test_gradients_exactly_on_trainable_tensors(case):
    method, kind = case
    model = trained(method, kind)
    expected = set()
    for name, layer in model.adapter_layers().items():
        expected |= {f"{name}.{n}" for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
    if kind == "bert":
        expected |= {n for n, _ in model.model.named_parameters() if n.startswith("classifier.")}
    if sdslora.METHODS[base_method(method)].layer_cls is None:
        expected = {n for n, _ in model.model.named_parameters()}
    # a tensor shared by several layers (LoTR's U, V) is listed once, under the first name it has in the model
    first: dict[int, str] = {}
    for n, p in model.model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), n)
    canonical = {n: first[id(p)] for n, p in model.model.named_parameters(remove_duplicate=False)}
    expected = {canonical[n] for n in expected}
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert trainable == expected
    model(**batch_for(kind, seed=7)).loss.backward()
    silent = NO_TASK_GRADIENT.get(base_method(method), lambda layer, pname: False)
    may_be_zero = {f"{name}.{pn}" for name, layer in model.adapter_layers().items()
                   for pn, _ in layer.named_parameters(recurse=False) if silent(layer, pn)}
    for n, p in model.model.named_parameters():
        if n in trainable:
            assert p.grad is not None, f"no gradient for trainable {n}"
            assert torch.isfinite(p.grad).all() and (p.grad.abs().sum() > 0 or n in may_be_zero), n
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_optimizer_steps_change_only_trainable_tensors(case):
    method, kind = case
    model = trained(method, kind)
    before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    trainable_ptrs = {p.data_ptr() for p in model.trainable_parameters()}  # tied weights share one tensor
    trainable = {k for k, v in model.model.state_dict().items() if v.data_ptr() in trainable_ptrs}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    for t in range(3):
        model(**batch_for(kind, seed=20 + t)).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.model.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in after.items():
        if k in trainable:
            assert not torch.equal(v, before[k]), f"trainable {k} did not change"
        else:
            assert torch.equal(v, before[k]), f"{k} changed but is not trainable"


@torch.no_grad()
@pytest.mark.parametrize("mode", ["float32", "bfloat16", "float16", "autocast-bf16"])
def test_forward_dtypes_finite(case, mode):
    method, kind = case
    model = trained(method, kind)
    x = _x(kind)
    ref = output_of(model, x).float()
    if mode == "autocast-bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = output_of(model, x)
    else:
        model.to(getattr(torch, mode))
        out = output_of(model, x)
        assert out.dtype == getattr(torch, mode)
    assert torch.isfinite(out).all()
    # low precision keeps the adapter's effect: closer to the fp32 adapted output than the base output is
    err = float((out.float() - ref).abs().max())
    assert err < 0.5 * float((ref - _base_output(kind)).abs().max()) or err < 0.05, err


@torch.no_grad()
def test_disable_adapter_restores_the_base(case):
    method, kind = case
    if sdslora.METHODS[base_method(method)].layer_cls is None:
        pytest.skip(f"{method} has no adapter layers to disable")
    model = trained(method, kind)
    x = _x(kind)
    out = output_of(model, x)
    layers = model.adapter_layers()
    # reference: a plain model holding each adapted layer's current frozen weight (= W0 unless re-based)
    reference = MODELS[kind](seed=0)
    for name, layer in layers.items():
        mod = reference.get_submodule(name)
        mod.weight.copy_(layer.base_layer.weight)
    if kind == "bert":  # modules_to_save were trained: they stay in the disabled model
        reference.classifier.load_state_dict(model.model.classifier.state_dict())
    with model.disable_adapter():
        disabled = output_of(model, x)
    assert torch.equal(disabled, output_of(reference, x))
    if not rebases_base(method) and kind != "bert":
        assert torch.equal(disabled, _base_output(kind))  # the base weights were never touched
    if rebases_base(method):
        assert any(
            not torch.equal(layer.base_layer.weight, MODELS[kind](seed=0).get_submodule(n).weight)
            for n, layer in layers.items()
        )
    assert torch.equal(output_of(model, x), out)  # enabled again on exit
