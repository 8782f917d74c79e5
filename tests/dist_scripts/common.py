"""Shared pieces of the scripts that tests/test_distributed.py launches with torchrun (gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/models.py

from models import batch_for, tiny_llama  # noqa: E402

import sdslora  # noqa: E402

T = 20  # optimizer steps: warm-up 10, re-parameterisation after step 10, decaying refreshes after
GLOBAL_BATCH = 4
LR = 1e-2


# ReLoRA over SDS-LoRA: cycles of 10 steps (restarts after 10 and 20), each re-parameterising after its step 4; the
# optimizer state is forgotten at a restart (prune=1.0): the default partial reset keeps the top 1 % of entries, a
# choice that float differences of the all-reduce can flip, which would blur the comparison with one process
RESTART = {"restart_every": 10, "warmup_steps": 4, "restart_warmup": 1, "prune": 1.0}


# AdaLoRA: rank 4 pruned to 2 on average; importances observed from the all-reduced gradients after every step,
# prunings after steps 6, 8, ..., 16 (the last one fixes the pattern, re-applied after every later step)
ADALORA = {"target_r": 2, "tinit": 4, "tfinal": 4, "deltaT": 2}


def config(method: str = "sds") -> sdslora.AdapterConfig:
    # refresh every 2 steps after the warm-up: refreshes at 12, 14, ..., 20 (the decaying rule gives one in 20 steps)
    options = {"refresh": "every:2", **(RESTART if method == "relora_sds" else {})}
    if method == "adalora":
        options = ADALORA
    return sdslora.AdapterConfig(
        method=method, r=4, target_modules=["q_proj", "v_proj", "down_proj"], options=options
    )


def fresh_model(method: str = "sds") -> sdslora.AdaptedModel:
    """The same tiny Llama with the same adapter initialisation on every rank and in the reference."""
    base = tiny_llama(seed=0)
    torch.manual_seed(1)
    return sdslora.attach(base, config(method))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    return batch_for("llama", seed=100 + step, n=GLOBAL_BATCH, seq=12)


def local_batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    per = GLOBAL_BATCH // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in global_batch(step).items()}


def full(t: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly FSDP2-sharded DTensor) tensor, detached float32 CPU."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def adapter_snapshot(model: sdslora.AdaptedModel) -> dict[str, torch.Tensor]:
    """Every adapter tensor (A, B, Q buffers, phase) of every layer, full values."""
    return {
        f"{n}.{k}": full(t)
        for n, layer in model.adapter_layers().items()
        for k, t in layer.adapter_tensors().items()
    }


def identical_on_all_ranks(snap: dict[str, torch.Tensor]) -> bool:
    """Whether every rank holds bitwise the same tensors (all-gather of the concatenated bits)."""
    flat = torch.cat([snap[k].reshape(-1) for k in sorted(snap)]).view(torch.int32)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return all(torch.equal(every[0], e) for e in every)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference_run(steps: int = T, method: str = "sds") -> dict[str, Any]:
    """One process, the global batch, plain loop: losses and adapter snapshots after every duty."""
    model = fresh_model(method)
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=LR)
    ctl = sdslora.Controller(model, opt, total_steps=T)
    losses, snaps = [], {}
    for step in range(1, steps + 1):
        out = model(**global_batch(step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if ctl.step().events:
            snaps[step] = adapter_snapshot(model)
        losses.append(float(out.loss.detach()))
    return {"losses": losses, "snaps": snaps, "final": adapter_snapshot(model), "events": ctl.events,
            "kept": [e.get("kept") for e in ctl.events]}


def write_result(result: dict[str, Any]) -> None:
    if dist.get_rank() == 0:
        Path(os.environ["SDSLORA_TEST_OUT"]).write_text(json.dumps(result, indent=1))
