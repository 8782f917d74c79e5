"""Mixed precision, gradient checkpointing, torch.compile (issue 5).

* bf16 autocast and bf16 weights train SDS-LoRA through its re-parameterisation and refreshes without NaNs; every
  QR / SVD runs in float32; the PEFT export is float32 unless another dtype is asked for.
* Gradient checkpointing (transformers, use_reentrant False and True) gives the same training run as without, for
  every method in the registry (``sdslora.METHODS``, methods needing init data get ``init_data=[batch]``).
* ``torch.compile``: same outputs as eager through a run with re-parameterisation and refreshes; the phase flip may
  recompile once, the refreshes (in-place copies into buffers) never.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import batch_for, tiny_llama
from safetensors.torch import load_file

import sdslora

SDS_OPTS = {
    "warmup_steps": 2,
    "refresh": "every:1",
}  # re-parameterisation after step 2, refresh after every later
STEPS = 4
RESTART_OPTS = {"restart_every": 3, "restart_warmup": 1}  # relora / relora_sds: a restart after step 3


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny matmuls: one thread is faster than two contending ones on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LinalgSpy:
    """Records the dtype of every torch.linalg.qr / svd input while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.dtypes: list[torch.dtype] = []
        for name in ("qr", "svd"):
            orig = getattr(torch.linalg, name)

            def spy(x: torch.Tensor, *a: Any, _orig: Any = orig, **k: Any) -> Any:
                self.dtypes.append(x.dtype)
                return _orig(x, *a, **k)

            monkeypatch.setattr(torch.linalg, name, spy)


def _train(model: sdslora.AdaptedModel, steps: int, autocast: bool = False, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    ctl = sdslora.Controller(model, opt, total_steps=steps)
    losses = []
    for step in range(1, steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch_for("llama", seed=step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        losses.append(float(out.loss.detach()))
    assert [e["event"] for e in ctl.events][:2] == ["reparameterise", "refresh"]
    return losses


def _adapter_finite(model: sdslora.AdaptedModel) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in model.adapter_state_dict().values())


def test_bf16_autocast_trains_with_float32_factorisations(monkeypatch: pytest.MonkeyPatch) -> None:
    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=4, options=SDS_OPTS))
    model.train()
    spy = LinalgSpy(monkeypatch)
    losses = _train(model, STEPS, autocast=True)
    assert all(math.isfinite(v) for v in losses) and _adapter_finite(model)
    assert spy.dtypes and set(spy.dtypes) == {torch.float32}
    layer = next(iter(model.adapter_layers().values()))
    assert {t.dtype for t in layer.adapter_tensors().values() if t.is_floating_point()} == {torch.float32}
    # the autocast run stays close to the float32 run (bf16 matmuls: loose tolerance)
    ref = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=4, options=SDS_OPTS))
    ref.train()
    torch.manual_seed(0)
    ref_losses = _train(ref, STEPS)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 0.05


