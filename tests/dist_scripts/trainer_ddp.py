"""torchrun --nproc-per-node 2 trainer_ddp.py: the HF Trainer (DDP under torchrun, gloo on CPU) with
SDSLoRACallback and gradient accumulation 2, compared with a one-process plain loop on the same global batches;
writes a JSON summary (rank 0) to $SDSLORA_TEST_OUT for tests/test_distributed.py."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.distributed as dist
from common import (
    GLOBAL_BATCH,
    LR,
    T,
    adapter_snapshot,
    fresh_model,
    global_batch,
    identical_on_all_ranks,
    max_diff,
    reference_run,
    write_result,
)
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from sdslora.integrations.hf import SDSLoRACallback

ACCUM = 2  # 2 ranks x 1 sample x 2 micro-batches = the global batch of 4


class Checks(TrainerCallback):
    """Runs after SDSLoRACallback: after every duty, are the ranks identical and equal to the reference?"""

    def __init__(self, ref: dict[str, Any], sds: SDSLoRACallback):
        self.ref, self.sds = ref, sds
        self.identical: dict[int, bool] = {}
        self.vs_ref: dict[int, float] = {}
        self.losses: list[float] = []
        self.micro_batches = 0

    def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.micro_batches += 1

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.micro_batches += 1
        step = int(state.global_step)
        if any(e["step"] == step for e in self.sds.controller.events):
            snap = adapter_snapshot(model)
            self.identical[step] = identical_on_all_ranks(snap)
            self.vs_ref[step] = max_diff(snap, self.ref["snaps"][step])

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)  # sample i of the global order -> as in the reference


def run_trainer(ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train with the Trainer (it starts DDP, or joins the process group already started)."""
    data = []
    for step in range(1, T + 1):
        b = global_batch(step)
        data += [{k: v[i] for k, v in b.items()} for i in range(GLOBAL_BATCH)]
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="sdslora_trainer_"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=ACCUM,
        max_steps=T,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    assert dist.is_initialized() and dist.get_world_size() == 2, "the Trainer did not start DDP"
    if ref is None:
        torch.manual_seed(0)
        ref = reference_run()
    model = fresh_model()
    sds = SDSLoRACallback()
    checks = Checks(ref, sds)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=data, callbacks=[sds, checks])
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    return {
        "wrapped": wrapped,
        "losses": checks.losses,
        "ref_losses": ref["losses"],
        "identical": checks.identical,
        "vs_ref": checks.vs_ref,
        "controller_t": sds.controller.t,
        "global_step": trainer.state.global_step,
        "event_steps": [e["step"] for e in sds.controller.events],
        "events": [e["event"] for e in sds.controller.events],
        "micro_batches": checks.micro_batches,
        "final_vs_ref": max_diff(adapter_snapshot(model), ref["final"]),
    }


def main() -> None:
    write_result(run_trainer())
    dist.barrier()


if __name__ == "__main__":
    main()
