"""Prototype tables: every segment's prototypes, computed once (SPEC section 8).

This module is the single way data modules obtain prototypes for a dataset:

* :func:`prototype_table` is build-or-read: it returns the :class:`PrototypeTable` of a text list,
  from the cache when a valid entry exists, otherwise extracting (batched, with a progress bar,
  under bf16/fp16 autocast on CUDA) and storing it first.
* :func:`build_prototype_cache` only builds (no table returned): call it from a data module's
  ``prepare_data`` (one process per node under DDP), then call :func:`prototype_table` in
  ``setup`` on every rank, which reads. If ``setup`` runs first anyway, a file lock makes one
  process build while the others wait, then read.

Storage. Prototypes are stored in half precision unless asked otherwise (``dtype``: ``float16``,
``bfloat16``, ``float32`` or ``auto``, which is ``bfloat16`` where extraction ran under bf16
autocast and ``float16`` otherwise): at MNLI's size (~520k segments, k = 8, widths 512 + 1024 +
512) that is ~17 GB instead of ~34 GB. The model casts them to its compute dtype in the
enhancer's projection; float16 rounds to 11 significant bits, less than bf16 compute changes
(``tests/prototypes/test_storage.py``). A float16 entry refuses prototypes beyond float16's range
(65504) instead of storing infinities.

The file format (layout, checksums, atomic publication, locking) is
:mod:`macsc.prototypes.cache_files`.

Folder: ``cache_dir`` argument, else ``$MACSC_CACHE``, else ``~/.cache/macsc``; ``cache_dir=False``
turns caching off, and trainable extractors are never cached (their prototypes change as they
train).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from macsc.errors import ConfigError, DataError
from macsc.prototypes.base import PrototypeExtractor, Prototypes
from macsc.prototypes.cache_files import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    open_entry,
    open_or_build,
    write_entry,
)


@dataclass
class PrototypeTable:
    """Prototypes of a list of texts, deduplicated.

    features: ``(U, k, d)`` in the storage dtype (float16 unless asked otherwise), mask:
    ``(U, k)`` bool, for the U distinct texts; rows: ``(N,)`` long, the row of ``features`` that
    holds the i-th text given to :func:`prototype_table`. ``path`` is the cache file the
    features are memory-mapped from (None when computed in memory). ``built``: extracted by the
    call that made this table (a cache miss), not read from the cache.
    """

    features: Tensor
    mask: Tensor
    rows: Tensor
    path: Path | None = None
    built: bool = False

    def __len__(self) -> int:
        return int(self.rows.numel())

    def lookup(self, indices: Tensor | list[int]) -> Prototypes:
        """Prototypes of the texts at ``indices`` (positions in the original list)."""
        rows = self.rows[torch.as_tensor(indices, dtype=torch.long)]
        return Prototypes(self.features[rows], self.mask[rows])


@dataclass(frozen=True)
class IndexedTexts:
    """A text list deduplicated once, to be shared by every extractor that reads it.

    distinct: the distinct texts in order of first appearance; rows: ``(N,)`` long, the distinct
    row of each text; digest: SHA-256 of the ordered distinct texts (part of the cache key).
    """

    distinct: list[str]
    rows: Tensor
    digest: str


def index_texts(texts: list[str]) -> IndexedTexts:
    """Deduplicate ``texts`` and digest the distinct ones (~0.3 s for 400k short texts)."""
    unique: dict[str, int] = {}
    rows = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), np.int64, len(texts))
    distinct = list(unique)
    digest = hashlib.sha256()
    # the lengths make the concatenation unambiguous
    digest.update(np.fromiter(map(len, distinct), np.int64, len(distinct)).tobytes())
    digest.update("".join(distinct).encode("utf-8", "surrogatepass"))
    return IndexedTexts(distinct, torch.from_numpy(rows), digest.hexdigest())


def resolve_cache_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """The cache folder: the argument, else ``$MACSC_CACHE``, else ``~/.cache/macsc``; None if
    ``cache_dir`` is False."""
    if cache_dir is False:
        return None
    if cache_dir is True or cache_dir is None:
        return Path(os.environ.get("MACSC_CACHE") or Path.home() / ".cache" / "macsc").expanduser()
    return Path(cache_dir).expanduser()


def _compute_device(
    extractor: PrototypeExtractor, device: str | torch.device | None
) -> torch.device:
    return torch.device(device) if device is not None else extractor.device


def _precision(device: torch.device) -> str:
    """Autocast precision of extraction: bf16 (or fp16 where bf16 is missing) on CUDA."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_storage_dtype(option: str) -> str:
    """``option`` if it names a storage dtype (or ``auto``), else a ConfigError."""
    if option != "auto" and option not in STORAGE_DTYPES:
        raise ConfigError(
            f"data option prototype_dtype={option!r} is unknown; choose one of "
            f"{['auto', *STORAGE_DTYPES]} (auto: bfloat16 where extraction runs in bf16, "
            "else float16; float32 keeps full precision at twice the size)"
        )
    return option


def storage_dtype(option: str, precision: str) -> str:
    """The dtype an entry stores: ``option``, or for ``auto`` bf16 where extraction ran in bf16
    (its values already have bf16's precision) and float16 (more precise, less range) else."""
    if check_storage_dtype(option) != "auto":
        return option
    return "bfloat16" if precision == "bf16" else "float16"


