"""Prototype tables: every segment's prototypes, computed once (SPEC section 8).

This module is the single way data modules obtain prototypes for a dataset. The on-disk,
memory-mapped cache plugs in here; callers only see :class:`PrototypeTable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PrototypeExtractor, Prototypes


@dataclass
class PrototypeTable:
    """Prototypes of a list of texts, deduplicated.

    features: ``(U, k, d)``, mask: ``(U, k)`` for the U distinct texts; rows: ``(N,)`` long, the
    row of ``features`` that holds the i-th text given to :func:`prototype_table`.
    """

    features: Tensor
    mask: Tensor
    rows: Tensor

    def __len__(self) -> int:
        return int(self.rows.numel())

    def lookup(self, indices: Tensor | list[int]) -> Prototypes:
        """Prototypes of the texts at ``indices`` (positions in the original list)."""
        rows = self.rows[torch.as_tensor(indices, dtype=torch.long)]
        return Prototypes(self.features[rows], self.mask[rows])


def prototype_table(
    extractor: PrototypeExtractor,
    texts: list[str],
    batch_size: int = 64,
    progress: bool = True,
    description: str = "prototypes",
) -> PrototypeTable:
    """Extract the prototypes of ``texts`` once per distinct text, in batches."""
    unique: dict[str, int] = {}
    rows = torch.tensor([unique.setdefault(t, len(unique)) for t in texts], dtype=torch.long)
    distinct = list(unique)
    features = torch.empty(len(distinct), extractor.k, extractor.dim)
    mask = torch.zeros(len(distinct), extractor.k, dtype=torch.bool)
    starts = range(0, len(distinct), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=description, unit="batch", leave=False)
    for start in starts:
        out = extractor.extract(distinct[start : start + batch_size])
        features[start : start + len(out.features)] = out.features.float().cpu()
        mask[start : start + len(out.features)] = out.mask.cpu()
    return PrototypeTable(features, mask, rows)
