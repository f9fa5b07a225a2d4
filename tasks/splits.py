"""The examples of one split: raw (:class:`TextSplit`), the seeded ``data_fraction`` subset, and
tokenised (:class:`EncodedSplit`, what the loaders read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from tasks.token_cache import RaggedColumn


@dataclass
class TextSplit:
    """The raw examples of one split.

    name: the split's name (``train``, ``validation_matched``, ...).
    source: where it was read from (a file or a hub dataset), named in error messages.
    segments: one list of ``N`` texts per segment column (two for pair tasks).
    labels: ``N`` labels (int class indices or float scores), or None when the split is unlabelled.
    ids: ``N`` ids of the examples as the source gives them (GLUE's ``idx``), or None; written
        in prediction records, which otherwise use the example's position. The data module
        fills None with each example's position in its split (before ``data_fraction``), so
        every example read has an id (image features are keyed by it).
    """

    name: str
    source: str
    segments: list[list[str]]
    labels: list[int] | list[float] | None = None
    ids: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.segments[0])

    def subset(self, indices: list[int]) -> TextSplit:
        """The examples at ``indices``, in that order."""
        return TextSplit(
            self.name,
            self.source,
            [[texts[i] for i in indices] for texts in self.segments],
            None if self.labels is None else [self.labels[i] for i in indices],
            None if self.ids is None else [self.ids[i] for i in indices],
        )


def fraction_indices(size: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``fraction`` of ``size`` examples (at least one).

    Depends only on ``(size, fraction, seed)``, so every DDP rank, and ``prepare_data`` and
    ``setup``, pick the same subset.
    """
    if fraction >= 1.0:
        return list(range(size))
    count = max(1, round(size * fraction))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


class EncodedSplit(Dataset):
    """Tokenised examples of one split: one dict of values per item, unpadded.

    columns: field name -> ``N`` values; ``input_ids`` (and ``token_type_ids``) hold one
    sequence of ints per item (a list, or an array mapped from the token cache), every other
    field one scalar per example (``example_index``, ``labels``, ...).
    """

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: values[index] for name, values in self.columns.items()}

    def lengths(self) -> list[int]:
        input_ids = self.columns["input_ids"]
        if isinstance(input_ids, RaggedColumn):
            return input_ids.lengths()
        return [len(ids) for ids in input_ids]
