"""torchrun --nproc-per-node 2 ddp_fsdp.py: SDS-LoRA under DDP (with and without the Controller's rank-0 sync),
under FSDP2 (fully_shard) and through the HF Trainer (trainer_ddp.py), each compared with a one-process run on the
same global batch; writes a JSON summary (rank 0) to $SDSLORA_TEST_OUT for tests/test_distributed.py."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import (
    LR,
    T,
    adapter_snapshot,
    fresh_model,
    identical_on_all_ranks,
    local_batch,
    max_diff,
    reference_run,
    write_result,
)
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from trainer_ddp import run_trainer

import sdslora
import sdslora.io as sio


def run_ddp(ref: dict[str, Any], sync: Any, perturb: bool = False, method: str = "sds") -> dict[str, Any]:
    """``perturb``: before the duty of step 12, rank 1 nudges one B by 1e-6 (as if its hardware rounded
    differently); with the Controller's sync the ranks are bitwise equal again after the duty."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fresh_model(method)
    model.train()
    ddp = DDP(model)  # wrap AFTER attach
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=LR)
    ctl = sdslora.Controller(ddp, opt, total_steps=T, sync=sync)
    losses, identical, vs_ref, no_grad = [], {}, {}, []
    before = None
    for step in range(1, T + 1):
        out = ddp(**local_batch(step, rank, world))
        out.loss.backward()
        no_grad += [n for n, p in model.named_trainable_parameters() if p.grad is None]
        opt.step()
        opt.zero_grad()
        if perturb and step == 12 and rank == 1:
            with torch.no_grad():
                next(iter(model.adapter_layers().values())).lora_B.add_(1e-6)
        if perturb and step == 12:
            before = identical_on_all_ranks(adapter_snapshot(model))
        done = ctl.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        if done.events:
            snap = adapter_snapshot(model)
            identical[step] = identical_on_all_ranks(snap)
            vs_ref[step] = max_diff(snap, ref["snaps"][step])
    layer0 = next(iter(model.adapter_layers().values()))
    return {
        "losses": losses,
        "identical": identical,
        "vs_ref": vs_ref,
        "no_grad": sorted(set(no_grad)),
        "events": [e["event"] for e in ctl.events],
        "phase": int(getattr(layer0, "lora_phase", -1)),
        "decoupled": getattr(layer0, "decoupled", None),
        "kept": [e.get("kept") for e in ctl.events],
        "ref_losses": ref["losses"],
        "ref_kept": ref["kept"],
        "identical_before_duty_12": before,
        # the frozen weights too (ReLoRA re-derives them from the broadcast merged update)
        "base_identical": identical_on_all_ranks(
            {n: layer.base_weight.detach().float().clone() for n, layer in model.adapter_layers().items()}
        ),
    }


def run_accelerate(ref: dict[str, Any]) -> dict[str, Any]:
    """A plain Accelerate loop (DDP) with accumulate(): the global batch as 2 ranks x 2 micro-batches of 1; the
    Controller's step() is called after every micro-batch, as a user of accumulate() writes it."""
    from accelerate import Accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = fresh_model()
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=LR)
    wrapped, opt = acc.prepare(model, opt)
    ctl = sdslora.Controller(wrapped, opt, total_steps=T)
    losses, identical, vs_ref, calls = [], {}, {}, 0
    for step in range(1, T + 1):
        batch = local_batch(step, rank, world)
        step_loss = torch.zeros(())
        for i in range(2):
            with acc.accumulate(wrapped):
                out = wrapped(**{k: v[i : i + 1] for k, v in batch.items()})
                acc.backward(out.loss)
                opt.step()
                opt.zero_grad()
                done = ctl.step()
                calls += 1
            step_loss += out.loss.detach() / 2
        dist.all_reduce(step_loss)
        losses.append(float(step_loss) / world)
        if done.events:
            snap = adapter_snapshot(model)
            identical[step] = identical_on_all_ranks(snap)
            vs_ref[step] = max_diff(snap, ref["snaps"][step])
    return {
        "wrapped": type(wrapped).__name__,
        "losses": losses,
        "identical": identical,
        "vs_ref": vs_ref,
        "controller_t": ctl.t,
        "calls": calls,
        "event_steps": [e["step"] for e in ctl.events],
        "events": [e["event"] for e in ctl.events],
    }