@pytest.mark.parametrize("adapter_dtype", ["float32", "base"])
def test_bf16_weights_train_and_export_dtype(
    adapter_dtype: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = tiny_llama().to(torch.bfloat16)
    model = sdslora.attach(
        base, sdslora.AdapterConfig(method="sds", r=4, options=SDS_OPTS, adapter_dtype=adapter_dtype)
    )
    model.train()
    want = torch.float32 if adapter_dtype == "float32" else torch.bfloat16
    layer = next(iter(model.adapter_layers().values()))
    spy = LinalgSpy(monkeypatch)
    losses = _train(model, STEPS)
    assert all(math.isfinite(v) for v in losses) and _adapter_finite(model)
    assert spy.dtypes and set(spy.dtypes) == {torch.float32}  # QR / SVD in float32 even for bf16 factors
    assert {t.dtype for t in layer.adapter_tensors().values() if t.is_floating_point()} == {want}
    assert layer.base_layer.weight.dtype == torch.bfloat16
    # the bases are orthonormal up to the storage precision
    qb = layer.lora_QB.double()
    assert torch.allclose(
        qb.T @ qb, torch.eye(4, dtype=torch.float64), atol=1e-5 if want == torch.float32 else 2e-2
    )
    for dtype, name in ((None, "f32"), (torch.bfloat16, "bf16")):
        kwargs = {} if dtype is None else {"dtype": dtype}
        sdslora.export_peft(model, tmp_path / name, **kwargs)
        tensors = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        dtypes = {t.dtype for t in tensors.values()}
        assert dtypes == {dtype or torch.float32}


# ---- gradient checkpointing, every registered method ---------------------------------------------------------------
def _build(method: str) -> sdslora.AdaptedModel:
    spec = sdslora.METHODS[method]
    fields = {f.name for f in dataclasses.fields(spec.options_cls)}
    options = {k: v for k, v in {**SDS_OPTS, **RESTART_OPTS}.items() if k in fields}
    torch.manual_seed(0)
    base = tiny_llama()
    base.train()
    cfg = sdslora.AdapterConfig(method=method, r=4, options=options)
    kwargs: dict[str, Any] = {}
    if spec.layer_cls is not None and spec.layer_cls.needs_init_data:
        kwargs["init_data"] = [batch_for("llama", seed=99)]
    torch.manual_seed(1)
    return sdslora.attach(base, cfg, **kwargs)


def _run(model: sdslora.AdaptedModel, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=steps)
    losses = []
    for step in range(1, steps + 1):
        out = model(**batch_for("llama", seed=step))
        out.loss.backward()
        missing = [n for n, p in model.named_trainable_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing[:3]}"
        opt.step()
        opt.zero_grad()
        ctl.step()
        losses.append(float(out.loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("method", list(sdslora.METHODS))
def test_gradient_checkpointing_every_method(method: str) -> None:
    steps = STEPS  # SDS / orthogonal: warm-up 2, re-parameterisation, 2 refreshes under checkpointing
    ref_model = _build(method)
    ref_losses, ref_state = _run(ref_model, steps)
    for reentrant in (False, True):
        model = _build(method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation / use_cache notices
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.model.is_gradient_checkpointing
        losses, state = _run(model, steps)
        assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 1e-5, reentrant
        assert sorted(state) == sorted(ref_state)
        for k in state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5, msg=f"{k} {reentrant}")


# ---- torch.compile ---------------------------------------------------------------------------------------------------
def test_compile_same_outputs_and_refresh_does_not_recompile() -> None:
    """Compiled and eager twins train side by side; compilations are counted with a custom Dynamo backend."""
    torch._dynamo.reset()
    compiles: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compiles.append(len(gm.graph.nodes))
        return gm.forward  # run the captured graph as is (no C++ compiler needed on this machine)

    opts = {"warmup_steps": 3, "refresh": "every:1"}
    twins = []
    for _ in range(2):
        torch.manual_seed(0)
        base = tiny_llama()
        base.train()
        torch.manual_seed(1)
        twins.append(sdslora.attach(base, sdslora.AdapterConfig(method="sds", r=4, options=opts)))
    eager, adapted = twins
    compiled = torch.compile(adapted, backend=counting_backend)
    steps = 9
    runs = []
    for model, fwd in ((eager, eager), (adapted, compiled)):
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        ctl = sdslora.Controller(
            fwd, opt, total_steps=steps
        )  # finds the AdaptedModel inside the compile wrapper
        logits, n_compiles = [], []
        for step in range(1, steps + 1):
            out = fwd(**batch_for("llama", seed=step))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            ctl.step()
            logits.append(out.logits.detach())
            n_compiles.append(len(compiles))
        runs.append((logits, n_compiles, [e["event"] for e in ctl.events]))
    (ref_logits, _, ref_events), (logits, n_compiles, events) = runs
    assert events == ref_events == ["reparameterise"] + ["refresh"] * 6
    for a, b in zip(logits, ref_logits, strict=True):  # the refreshed bases reach the compiled graph
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    first = n_compiles[0]
    assert first >= 1
    # step 4 is the first forward after the phase flip (a Python flag): at most one recompilation per graph
    assert n_compiles[2] == first and first <= n_compiles[3] <= 2 * first
    # steps 5..9 follow a refresh each: no recompilation
    assert n_compiles[4:] == [n_compiles[3]] * 5, n_compiles


@pytest.mark.parametrize(
    "method,options",
    [
        ("relora", {"restart_every": 3, "restart_warmup": 1}),
        ("relora_sds", {"restart_every": 4, "warmup_steps": 1, "restart_warmup": 1}),
        ("lora_grow", {"grow_steps": "3"}),
        ("sds_grow", {"grow_steps": "4", "warmup_steps": 2}),
        ("lotr", {}),
    ],
)
def test_compile_same_outputs_across_restarts_growth_and_sharing(
    method: str, options: dict[str, Any]
) -> None:
    """torch.compile'd twins of the survey methods train like eager ones through their duties (a restart re-bases
    the frozen weight in place; a growth replaces parameters: Dynamo guards see the new shapes and recompile)."""
    torch._dynamo.reset()

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return gm.forward

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        base = tiny_llama()
        base.train()
        torch.manual_seed(1)
        model = sdslora.attach(base, sdslora.AdapterConfig(method=method, r=2, options=options))
        fwd = torch.compile(model, backend=backend) if compiled else model
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        ctl = sdslora.Controller(fwd, opt, total_steps=6)
        logits = []
        for step in range(1, 7):
            out = fwd(**batch_for("llama", seed=step))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            ctl.step()
            logits.append(out.logits.detach())
        runs.append((logits, [e["event"] for e in ctl.events]))
    (ref, ref_events), (got, events) = runs
    assert events == ref_events and (events or method == "lotr")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
