"""The non-finite loss guard: stop on a NaN/Inf loss term, or skip the batch (model.nonfinite).

``raise`` adds no host sync to the step: the first bad step and the terms involved are recorded
on the device (:meth:`NonFiniteGuard.note`) and checked by :class:`NonFiniteCheck` every
``log_every_n_steps``, before any checkpoint is written and at the end of training. ``skip``
must decide in the step, so it costs one host sync per step; under DDP every rank skips when any
rank must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from macsc.errors import ConfigError, NonFiniteLossError

POLICIES = ("raise", "skip")


class NonFiniteGuard(nn.Module):
    """State of the guard: the ``skipped_batches`` counter (saved in checkpoints) and, for
    ``raise``, the first bad step and its terms (plain attributes, not buffers: DDP would
    overwrite every rank's record with rank 0's)."""

    def __init__(self, policy: str = "raise") -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ConfigError(f"model.nonfinite must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long))
        self._step: Tensor | None = None
        self._terms: Tensor | None = None
        self._clean_batches = 0  # finite batches since the last optimizer step (skip)

    def note(self, terms: Tensor, step: int) -> None:
        """``raise``: remember the first step with a NaN/Inf term and which terms, on the
        device and without waiting for it."""
        bad = ~torch.isfinite(terms)
        if self._step is None or self._step.device != terms.device:
            self._step = torch.full((), -1, dtype=torch.long, device=terms.device)
            self._terms = torch.zeros_like(bad)
        first = bad.any() & (self._step < 0)
        self._step = torch.where(first, torch.full_like(self._step, step), self._step)
        self._terms = torch.where(first, bad, self._terms)

    def raise_if_nonfinite(
        self,
        names: list[str],
        where: str,
        all_gather: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Raise :class:`NonFiniteLossError` if any rank recorded a NaN/Inf term (one host
        sync; every rank calls it at the same point, so ``all_gather`` is safe)."""
        if self._step is None:
            return
        record = torch.cat([self._step.view(1), self._terms.long()])
        record = (all_gather(record) if all_gather is not None else record[None]).cpu()
        seen = record[record[:, 0] >= 0]
        if not len(seen):
            return
        first = seen[seen[:, 0].argmin()]
        bad = [n for n, flag in zip(names, first[1:].tolist(), strict=True) if flag]
        raise NonFiniteLossError(
            f"non-finite loss term(s) {bad} at global step {int(first[0])} (found at {where}; "
            "no checkpoint was written after it); lower the learning rate, check the data, or "
            "set model.nonfinite: skip to skip such batches"
        )

    def should_skip(
        self,
        terms: Tensor,
        names: list[str],
        step: int,
        any_rank: Callable[[Tensor], Tensor] | None = None,
    ) -> bool:
        """``skip``: whether to skip this batch (``any_rank``: a sum over the ranks)."""
        bad = (~torch.isfinite(terms)).any()
        if any_rank is not None:
            bad = any_rank(bad.float()) > 0
        if not bool(bad):
            self._clean_batches += 1
            return False
        self.skipped_batches += 1
        finite = torch.isfinite(terms).tolist()
        bad_names = [n for n, ok in zip(names, finite, strict=True) if not ok]
        rank_zero_warn(
            f"skipped the batch of global step {step}: non-finite loss term(s) "
            f"{bad_names or '(on another rank)'} (model.nonfinite: skip)"
        )
        return True

    def before_optimizer_step(self, optimizer: Any) -> None:
        """``skip``, and every batch since the last update was skipped: drop the zero gradients,
        so that AdamW leaves each weight and its moments exactly as they were."""
        if self.policy == "skip" and self._clean_batches == 0:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        self._clean_batches = 0


def no_gradient_loss(module: nn.Module) -> Tensor:
    """What a skipped batch returns: zero, reaching every trainable weight with a zero gradient.
    Lightning refuses ``None`` under DDP, and every rank must run the backward (with its
    gradient all-reduce) anyway."""
    weights = [p.sum() for p in module.parameters() if p.requires_grad]
    return torch.stack(weights).sum() * 0.0


class NonFiniteCheck(L.Callback):
    """Reads the guard's record (``model.nonfinite: raise``) every ``log_every_n_steps``,
    before every checkpoint and at the end of training, so no checkpoint holds weights that a
    NaN step has corrupted. The model adds it itself (``configure_callbacks``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    @staticmethod
    def _check(trainer, pl_module) -> None:
        pl_module.guard.raise_if_nonfinite(
            pl_module.objective.term_names,
            f"step {trainer.global_step}, epoch {trainer.current_epoch}",
            pl_module.all_gather if trainer.world_size > 1 else None,
        )
