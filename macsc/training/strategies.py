"""Sharded training as a config entry: Lightning's FSDP, wrapping named transformer blocks."""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from macsc.errors import ConfigError


def import_class(path: str) -> type:
    """``package.module.Class`` -> the class, or a ConfigError naming the path."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"cannot import {path!r} ({error}); give package.module.Class") from error


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's :class:`FSDPStrategy` with each ``blocks`` module (e.g.
    ``transformers.models.t5.modeling_t5.T5Block``) its own shard unit and, with
    ``activation_checkpointing``, its activations recomputed in the backward pass.

    The classes are given by import path, so a YAML config can name them; every other option
    is FSDPStrategy's (``sharding_strategy``, ``state_dict_type``, ``timeout``, ...).
    """

    def __init__(
        self,
        blocks: list[str] | None = None,
        activation_checkpointing: bool = True,
        **options: Any,
    ) -> None:
        classes = {import_class(path) for path in blocks or []}
        if classes:
            options.setdefault("auto_wrap_policy", classes)
            if activation_checkpointing:
                options.setdefault("activation_checkpointing_policy", classes)
        super().__init__(**options)
