"""Beyond one process: the DDP / FSDP2 / DeepSpeed helpers the Controller and the savers share (docs/scaling.md).

Ranks and world size of the default process group, a context that all-gathers an adapter layer's FSDP2-sharded
tensors for the duration of a duty (and writes the results back into the shards), a coalesced broadcast from rank 0,
and the check that refuses wrappings whose copies of the adapter the duties cannot update (DeepSpeed ZeRO, FSDP1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .methods import AdapterLayer


def dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be FSDP2-sharded
        return None
    return DTensor


def fsdp2_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor shard (FSDP2, ``fully_shard``)."""
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def dist_world_size() -> int:
    """World size of the default process group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def dist_rank() -> int:
    """Rank in the default process group (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def gathered_adapter_tensors(layers: list[AdapterLayer], broadcast: bool = False) -> Iterator[dict[int, Any]]:
    """Full (unsharded) adapter tensors of ``layers`` for the duration of the block; sharded again afterwards.

    Under FSDP2 (``fully_shard``) the adapter parameters (A, B: r x in, out x r, small) are DTensor shards. Inside
    the block every DTensor parameter/buffer owned directly by a layer is replaced by a plain tensor holding the
    all-gathered full value (never the base weight: it belongs to ``base_layer``), so that duties written for one
    process (``copy_``, matmuls, QR) run unchanged. On normal exit the full values are optionally broadcast from
    rank 0 (``broadcast=True``: every adapter tensor of the layers, sharded or not, so that all ranks hold bitwise
    the same bases), written back into the local shards, and the sharded tensors put back. Yields a map from
    ``id(temporary parameter)`` to the original sharded parameter (to translate optimizer-state resets). Without
    DTensors this only does the broadcast. A collective: every rank must enter it.
    """
    dtensor = dtensor_type()
    swapped: list[tuple[dict[str, Any], str, Any, torch.Tensor]] = []
    alias: dict[int, Any] = {}
    try:
        with torch.no_grad():
            for layer in layers:
                for store in (layer._parameters, layer._buffers):
                    for name, t in list(store.items()):
                        if dtensor is None or not isinstance(t, dtensor):
                            continue
                        full = t.full_tensor().detach().clone()
                        new = nn.Parameter(full, requires_grad=t.requires_grad) if store is layer._parameters else full
                        store[name] = new
                        swapped.append((store, name, t, new))
                        alias[id(new)] = t
        yield alias
        with torch.no_grad():
            if broadcast and dist_world_size() > 1:
                broadcast_from_rank0([t for layer in layers for t in layer.adapter_tensors().values()])
            if swapped:
                from torch.distributed.tensor import distribute_tensor

                for _store, _name, orig, new in swapped:  # each rank keeps its own shard: no communication
                    shard = distribute_tensor(new.detach(), orig.device_mesh, orig.placements, src_data_rank=None)
                    orig.to_local().copy_(shard.to_local())
    finally:
        for store, name, orig, _new in swapped:
            store[name] = orig


def broadcast_from_rank0(tensors: list[torch.Tensor], bucket_numel: int = 1 << 26) -> None:
    """Overwrite ``tensors`` in place with rank 0's values, coalesced by device and dtype into flat buckets."""
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            start = 0
            while start < len(ts):
                bucket, n = [], 0
                while start < len(ts) and (not bucket or n + ts[start].numel() <= bucket_numel):
                    bucket.append(ts[start])
                    n += ts[start].numel()
                    start += 1
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.broadcast(flat, src=0)
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                    t.copy_(part.view_as(t))


def unsupported_sharding(model: nn.Module, adapted: Any, optimizer: Any) -> str | None:
    """Why the method's in-place duties would be silently wrong with this wrapping (None: fine)."""
    for layer in adapted.adapter_layers().values():
        for p in layer.parameters(recurse=False):
            if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
                return "DeepSpeed ZeRO-3 partitions the adapter parameters"
            if getattr(p, "_fsdp_flattened", False):
                return "FSDP1 (FullyShardedDataParallel) flattens the adapter parameters into shards"
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in (model, *adapted.modules())):
        return "FSDP1 (FullyShardedDataParallel) flattens the adapter parameters into shards"
    seen, opt = 0, optimizer
    while opt is not None and seen < 8:
        if type(opt).__module__.split(".")[0] == "deepspeed":
            return (f"the DeepSpeed optimizer {type(opt).__name__} keeps its own (fp32 master / partitioned) copies of "
                    "the adapter parameters, which would overwrite the re-parameterised values at the next step")
        opt, seen = getattr(opt, "optimizer", None), seen + 1
    return None
