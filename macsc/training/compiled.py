"""``model.compile_after_backbone``: what runs after the backbone in a training step (enhancers,
heads, objective), compiled with ``torch.compile`` and, in mode ``reduce-overhead``, captured in
CUDA graphs, so that its many small operators cost one launch (issue 20).

Off by default. A CUDA graph holds fixed shapes: one is recorded for each text length the
batches have (the collators pad each batch to its longest text), and after
``torch._dynamo.config.recompile_limit`` lengths (8) the lengths not yet seen run eagerly,
with a warning from torch. It pays where the lengths repeat: SQuAD's windows (all
``max_length``), a data set of short sentences; ``benchmarks/gpu.sh`` measures it at one length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from macsc.errors import ConfigError

#: ``torch.compile``'s modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None, gather_across_devices: bool) -> None:
    """A ConfigError naming ``model.compile_after_backbone`` for a mode torch does not know, or
    beside ``objective.gather_across_devices`` (whose all-gather cannot sit in a graph)."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ConfigError(
            f"model.compile_after_backbone: {mode!r} is not one of {', '.join(COMPILE_MODES)} "
            "(or null, the default: not compiled)"
        )
    if gather_across_devices:
        raise ConfigError(
            "model.compile_after_backbone cannot be used with "
            "model.objective.gather_across_devices: true (the all-gather between the ranks "
            "cannot be captured); set one of them off"
        )


class CompiledAfterBackbone:
    """``after_backbone(text, batch)`` compiled on its first call, in one graph (``fullgraph``:
    a graph break is an error, not a silent slowdown)."""

    def __init__(self, after_backbone: Callable[..., dict[str, Any]], mode: str) -> None:
        self.after_backbone = after_backbone
        self.mode = mode
        self._compiled: Callable[..., dict[str, Any]] | None = None

    def __call__(self, text: Tensor, batch: dict) -> dict[str, Any]:
        if self._compiled is None:
            self._compiled = torch.compile(self.after_backbone, mode=self.mode, fullgraph=True)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: replay
        losses = self._compiled(text, batch)
        # a CUDA graph's outputs live in its memory pool, which the next replay overwrites:
        # what outlives the step (logged values, the non-finite record) is a copy
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in losses.items()}
