"""VeRA (Kopiczko, Blankevoort, Asano 2024, arXiv 2310.11454): frozen random projections shared by every layer,
two trainable scaling vectors per layer.

ΔW_l = s · diag(b_l) · B_l · diag(d_l) · A_l, with A ∈ R^{r×in_max} and B ∈ R^{out_max×r} ONE pair of frozen random
matrices for all adapted layers (a layer uses the slices A_l = A[:, :in_l], B_l = B[:out_l, :], as PEFT does), and
trainable d_l ∈ R^r (``lora_lambda_d``, init ``d_initial`` = 0.1) and b_l ∈ R^{out_l} (``lora_lambda_b``, init 0, so
ΔW = 0 at the start). Trainable values per layer: r + out (LoRA: r(in + out)); VeRA's papers use r = 256 and more.
Gradients with G = ∂L/∂W_l:

    ∇b_l = s · diag(G Aᵀ_l diag(d_l) Bᵀ_l)  (row-wise: ∇b_i = s⟨G_i, (B_l diag(d) A_l)_i⟩),
    ∇d_l = s · diag(Bᵀ_l diag(b_l) G Aᵀ_l).

The projections are not saved: they are drawn from ``projection_seed`` with a private ``torch.Generator`` (CPU,
float32, Kaiming-uniform as PEFT draws them), so a saved adapter holds only the vectors and a fingerprint of the
projections (the layer's extra state: the float64 sums of its float32 slices), which loading checks against the
regenerated ones (a torch whose RNG draws differently would otherwise give silently different numbers). PEFT export: a rank-r LoRA, B'_l = s·diag(b_l)·B_l·
diag(d_l), A'_l = A_l (exact). PEFT's own VeRA has no scaling factor: with ``scaling="standard", alpha=r`` (s = 1) the
adapter computes what PEFT's ``VeraConfig(r=r)`` computes from the same projections (tests/test_vera.py checks it).

Sharing: each layer is built with its own projections (a layer alone is a group of one); ``attach`` then calls
:meth:`VeRALayer.tie_layers` once with every new layer, which makes one :class:`SharedProjections` per (rank, seed)
sized to the largest adapted layer and registers slices of it as the layers' (non-persistent) buffers. The group
holds one copy per (device, dtype) its layers live on: ``model.to(...)`` (a move, a cast) moves each layer's slice as
for any buffer, then the layer re-binds to the group's copy on the new device and dtype, so the layers share one
tensor again and the copy no layer uses any more is dropped (as PEFT's VeRA shares one buffer).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer


@dataclass
class VeRAOptions:
    """Options of ``vera``: ``d_initial`` (0.1, the start value of every d_l) and ``projection_seed`` (0, the seed
    of the shared frozen projections; part of the saved adapter)."""

    d_initial: float = 0.1
    projection_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or not math.isfinite(
            self.d_initial
        ):
            raise ValueError(f"vera d_initial must be a finite number (VeRA uses 0.1), got {self.d_initial!r}")
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int) or (
            self.projection_seed < 0
        ):
            raise ValueError(f"vera projection_seed must be an int >= 0, got {self.projection_seed!r}")


@torch.no_grad()
def draw_projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen projections ``(A [r, in_max], B [out_max, r])``, float32 on the CPU, drawn from ``seed``
    with a private generator (torch's global RNG is not touched): Kaiming-uniform, bound 1/sqrt(fan_in) (the
    default initialisation of an nn.Linear weight, which PEFT's VeRA uses)."""
    gen = torch.Generator().manual_seed(int(seed))
    a = (torch.rand(r, in_max, generator=gen) * 2 - 1) / math.sqrt(in_max)
    b = (torch.rand(out_max, r, generator=gen) * 2 - 1) / math.sqrt(r)
    return a, b


class SharedProjections:
    """The frozen projections of one group of VeRA layers (same rank and seed): A [r, in_max] and B [out_max, r]
    drawn from ``seed``, one copy per (device, dtype) that a member layer uses (drawn again for a new one, float32,
    then cast: every copy holds the same values)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int) -> None:
        self.r, self.in_max, self.out_max, self.seed = r, in_max, out_max, seed
        self.copies: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.members: list[weakref.ref[VeRALayer]] = []  # the layers bound to a copy (weak: the layers own the group)

    def __getstate__(self) -> dict[str, Any]:
        # a copied or pickled group starts empty: its layers carry their own slices and re-bind on their next move
        return {"r": self.r, "in_max": self.in_max, "out_max": self.out_max, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["r"], state["in_max"], state["out_max"], state["seed"])  # type: ignore[misc]

    def bind(self, layer: VeRALayer, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not any(ref() is layer for ref in self.members):
            self.members.append(weakref.ref(layer))
        return self.on(device, dtype)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (torch.device(device), dtype)
        if key not in self.copies:
            a, b = draw_projections(self.r, self.in_max, self.out_max, self.seed)
            self.copies[key] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
        return self.copies[key]

    def drop_unused(self) -> None:
        """Forget the copies no member layer's slice points into any more (after the last layer has moved)."""
        used = set()
        for ref in self.members:
            layer = ref()
            if layer is not None:
                used.add(layer.lora_A.untyped_storage().data_ptr())
        for key, (a, _b) in list(self.copies.items()):
            if a.untyped_storage().data_ptr() not in used:
                del self.copies[key]