def cache_key(extractor: PrototypeExtractor, digest: str, precision: str, dtype: str) -> str:
    """SHA-256 over everything that changes a stored prototype and the texts' ``digest``."""
    described = {
        "format": FORMAT_VERSION,
        "identity": extractor.identity(),
        "precision": precision,
        "dtype": dtype,
        "texts": digest,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _extract_into(
    extractor: PrototypeExtractor,
    distinct: list[str],
    features: Tensor,
    mask: Tensor,
    *,
    batch_size: int,
    progress: bool,
    description: str,
    device: torch.device,
) -> None:
    """Fill ``features (U, k, d)`` (in their dtype) and ``mask (U, k)`` batch by batch."""
    from tqdm.auto import tqdm

    precision = _precision(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision != "fp32"
        else contextlib.nullcontext()
    )
    original = extractor.device
    extractor.to(device)
    try:
        with tqdm(
            total=len(distinct), desc=description, unit="text", disable=not progress, leave=False
        ) as bar:
            for start in range(0, len(distinct), batch_size):
                batch = distinct[start : start + batch_size]
                with autocast:
                    out = extractor.extract(batch)
                values = out.features.detach()
                if features.dtype == torch.float16:
                    _check_float16_range(extractor, values)
                stop = start + len(batch)
                features[start:stop] = values.to(features.dtype).cpu()
                mask[start:stop] = out.mask.detach().cpu()
                bar.update(len(batch))
    finally:
        extractor.to(original)


def _check_float16_range(extractor: PrototypeExtractor, values: Tensor) -> None:
    """A DataError if some of ``values`` would round to infinity in float16 (|x| >= 65520)."""
    if not values.numel():
        return
    low, high = torch.aminmax(values.float())
    largest = max(-float(low), float(high))
    if largest >= 65520:
        raise DataError(
            f"{extractor.kind} prototypes reach |x| = {largest:.4g}, beyond float16's range "
            "(65504); set the data option prototype_dtype: bfloat16 (or float32)"
        )


def _cached_entry(
    extractor: PrototypeExtractor,
    texts: IndexedTexts,
    folder: Path,
    device: torch.device,
    dtype: str,
    **extract_options: Any,
) -> tuple[Tensor, Tensor, Path, bool]:
    """The entry of ``texts`` in ``folder``, built first if missing or unusable; the last
    value says whether it was built by this call."""
    key = cache_key(extractor, texts.digest, _precision(device), dtype)
    path = folder / f"{extractor.kind}-{key[:32]}.protos"
    shape = (key, len(texts.distinct), extractor.k, extractor.dim, dtype)
    (features, mask), built = open_or_build(
        path,
        lambda: open_entry(path, *shape),
        lambda: write_entry(
            path,
            (len(texts.distinct), extractor.k, extractor.dim),
            dtype,
            key,
            extractor.identity(),
            lambda features, mask: _extract_into(
                extractor, texts.distinct, features, mask, device=device, **extract_options
            ),
        ),
        "prototype cache",
    )
    return features, mask, path, built


def prototype_table(
    extractor: PrototypeExtractor,
    texts: list[str] | IndexedTexts,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "prototypes",
    *,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
    dtype: str = "auto",
) -> PrototypeTable:
    """Prototypes of ``texts``, each distinct text extracted once, read from or stored in the
    cache.

    texts: a list, or :func:`index_texts` of it (to deduplicate a list once for several
    extractors). batch_size: texts per :meth:`~PrototypeExtractor.extract` call. device: where to
    extract (default: where the extractor's weights are; the extractor is moved back afterwards).
    cache_dir: folder, None for ``$MACSC_CACHE`` or ``~/.cache/macsc``, False for no cache.
    dtype: the storage dtype (module docstring), the same with the cache or without it.
    Features come back as CPU tensors of that dtype (memory-mapped when cached), mask as CPU bool.
    """
    if batch_size < 1:
        raise ConfigError(f"prototype batch_size must be >= 1, got {batch_size}")
    indexed = texts if isinstance(texts, IndexedTexts) else index_texts(list(texts))
    target = _compute_device(extractor, device)
    stored = storage_dtype(dtype, _precision(target))
    options = {"batch_size": batch_size, "progress": progress, "description": description}
    folder = resolve_cache_dir(cache_dir) if extractor.cacheable and indexed.distinct else None
    if folder is None:
        count = len(indexed.distinct)
        features = torch.empty(count, extractor.k, extractor.dim, dtype=STORAGE_DTYPES[stored])
        mask = torch.zeros(count, extractor.k, dtype=torch.bool)
        _extract_into(extractor, indexed.distinct, features, mask, device=target, **options)
        return PrototypeTable(features, mask, indexed.rows, built=True)
    features, mask, path, built = _cached_entry(
        extractor, indexed, folder, target, stored, **options
    )
    return PrototypeTable(features, mask, indexed.rows, path, built)


def build_prototype_cache(
    extractor: PrototypeExtractor,
    texts: list[str] | IndexedTexts,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "prototypes",
    *,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
    dtype: str = "auto",
) -> Path | None:
    """Make sure the cache holds the prototypes of ``texts`` (for ``prepare_data``); returns the
    entry's path, or None when this extractor or ``cache_dir=False`` does not cache."""
    folder = resolve_cache_dir(cache_dir) if extractor.cacheable else None
    if folder is None:
        return None
    table = prototype_table(
        extractor,
        texts,
        batch_size,
        progress,
        description,
        cache_dir=folder,
        device=device,
        dtype=dtype,
    )
    return table.path
