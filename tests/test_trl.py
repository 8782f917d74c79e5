"""sdslora inside the trainers people fine-tune with: TRL's SFT, DPO and GRPO trainers train an attached model with
the callback exactly as README shows (every method under SFT), the events reach ``log_history`` and every
``report_to`` logger (read back from TensorBoard's event files), and the export after training loads in PEFT."""

from __future__ import annotations

import pytest
import torch
from harness_fixtures import tiny_tokenizer
from models import tiny_llama

import sdslora
from sdslora.integrations.hf import SDSLoRACallback
from sdslora.methods import METHODS

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), causal=True)


SHORT_RUN_OPTIONS = {
    "sds": {"warmup_steps": 2},
    "orthogonal": {"warmup_steps": 2},
    "relora": {"restart_every": 2, "restart_warmup": 1},
    "relora_sds": {"restart_every": 3, "warmup_steps": 1, "restart_warmup": 1},
    "adalora": {"target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1},  # prunes 4 -> 2 per layer at steps 2-3
}


def _model(tok, method: str = "sds", **cfg):
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    base.config.pad_token_id = tok.pad_token_id
    cfg.setdefault("r", 4)
    if method in SHORT_RUN_OPTIONS:  # duties within the 4-5 steps of these runs
        cfg.setdefault("options", SHORT_RUN_OPTIONS[method])
    init = None
    if METHODS[method].layer_cls is not None and METHODS[method].layer_cls.needs_init_data:
        ids = tok(["the movie was good"] * 4, return_tensors="pt")["input_ids"]
        init = [{"input_ids": ids, "labels": ids}]
    return sdslora.attach(base, sdslora.AdapterConfig(method=method, **cfg), init_data=init)


def _sft(model, tok, out, steps: int = 4, **kw):
    ds = datasets.Dataset.from_dict({"text": ["the movie was good", "it was a bad film"] * 8})
    args = trl.SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, report_to=kw.pop(
        "report_to", []), logging_steps=1, use_cpu=True, save_strategy="no", max_length=16, learning_rate=1e-2,
        bf16=False, **kw)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[SDSLoRACallback()])
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_trains_every_method(tok, tmp_path, method):
    model = _model(tok, method)
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    trainer = _sft(model, tok, tmp_path)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in model.named_trainable_parameters() if not torch.equal(before[n], p.detach())]
    assert moved, "nothing trained"
    if method in ("sds", "orthogonal"):
        events = [h for h in trainer.state.log_history if "sdslora/reparameterise/layers" in h]
        assert [h["step"] for h in events] == [2] and events[0]["sdslora/reparameterise/layers"] == 14
    if method == "adalora":  # the Trainer clears gradients after the step: the budget saw them (pruned by them)
        kept = sum(int((layer.lora_E != 0).sum()) for layer in model.adapter_layers().values())
        assert kept <= 2 * len(model.adapter_layers())
        assert any(float(layer.lora_ipt_E.abs().sum()) > 0 or bool(layer.lora_keep.any())
                   for layer in model.adapter_layers().values())


def test_sft_export_loads_in_peft_with_the_same_outputs(tok, tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(tok, "sds")
    _sft(model, tok, tmp_path / "out", steps=5)
    model.export_peft(tmp_path / "peft")
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    model.eval()
    ids = tok(["the movie was good"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_sft_with_the_inner_model_and_gradient_checkpointing(tok, tmp_path):
    model = _model(tok, "sds")
    trainer = _sft(model.get_base_model(), tok, tmp_path, gradient_checkpointing=True)  # the callback finds the adapter
    assert any("sdslora/reparameterise/layers" in h for h in trainer.state.log_history)
    assert all(layer.decoupled for layer in model.adapter_layers().values())


def test_dpo_trains_with_precomputed_reference(tok, tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["the movie was"] * 8, "chosen": [" good"] * 8,
                                     "rejected": [" bad"] * 8})
    model = _model(tok, "sds")
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", precompute_ref_log_probs=True,
                         learning_rate=1e-2)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[SDSLoRACallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]  # the policy moves away from the reference
    assert any("sdslora/reparameterise/layers" in h for h in trainer.state.log_history)


def test_grpo_generates_and_trains(tok, tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["the movie was"] * 8})
    model = _model(tok, "sds")
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, report_to=[], logging_steps=1, use_cpu=True, save_strategy="no",
                          learning_rate=1e-2)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=ds, processing_class=tok, callbacks=[SDSLoRACallback()])
    trainer.train()
    assert any("sdslora/reparameterise/layers" in h for h in trainer.state.log_history)
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_trainable_parameters())


def test_events_and_diagnostics_reach_tensorboard(tok, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdslora.diagnostics import DiagnosticsCallback

    model = _model(tok, "sds")
    ids = tok(["the movie was good"] * 2, return_tensors="pt")["input_ids"]
    ds = datasets.Dataset.from_dict({"text": ["the movie was good", "it was a bad film"] * 8})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                         report_to=["tensorboard"], logging_steps=1, use_cpu=True, save_strategy="no", max_length=16,
                         bf16=False)
    diag = DiagnosticsCallback({"input_ids": ids, "labels": ids}, every=2)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[SDSLoRACallback(), diag])
    trainer.train()
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("SDSLoRACallback") < names.index("DiagnosticsCallback")  # duties still before the probe
    history = trainer.state.log_history
    assert any("diag/cos_g_geff" in h for h in history if h.get("step") == 2)
    tags = set()
    files = list(tmp_path.rglob("events.out.tfevents*"))
    assert files
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/sdslora/reparameterise/layers" in tags
    assert any(t.startswith("train/diag/") for t in tags), sorted(tags)
