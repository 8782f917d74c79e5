"""LoRA+ (Hayou, Ghosh, Yu, 2024, arXiv 2402.12354): a larger learning rate for B than for A.

    lr_A = lr,   lr_B = λ · lr,   λ = ``loraplus_lr_ratio`` (default 16 = 2⁴, the paper's advice for Adam)

implemented as parameter groups of a plain ``torch.optim.AdamW``. The groups match PEFT's
``peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=λ,
loraplus_weight_decay=wd)`` on LoRA layers: every lora_A at lr, every lora_B at λ·lr, the factors of adapted
embedding layers at ``loraplus_lr_embedding`` (PEFT's default 1e-6), all with weight decay ``weight_decay`` (PEFT's
``loraplus_weight_decay``). [design] Parameters outside adapter layers (``modules_to_save``, e.g. a classifier head)
get lr and ``weight_decay`` (plain AdamW); PEFT would put their 1-D tensors (biases, norms) into the λ·lr group.
DoRA layers are accepted too (their lora_A / lora_B as above; the magnitude vector gets lr, where PEFT's 1-D rule
gives it λ·lr). SDS-LoRA is rejected: after its warm-up A and B play symmetric roles.
The pairing is explicit (``AdaptedModel.layer_parameter_groups()``), not by name or shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..methods.dora import DoRALayer
from ..methods.lora import LoRALayer
from .common import _check_hparams, split_pairs


@dataclass
class LoRAPlusOptions:
    """Options of ``loraplus``.

    Args:
        loraplus_lr_ratio: λ = lr_B / lr_A (16).
        loraplus_lr_embedding: learning rate of both factors of adapted ``nn.Embedding`` layers (1e-6, as PEFT).
    """

    loraplus_lr_ratio: float = 16.0
    loraplus_lr_embedding: float = 1e-6

    def __post_init__(self) -> None:
        if not isinstance(self.loraplus_lr_ratio, (int, float)) or self.loraplus_lr_ratio <= 0:
            raise ValueError(
                f"loraplus option loraplus_lr_ratio must be a number > 0, got {self.loraplus_lr_ratio!r}"
            )
        if not isinstance(self.loraplus_lr_embedding, (int, float)) or self.loraplus_lr_embedding < 0:
            raise ValueError(
                f"loraplus option loraplus_lr_embedding must be a number >= 0, got {self.loraplus_lr_embedding!r}"
            )


def loraplus_optimizer(
    model: nn.Module,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
) -> torch.optim.AdamW:
    """A ``torch.optim.AdamW`` with the LoRA+ parameter groups (see the module docstring).

    Groups (empty ones omitted), each tagged with ``"role"``: ``"A"`` (lr), ``"B"`` (λ·lr), ``"embedding"``
    (``loraplus_lr_embedding``), ``"other"`` (lr). Raises ``ValueError`` for a model without LoRA or DoRA layers
    (full fine-tuning, LoRA-XS, SDS-LoRA) or bad hyper-parameters.
    """
    opts = LoRAPlusOptions(loraplus_lr_ratio, loraplus_lr_embedding)
    _check_hparams(lr, betas, eps, weight_decay)
    pairs, others = split_pairs(model, "loraplus", (LoRALayer, DoRALayer))
    embedding = [p for pr in pairs if isinstance(pr.layer.base_layer, nn.Embedding) for p in (pr.A, pr.B)]
    linear = [pr for pr in pairs if not isinstance(pr.layer.base_layer, nn.Embedding)]
    groups = [
        {"params": [pr.A for pr in linear], "lr": lr, "role": "A"},
        {"params": [pr.B for pr in linear], "lr": lr * opts.loraplus_lr_ratio, "role": "B"},
        {"params": embedding, "lr": opts.loraplus_lr_embedding, "role": "embedding"},
        {"params": others, "lr": lr, "role": "other"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
