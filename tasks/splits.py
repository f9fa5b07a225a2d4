"""The examples of one split, as read (:class:`TextSplit`) and as tokenised
(:class:`EncodedSplit`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset


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


class EncodedSplit(Dataset):
    """Tokenised examples of one split: one dict of python values per item, unpadded.

    columns: field name -> ``N`` values; ``input_ids`` (and ``token_type_ids``) hold lists of
    ints, every other field one scalar per example (``example_index``, ``labels``, ...).
    """

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: values[index] for name, values in self.columns.items()}

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.columns["input_ids"]]
