"""Per-example evaluation state: what the ``predictions-<split>.jsonl`` records are made of."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class ExampleOutputs(Metric):
    """Per-example tensors of one evaluation split, keyed by the example's position in it.

    Each named value is stored with the batch first (``(B, ...)``); the states are concatenated
    across DDP ranks, and an example seen twice (the distributed sampler repeats a few to even
    out the ranks) keeps its first values. ``compute`` returns ``{"index": (N,), name: (N, ...)}``
    sorted by index, on the CPU.
    """

    full_state_update = False

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names
        for name in ("index", *names):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _wrap_compute(self, compute: Callable) -> Callable:
        """torchmetrics' wrapper squeezes every one-element result to a scalar, so a split of
        one example (one input given to a trained model) lost its batch dimension: the
        results get back the shapes :meth:`compute` gave them."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def unsqueezed(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            values = wrapped(*args, **kwargs)
            return {name: value.reshape(self._shapes[name]) for name, value in values.items()}

        return unsqueezed

    def update(self, index: Tensor, **values: Tensor) -> None:
        self.index.append(index.detach().long())
        for name in self.names:
            getattr(self, name).append(values[name].detach())

    def compute(self) -> dict[str, Tensor]:
        index = self.index
        if isinstance(index, list) and not index:  # a list before any update, a tensor after sync
            self._shapes = {"index": (0,)}
            return {"index": torch.empty(0, dtype=torch.long)}
        index = dim_zero_cat(index).cpu()
        values = {name: dim_zero_cat(getattr(self, name)).cpu() for name in self.names}
        order = torch.argsort(index, stable=True)
        index = index[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        keep = order[first]
        result = {"index": index[first], **{name: value[keep] for name, value in values.items()}}
        self._shapes = {name: value.shape for name, value in result.items()}
        return result


def example_identity(examples: Any, position: int) -> dict[str, Any]:
    """``{"id": ..., "text": ...}`` of the example at ``position`` of an evaluated split:
    the split's own id when it has one (GLUE's ``idx``), else the position; the text (one
    string, or a list for pair tasks)."""
    if examples is None:
        return {"id": position}
    ids = getattr(examples, "ids", None)
    texts = [segment[position] for segment in examples.segments]
    return {
        "id": ids[position] if ids is not None else position,
        "text": texts[0] if len(texts) == 1 else texts,
    }


def named(value: int, names: list[str] | None) -> Any:
    """A class index as its name when the task has names."""
    return names[value] if names and 0 <= value < len(names) else value