def _fingerprint(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Sums of the float32 draws (before any cast to the adapter dtype, so a later ``model.to(bf16)`` keeps it)."""
    return [float(a.double().sum()), float(b.double().sum())]


class VeRALayer(AdapterLayer):
    """VeRA: ``y = W0 x + s · b ⊙ (B_l (d ⊙ (A_l dropout(x))))`` with A, B frozen and shared, d and b trainable."""

    method = "vera"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scale: float,
        dropout: float,
        dtype: str,
        options: Any,
        *,
        deferred: bool = False,
    ):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev, dt = self.base_weight.device, self.adapter_dtype
        a, b = draw_projections(self.r, self.in_features, self.out_features, options.projection_seed)
        self.register_buffer("lora_A", a.to(device=dev, dtype=dt), persistent=False)
        self.register_buffer("lora_B", b.to(device=dev, dtype=dt), persistent=False)
        self.projection_sums = _fingerprint(a, b)
        self.lora_lambda_d = nn.Parameter(torch.full((self.r,), float(options.d_initial), dtype=dt, device=dev))
        self.lora_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dt, device=dev))
        self.group_size = 1  # layers sharing these projections (set by tie_layers)
        self.projections: SharedProjections | None = None  # the group (set by tie_layers)

    # ---- cross-layer sharing ----------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def tie_layers(cls, layers: Mapping[str, AdapterLayer]) -> None:
        """One :class:`SharedProjections` per (rank, seed), sized to the largest adapted layer; every layer gets its
        slices of the group's copy on its own device and dtype (non-persistent buffers, views of one tensor)."""
        groups: dict[tuple[Any, ...], list[VeRALayer]] = {}
        for layer in layers.values():
            if isinstance(layer, VeRALayer):
                groups.setdefault((layer.r, layer.options.projection_seed), []).append(layer)
        for (r, seed), members in groups.items():
            in_max = max(layer.in_features for layer in members)
            out_max = max(layer.out_features for layer in members)
            shared = SharedProjections(r, in_max, out_max, seed)
            a, b = shared.on(torch.device("cpu"), torch.float32)
            for layer in members:
                layer.projection_sums = _fingerprint(a[:, : layer.in_features], b[: layer.out_features, :])
                layer.projections = shared
                layer.group_size = len(members)
            for layer in members:
                layer._bind()
            shared.drop_unused()

    def _bind(self) -> None:
        """Point this layer's A, B at its group's copy on the device and dtype the layer's tensors are on."""
        if self.projections is None:
            return
        a, b = self.projections.bind(self, self.lora_A.device, self.lora_A.dtype)
        self.lora_A = a[:, : self.in_features]
        self.lora_B = b[: self.out_features, :]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> VeRALayer:
        # a move or cast gives this layer its own copy of its slices (as for any buffer): re-bind to the group's
        # copy on the new device and dtype, so the layers share one tensor again
        out = super()._apply(fn, *args, **kwargs)
        if self.projections is not None:
            self._bind()
            self.projections.drop_unused()
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"projection_sums": list(self.projection_sums)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Check the saved fingerprint against the projections regenerated from ``projection_seed`` (the layers are
        tied before a saved adapter's state is read, on every load path)."""
        saved = state.get("projection_sums")
        if sorted(state) != ["projection_sums"] or not isinstance(saved, list) or len(saved) != 2:
            raise ValueError(
                f"VeRA layer extra state must be {{'projection_sums': [sum_A, sum_B]}}, got {state!r}: the adapter's "
                "files are incomplete or were edited"
            )
        now = self.projection_sums
        if any(abs(float(x) - y) > 1e-9 * max(1.0, abs(y)) for x, y in zip(saved, now, strict=True)):
            raise ValueError(
                f"this VeRA adapter was trained with frozen projections (sums {saved}) that differ from the "
                f"ones drawn here from projection_seed={self.options.projection_seed} (sums {now}): the "
                "adapter was saved by a torch whose random-number generator draws differently, or its files were "
                "edited. Load it with the torch version that saved it, or use its PEFT LoRA export "
                "(sdslora export), which holds the projections."
            )

    # ---- the contract -------------------------------------------------------------------------------------------
    def _up(self) -> torch.Tensor:
        """diag(b) B diag(d) [out, r]."""
        return self.lora_lambda_b[:, None] * self.lora_B * self.lora_lambda_d

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self._up() @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> A -> [..., r] -> d ⊙ -> B -> [..., out] -> b ⊙ (the order of PEFT's VeRA forward)
        h = F.linear(self._cast_in(x), self.lora_A) * self.lora_lambda_d
        return F.linear(h, self.lora_B) * (self.scale * self.lora_lambda_b)

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.scale * self._up()).detach().clone(), self.lora_A.detach().clone()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The effective pair (diag(d) A, diag(b) B): the frozen projections scaled by what trains."""
        return (self.lora_lambda_d.detach()[:, None] * self.lora_A, self.lora_lambda_b.detach()[:, None] * self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projections shared by {self.group_size} layer(s)"
