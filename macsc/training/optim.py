"""The optimiser of MaCSC fine-tuning: AdamW with linear warm-up and linear decay (SPEC; A.3),
or, for baselines fine-tuned as their own papers did (SPEC 10), Adafactor at a constant rate (T5)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from macsc.errors import ConfigError

#: ``model.optimizer``: AdamW (MaCSC, BERT, RoBERTa, XLNet) or Adafactor (T5's fine-tuning,
#: Raffel et al. 2020, §3.1.2: factored second moments, no momentum, updates relative to the
#: parameter's scale; torch.optim.Adafactor)
OPTIMIZERS = ("adamw", "adafactor")
#: ``model.lr_schedule``: after the linear warm-up, a linear decay to zero or a constant rate
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


def check_choice(option: str, value: str, known: tuple[str, ...]) -> None:
    """A ConfigError naming ``option`` when ``value`` is not one of ``known``."""
    if value not in known:
        raise ConfigError(f"{option}: {value!r} is not one of {', '.join(known)}")


def build_optimizer(
    module: nn.Module,
    learning_rate: float,
    weight_decay: float,
    adam_epsilon: float,
    modality_weight_lr_scale: float = 1.0,
    optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW (or Adafactor, ``optimizer="adafactor"``) over the trainable parameters of
    ``module``: weight decay except on biases, norms, ``ρ`` and ``Z``; ``ρ`` and ``Z`` at
    ``learning_rate * modality_weight_lr_scale``. ``adam_epsilon`` is AdamW's alone."""
    check_choice("model.optimizer", optimizer, OPTIMIZERS)
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
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
        {"params": weights, "weight_decay": 0.0, "lr": learning_rate * modality_weight_lr_scale},
    ]
    if optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=learning_rate)
    return torch.optim.AdamW(groups, lr=learning_rate, eps=adam_epsilon, fused=fused or None)


def linear_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float,
    after_warmup: str = "linear",
) -> dict[str, Any]:
    """Lightning's scheduler entry: linear warm-up over ``ceil(warmup_ratio * total)`` steps,
    then linear decay to zero at ``total_steps`` (``after_warmup="linear"``) or the full rate
    to the end (``"constant"``), stepped every optimizer step."""
    check_choice("model.lr_schedule", after_warmup, LR_SCHEDULES)
    total = max(1, int(total_steps))
    warmup = int(math.ceil(warmup_ratio * total))
    factor = LinearSchedule(warmup, total, decay=after_warmup == "linear")
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
