"""Training with the HF Trainer (SDSLoRACallback) and with a plain loop: schedule, optimizer reset, exact resume."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

import sdslora
from sdslora.control import unwrap_optimizer
from sdslora.integrations.hf import SDSLoRACallback

T = 30  # optimizer steps
SEQ = 12
FIRST = "model.layers.0.self_attn.q_proj"


def spec_refresh_steps(total: int, warmup: int = 10, k: int = 5) -> list[int]:
    """SPEC.md §1.5: for t > T_w refresh iff t mod (⌊t / ⌊T/k⌋⌋ + 1) = 0."""
    return [t for t in range(warmup + 1, total + 1) if t % (t // (total // k) + 1) == 0]


class Patterns(torch.utils.data.Dataset):
    """Learnable sequences: token i+1 follows token i (mod 64), random start."""

    def __init__(self, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 64, (n,), generator=g)
        self.ids = (starts[:, None] + torch.arange(SEQ)[None, :]) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


# SDS-LoRA as shipped (aligned, ΔW-preserving refreshes) and the paper's algorithm: both must resume exactly
MODES = pytest.mark.parametrize("options", [{}, {"faithful": True}], ids=["default", "faithful"])


def _model(method: str = "sds", options: dict | None = None) -> sdslora.AdaptedModel:
    # the tiny model's frozen output layer (std 0.02) keeps the logits near uniform: train it too
    cfg = sdslora.AdapterConfig(method=method, r=4, alpha=4.0, modules_to_save=["lm_head"], options=options or {})
    return sdslora.attach(tiny_llama(), cfg)


class Probe(TrainerCallback):
    """Records, after the SDS callback, per optimizer step: the AdamW step count of A and the bases of one layer."""

    def __init__(self):
        self.records: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        layer = sdslora.control.find_adapted_model(model).adapter_layers()[FIRST]
        st = unwrap_optimizer(optimizer).state.get(layer.lora_A, {})
        self.records[state.global_step] = {
            "adam_step": int(st["step"]) if "step" in st else None,
            "QA": layer.lora_QA.clone(),
            "QB": layer.lora_QB.clone(),
            "decoupled": layer.decoupled,
        }


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=T,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="linear",
    )
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _train(out, resume: str | None = None, options: dict | None = None, **kw):
    torch.manual_seed(0)
    model = _model(options=options)
    sds_cb, probe = SDSLoRACallback(), Probe()
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=Patterns(), callbacks=[sds_cb, probe])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, sds_cb, probe


@MODES
def test_trainer_schedule_reset_and_resume(tmp_path, options):
    model, trainer, sds_cb, probe = _train(tmp_path / "run", options=options, save_strategy="steps", save_steps=15)
    losses = _losses(trainer)
    assert sorted(losses) == list(range(1, T + 1))
    first, last = sum(losses[t] for t in (1, 2, 3)) / 3, sum(losses[t] for t in (T - 2, T - 1, T)) / 3
    assert last < first - 0.3, (first, last)
    # optimizer steps are counted, not micro-batches: 2 micro-batches per step
    ctl = sds_cb.controller
    assert ctl.t == T
    assert [e["step"] for e in ctl.events if e["event"] == "reparameterise"] == [10]
    expected = spec_refresh_steps(T)
    assert [e["step"] for e in ctl.events if e["event"] == "refresh"] == expected
    # optimizer state of A: reset at step 10 (gone after the re-parameterisation), then restarts from 1
    for t in range(1, T + 1):
        rec = probe.records[t]
        assert rec["adam_step"] == (None if t == 10 else (t if t < 10 else t - 10)), (t, rec["adam_step"])
        assert rec["decoupled"] == (t >= 10)
    # the bases change exactly at the re-parameterisation and at the scheduled refreshes
    changed = {
        t
        for t in range(2, T + 1)
        if not (
            torch.equal(probe.records[t]["QA"], probe.records[t - 1]["QA"])
            and torch.equal(probe.records[t]["QB"], probe.records[t - 1]["QB"])
        )
    }
    assert changed == {10, *expected}

    # resume from the mid-run checkpoint: same losses and the same final tensors as the uninterrupted run
    ckpt = tmp_path / "run" / "checkpoint-15"
    assert ckpt.is_dir()
    model2, trainer2, sds_cb2, probe2 = _train(
        tmp_path / "resumed", resume=str(ckpt), options=options, save_strategy="steps", save_steps=15
    )
    losses2 = _losses(trainer2)  # the log history before the checkpoint comes back with it
    assert sorted(losses2) == list(range(1, T + 1))
    assert sorted(probe2.records) == list(range(16, T + 1))
    for t in range(16, T + 1):
        assert losses2[t] == pytest.approx(losses[t], rel=1e-5, abs=1e-6), t
    assert [e["step"] for e in sds_cb2.controller.events if e["event"] == "refresh"] == [
        s for s in expected if s > 15
    ]
    for t in range(16, T + 1):
        torch.testing.assert_close(probe2.records[t]["QA"], probe.records[t]["QA"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe2.records[t]["QB"], probe.records[t]["QB"], rtol=1e-5, atol=1e-6)
    final1, final2 = model.adapter_state_dict(), model2.adapter_state_dict()
    for k in final1:
        torch.testing.assert_close(final2[k], final1[k], rtol=1e-5, atol=1e-6)


def _batch(t: int) -> dict[str, torch.Tensor]:
    ds = Patterns(n=4, seed=1000 + t)
    ids = ds.ids
    return {"input_ids": ids, "labels": ids.clone()}


def _plain_steps(model, opt, ctl, steps, losses):
    for t in steps:
        loss = model(**_batch(t)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        assert ctl.t == t
        losses[t] = float(loss.detach())


@MODES
def test_plain_loop_save_load_resume(tmp_path, options):
    torch.manual_seed(0)
    model = _model(options=options)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    ctl = sdslora.Controller(model, opt, total_steps=T)
    losses: dict[int, float] = {}
    _plain_steps(model, opt, ctl, range(1, 16), losses)
    model.save_adapter(tmp_path / "mid")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    _plain_steps(model, opt, ctl, range(16, T + 1), losses)
    assert losses[T] < losses[1]

    torch.manual_seed(99)  # a different adapter initialisation before loading
    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "mid")
    opt2 = torch.optim.AdamW(loaded.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    ctl2 = sdslora.Controller(loaded, opt2)  # t and total_steps come from the saved adapter
    assert ctl2.t == 15 and ctl2.total_steps == T
    assert [e["step"] for e in ctl2.events if e["event"] == "reparameterise"] == [10]
    losses2: dict[int, float] = {}
    _plain_steps(loaded, opt2, ctl2, range(16, T + 1), losses2)
    for t in range(16, T + 1):
        assert losses2[t] == pytest.approx(losses[t], rel=1e-6), t
    assert [e["step"] for e in ctl2.events if e["event"] == "refresh"] == spec_refresh_steps(T)
    final1, final2 = model.adapter_state_dict(), loaded.adapter_state_dict()
    for k in final1:
        torch.testing.assert_close(final2[k], final1[k], rtol=1e-6, atol=1e-7)


def test_resume_with_other_total_steps_raises(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    ctl = sdslora.Controller(model, opt, total_steps=T)
    ctl.step()
    model.save_adapter(tmp_path / "a")
    loaded = sdslora.load_adapter(tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match="total_steps"):
        sdslora.Controller(loaded, torch.optim.AdamW(loaded.trainable_parameters()), total_steps=2 * T)
