"""Batches: padding the tokens and gathering each example's prototypes from the tables (the
batch format is described in :mod:`tasks.base`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from macsc.prototypes import PrototypeTable

# Tokens the collator pads; every other item field is a scalar stacked into a (B,) tensor.
PADDED_FIELDS = ("input_ids", "token_type_ids")


def pad(sequences: Sequence[Sequence[int]], value: int) -> Tensor:
    """Right-pad sequences of ints (lists, or arrays mapped from the token cache) to the
    longest: ``(B, l)`` long."""
    real = real_positions([len(sequence) for sequence in sequences])
    out = torch.full(real.shape, value, dtype=torch.long)
    # one tensor from all the values, placed in row-major order (a loop of one small tensor per
    # row was most of the collator's time)
    if sequences and isinstance(sequences[0], np.ndarray):
        values = torch.from_numpy(np.concatenate(sequences).astype(np.int64))
    else:
        values = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long)
    out[real] = values
    return out


def real_positions(lengths: list[int]) -> Tensor:
    """``(B, max(lengths))`` bool, true on the first ``lengths[b]`` positions of row ``b``."""
    return torch.arange(max(lengths, default=0)) < torch.tensor(lengths, dtype=torch.long)[:, None]


def gather_prototypes(
    tables: list[PrototypeTable], indices: Tensor, pin_memory: bool = False
) -> dict[str, Tensor]:
    """Prototypes of examples ``indices`` (``(B,)``), one table per segment, concatenated.

    Returns ``features`` ``(B, n_seg * k, d)`` in the tables' storage dtype (the model casts
    them to its compute dtype) and ``mask`` ``(B, n_seg * k)`` bool. The rows are gathered from
    the (memory-mapped) tables straight into one output tensor each, in page-locked memory when
    ``pin_memory``, so a batch is copied once on its way from the map to the device.
    """
    count, k = int(indices.numel()), tables[0].features.shape[1]
    features = torch.empty(
        (count, len(tables) * k, tables[0].features.shape[2]),
        dtype=tables[0].features.dtype,
        pin_memory=pin_memory,
    )
    mask = torch.empty((count, len(tables) * k), dtype=torch.bool, pin_memory=pin_memory)
    for segment, table in enumerate(tables):
        rows = table.rows[indices]
        part = slice(segment * k, (segment + 1) * k)
        torch.index_select(table.features, 0, rows, out=features[:, part])
        torch.index_select(table.mask, 0, rows, out=mask[:, part])
    return {"features": features, "mask": mask}


@dataclass
class Collator:
    """Turns a list of :class:`tasks.base.EncodedSplit` items into a batch (format in the module docstring).

    pad_token_id: the tokenizer's padding id. segments: the split's texts, per segment column.
    tables: modality -> one :class:`PrototypeTable` per segment column, rows = split examples.
    pin_memory: gather prototypes into page-locked memory when CUDA is available, except in a
    DataLoader worker process (whose batches the loader copies into shared memory anyway).
    """

    pad_token_id: int
    segments: list[list[str]]
    tables: dict[str, list[PrototypeTable]]
    pin_memory: bool = True

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [item["input_ids"] for item in items]
        batch: dict[str, Any] = {
            "input_ids": pad(input_ids, self.pad_token_id),
            "attention_mask": real_positions([len(ids) for ids in input_ids]).long(),
        }
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = pad([item["token_type_ids"] for item in items], 0)
        for name in items[0].keys() - set(PADDED_FIELDS):
            batch[name] = torch.tensor([item[name] for item in items])
        indices = batch["example_index"]
        pin = self.pin_memory and torch.cuda.is_available() and get_worker_info() is None
        batch["prototypes"] = {
            modality: gather_prototypes(tables, indices, pin)
            for modality, tables in self.tables.items()
        }
        batch["segments"] = [[texts[i] for i in indices.tolist()] for texts in self.segments]
        return batch
