"""Batches: padding the tokens and gathering each example's prototypes from the tables.

A batch is a dict, padded to the longest sequence in the batch:

- ``input_ids`` ``(B, l)`` long, ``attention_mask`` ``(B, l)`` long, ``token_type_ids``
  ``(B, l)`` long when the tokenizer makes them;
- ``labels`` ``(B,)``, long for classification, float for regression; absent for an unlabelled
  split;
- ``example_index`` ``(B,)`` long, the position of each example in its split (after
  ``data_fraction``), so predictions can be written back in order;
- ``prototypes``: ``{modality: {"features": (B, n_seg * k, d_m), "mask": (B, n_seg * k)
  bool}}`` for every cacheable extractor, features in the cache's storage dtype
  (``prototype_dtype``); the segments' prototypes are concatenated along the token axis in
  segment order (SPEC 1.7); for an ``image_features`` source, ``(B, n_images, d_m)``: the
  stored features of each example, looked up by its id (SPEC 14);
- ``segments``: ``n_seg`` lists of ``B`` raw texts, for extractors that are trained (those have
  no entry in ``prototypes``; the model extracts from the texts).
"""

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
