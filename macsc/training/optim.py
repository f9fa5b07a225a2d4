"""The optimiser of MaCSC fine-tuning: AdamW with linear warm-up and linear decay (SPEC; A.3),
or, for baselines fine-tuned as their own papers did (SPEC 10), Adafactor at a constant rate (T5).
Its options are one group, :class:`OptimizerOptions` (``model.optimizer`` in a config)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from macsc.method.options import choose

#: ``model.optimizer.name``: AdamW (MaCSC, BERT, RoBERTa, XLNet) or Adafactor (T5's fine-tuning,
#: Raffel et al. 2020, §3.1.2: factored second moments, no momentum, updates relative to the
#: parameter's scale; torch.optim.Adafactor)
OPTIMIZERS = ("adamw", "adafactor")
#: ``model.optimizer.schedule``: after the linear warm-up, a linear decay to zero or a constant rate
LR_SCHEDULES = ("linear", "constant")

#: parameters without weight decay (biases, norms, the modality embeddings); the CLIP text
#: towers name their norms ln_1, ln_2, ln_final (open_clip) and layer_norm1, layer_norm2 (HF)
NO_DECAY = (
    "bias",
    "LayerNorm.weight",
    "layer_norm.weight",
    "norm.weight",
    "type_embedding",
    "ln_1.weight",
    "ln_2.weight",
    "ln_final.weight",
    "layer_norm1.weight",
    "layer_norm2.weight",
)
#: the modality weights rho and Z, which may take their own learning rate
MODALITY_WEIGHTS = ("objective.rho_logits", "objective.calibration.z")


@dataclass(frozen=True)
class OptimizerOptions:
    """The optimiser and its learning-rate schedule: linear warm-up, then linear decay to zero
    (or a constant rate), stepped every optimiser step."""

    name: str = "adamw"
    """``adamw``, or ``adafactor`` (T5's fine-tuning optimiser, for the T5 baseline of SPEC 10;
    ``adam_epsilon`` does not apply)."""
    learning_rate: float = 1e-4
    """The peak learning rate, reached at the end of the warm-up."""
    weight_decay: float = 0.01
    """Decoupled weight decay of every parameter but biases, norms, the modality embeddings,
    ``ρ`` and ``Z``."""
    warmup_ratio: float = 0.1
    """Share of the run's optimiser steps spent warming up linearly from zero."""
    adam_epsilon: float = 1e-8
    """AdamW's ``ε``."""
    schedule: str = "linear"
    """After the warm-up: ``linear`` decay to zero at the last step, or a ``constant`` rate
    (T5's fine-tuning)."""
    modality_weight_lr_scale: float = 1.0
    """Learning-rate multiplier of the modality weights ``ρ`` and ``Z`` (the paper uses one
    learning rate: 1.0; short runs may want them to move faster)."""

    def __post_init__(self) -> None:
        choose("model.optimizer.name", self.name, OPTIMIZERS)
        choose("model.optimizer.schedule", self.schedule, LR_SCHEDULES)


def build_optimizer(module: nn.Module, options: OptimizerOptions) -> torch.optim.Optimizer:
    """AdamW (or Adafactor) over the trainable parameters of ``module``: weight decay except on
    biases, norms, ``ρ`` and ``Z``; ``ρ`` and ``Z`` at ``learning_rate *
    modality_weight_lr_scale``."""
    decay, plain, weights = [], [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        if name in MODALITY_WEIGHTS:
            weights.append(parameter)
        else:
            (plain if any(key in name for key in NO_DECAY) else decay).append(parameter)
    # the same AdamW update in one fused kernel over all parameters, where torch has one,
    # instead of the CPU default's Python loop over ~270 tensors (about 10x faster there)
    fused = all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + plain + weights
    )
    rate = options.learning_rate
    groups = [
        {"params": decay, "weight_decay": options.weight_decay},
        {"params": plain, "weight_decay": 0.0},
        {"params": weights, "weight_decay": 0.0, "lr": rate * options.modality_weight_lr_scale},
    ]
    if options.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=rate)
    return torch.optim.AdamW(groups, lr=rate, eps=options.adam_epsilon, fused=fused or None)


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, options: OptimizerOptions
) -> dict[str, Any]:
    """Lightning's scheduler entry: linear warm-up over ``ceil(warmup_ratio * total)`` steps,
    then linear decay to zero at ``total_steps`` (``schedule="linear"``) or the full rate to
    the end (``"constant"``), stepped every optimizer step."""
    total = max(1, int(total_steps))
    warmup = int(math.ceil(options.warmup_ratio * total))
    factor = LinearSchedule(warmup, total, decay=options.schedule == "linear")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step"}


class LinearSchedule:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then linear decay to 0 at ``total``
    (or 1 to the end without ``decay``)."""

    def __init__(self, warmup: int, total: int, decay: bool = True) -> None:
        self.warmup, self.total, self.decay = warmup, total, decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if not self.decay:
            return 1.0
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))