def run_fsdp(ref: dict[str, Any], method: str = "sds") -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    model = fresh_model(method)
    model.train()
    for block in model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    layers = model.adapter_layers()
    adapter_ids = {id(p) for layer in layers.values() for p in layer.parameters(recurse=False)}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=LR)
    ctl = sdslora.Controller(model, opt, total_steps=T)

    gathered: list[int] = []  # ids of every DTensor gathered during the Controller's duties
    orig_full = DTensor.full_tensor

    def spy(self: DTensor, *a: Any, **k: Any) -> torch.Tensor:
        gathered.append(id(self))
        return orig_full(self, *a, **k)

    losses, identical, vs_ref, sharded_after = [], {}, {}, {}
    n_gathered = 0
    for step in range(1, T + 1):
        out = model(**local_batch(step, rank, world))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        DTensor.full_tensor = spy
        try:
            done = ctl.step()
        finally:
            DTensor.full_tensor = orig_full
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        if done.events:
            n_gathered += len(gathered)
            sharded_after[step] = all(
                isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0]
                for layer in layers.values()
                for p in layer.parameters(recurse=False)
            )
            snap = adapter_snapshot(model)
            identical[step] = identical_on_all_ranks(snap)
            vs_ref[step] = max_diff(snap, ref["snaps"][step])
    only_adapter = set(gathered) <= adapter_ids
    # save from the sharded model: every rank calls, rank 0 alone writes the full adapter
    writes: list[str] = []
    orig_save = sio.save_file

    def count_save(tensors: dict[str, torch.Tensor], filename: str, **k: Any) -> None:
        writes.append(filename)
        orig_save(tensors, filename, **k)

    sio.save_file = count_save
    out_dir = Path(tempfile.gettempdir()) / f"sdslora_fsdp_save_{dist.get_rank() and 'x'}{id(ref)}"
    shared_dir = [str(out_dir) if rank == 0 else None]
    dist.broadcast_object_list(shared_dir, src=0)
    try:
        sdslora.save_adapter(model, shared_dir[0] + "/native")
        sdslora.export_peft(model, shared_dir[0] + "/peft")
    finally:
        sio.save_file = orig_save
    n_writes = [None] * world
    dist.all_gather_object(n_writes, len(writes))
    final = adapter_snapshot(model)
    result: dict[str, Any] = {
        "losses": losses,
        "ref_losses": ref["losses"],
        "identical": identical,
        "vs_ref": vs_ref,
        "sharded_after": sharded_after,
        "gathered_only_adapter": only_adapter,
        "n_gathered": n_gathered,
        "writes_per_rank": n_writes,
        "events": [e["event"] for e in ctl.events],
    }
    if rank == 0:
        saved = load_file(shared_dir[0] + "/native/adapter_model.safetensors")
        result["saved_keys_match"] = sorted(saved) == sorted(final)
        result["saved_vs_model"] = max(float((saved[k].float() - final[k]).abs().max()) for k in final)
        result["saved_vs_ref"] = max(float((saved[k].float() - ref["final"][k]).abs().max()) for k in final)
        peft = load_file(shared_dir[0] + "/peft/adapter_model.safetensors")
        errs = []
        for name, layer in model.adapter_layers().items():
            p = f"{name}."
            a, b = final[p + "lora_A"], final[p + "lora_B"]
            if method == "sds":  # ΔW = s (Q_B A + B Q_Aᵀ)
                delta = layer.scale * (final[p + "lora_QB"] @ a + b @ final[p + "lora_QA"])
            else:  # orthogonal: ΔW = s (B A + O_B O_A)
                delta = layer.scale * (b @ a + final[p + "lora_offset_B"] @ final[p + "lora_offset_A"])
            pa, pb = (peft[f"base_model.model.{name}.lora_{k}.weight"] for k in "AB")
            errs.append(float((pb.float() @ pa.float() - delta).abs().max()))
        result["peft_delta_err"] = max(errs)
    return result


def fsdp1_refused() -> list[str]:
    """FSDP1 (use_orig_params=True; False is refused by FSDP1 itself for a partly frozen model) flattens A and B:
    the Controller must refuse it at construction, given the wrapper or the AdaptedModel inside."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = fresh_model()
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    errors = []
    for target in (wrapped, model):
        try:
            sdslora.Controller(target, opt, total_steps=T)
        except ValueError as e:
            errors.append(str(e))
    return errors


def fsdp2_refused() -> dict[str, str]:
    """Methods whose duties are written for unsharded tensors (ReLoRA's merge into W0, AdaLoRA's importance
    buffers) are refused on an FSDP2-sharded model at construction, with the way out, not a DTensor error later."""
    from torch.distributed.fsdp import fully_shard

    errors = {}
    for method in ("relora_sds", "adalora"):
        model = fresh_model(method)
        for block in model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=LR)
        try:
            sdslora.Controller(model, opt, total_steps=T)
            errors[method] = ""
        except ValueError as e:
            errors[method] = str(e)
    return errors


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    ref = reference_run()
    result = {
        "world": dist.get_world_size(),
        "ref_losses": ref["losses"],
        "ref_events": [e["event"] for e in ref["events"]],
        "ddp_nosync": run_ddp(ref, sync=False),
        "ddp": run_ddp(ref, sync="auto"),
        "ddp_perturbed_sync": run_ddp(ref, sync="auto", perturb=True),
        "ddp_perturbed_nosync": run_ddp(ref, sync=False, perturb=True),
        "ddp_relora_sds": run_ddp(reference_run(method="relora_sds"), sync="auto", method="relora_sds"),
        "ddp_adalora": run_ddp(reference_run(method="adalora"), sync="auto", method="adalora"),
        "fsdp": run_fsdp(ref),
        "fsdp_orthogonal": run_fsdp(reference_run(method="orthogonal"), method="orthogonal"),
        "fsdp1_errors": fsdp1_refused(),
        "fsdp2_refused": fsdp2_refused(),
        "accelerate": run_accelerate(ref),
        "trainer": run_trainer(ref),  # in the same launch: process start-up dominates the test's time
    }
    write_result(result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
