"""Prototype tables: every segment's prototypes, computed once (SPEC section 8).

This module is the single way data modules obtain prototypes for a dataset:

* :func:`prototype_table` is build-or-read: it returns the :class:`PrototypeTable` of a text list,
  from the cache when a valid entry exists, otherwise extracting (batched, with a progress bar,
  under bf16/fp16 autocast on CUDA) and storing it first.
* :func:`build_prototype_cache` only builds (no table returned): call it from a data module's
  ``prepare_data`` (one process per node under DDP), then call :func:`prototype_table` in
  ``setup`` on every rank, which reads. If ``setup`` runs first anyway, a file lock makes one
  process build while the others wait, then read.

Layout. One cache entry holds the prototypes of one text list's *distinct* texts, in order of
first appearance: a single file ``<kind>-<key>.protos`` with a 4096-byte header (magic line,
then JSON: format version, key, identity, shapes, dtypes, offsets and a BLAKE2b checksum of the
data) followed by the raw ``float32`` features ``(U, k, d)`` and ``uint8`` mask ``(U, k)``.
Readers memory-map it copy-on-write, so DDP workers on one machine share its pages. The key is a
SHA-256 over the extractor's :meth:`~PrototypeExtractor.identity` (kind, weights hash or tag,
every option, tokenizer), the compute precision and the ordered distinct texts; one file per
(extractor, dataset split) keeps reads a plain slice, at the price of storing a text twice when
it occurs in two splits.

Robustness. Entries are written to a temporary file in the same folder and published with one
atomic ``os.replace``, under a file lock, so a build killed midway leaves no entry (only a
temporary file, deleted by the next build) and of two processes racing one builds while the
other waits and reads. A reader checks magic, version, key, shapes, the file size and the
checksum (at every open: about a second per GB) before using a byte; any mismatch (a truncated,
partial or corrupt file) is reported as a warning and the entry is rebuilt, never read as data.

Folder: ``cache_dir`` argument, else ``$MACSC_CACHE``, else ``~/.cache/macsc``; ``cache_dir=False``
turns caching off, and trainable extractors are never cached (their prototypes change as they
train).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .base import PrototypeExtractor, Prototypes

FORMAT_VERSION = 1
_MAGIC = b"MACSC-PROTOTYPES\n"
_HEADER_BYTES = 4096
_CHUNK = 1 << 24


@dataclass
class PrototypeTable:
    """Prototypes of a list of texts, deduplicated.

    features: ``(U, k, d)``, mask: ``(U, k)`` for the U distinct texts; rows: ``(N,)`` long, the
    row of ``features`` that holds the i-th text given to :func:`prototype_table`. ``path`` is
    the cache file the features are memory-mapped from (None when computed in memory).
    """

    features: Tensor
    mask: Tensor
    rows: Tensor
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.rows.numel())

    def lookup(self, indices: Tensor | list[int]) -> Prototypes:
        """Prototypes of the texts at ``indices`` (positions in the original list)."""
        rows = self.rows[torch.as_tensor(indices, dtype=torch.long)]
        return Prototypes(self.features[rows], self.mask[rows])


def resolve_cache_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """The cache folder: the argument, else ``$MACSC_CACHE``, else ``~/.cache/macsc``; None if
    ``cache_dir`` is False."""
    if cache_dir is False:
        return None
    if cache_dir is True or cache_dir is None:
        return Path(os.environ.get("MACSC_CACHE") or Path.home() / ".cache" / "macsc").expanduser()
    return Path(cache_dir).expanduser()


def _distinct(texts: list[str]) -> tuple[list[str], Tensor]:
    unique: dict[str, int] = {}
    rows = torch.tensor([unique.setdefault(t, len(unique)) for t in texts], dtype=torch.long)
    return list(unique), rows


def _compute_device(
    extractor: PrototypeExtractor, device: str | torch.device | None
) -> torch.device:
    return torch.device(device) if device is not None else extractor.device


def _precision(device: torch.device) -> str:
    """Autocast precision of extraction: bf16 (or fp16 where bf16 is missing) on CUDA."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cache_key(extractor: PrototypeExtractor, distinct: list[str], precision: str) -> str:
    """SHA-256 over everything that changes a prototype, and the ordered distinct texts."""
    digest = hashlib.sha256()
    described = {"format": FORMAT_VERSION, "identity": extractor.identity(), "precision": precision}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for text in distinct:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _extract_into(
    extractor: PrototypeExtractor,
    distinct: list[str],
    features: np.ndarray | Tensor,
    mask: np.ndarray | Tensor,
    *,
    batch_size: int,
    progress: bool,
    description: str,
    device: torch.device,
) -> None:
    """Fill ``features (U, k, d)`` and ``mask (U, k)`` batch by batch."""
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
                stop = start + len(batch)
                values = out.features.detach().float().cpu()
                flags = out.mask.detach().cpu()
                if isinstance(features, np.ndarray):
                    features[start:stop] = values.numpy()
                    mask[start:stop] = flags.numpy()
                else:
                    features[start:stop] = values
                    mask[start:stop] = flags
                bar.update(len(batch))
    finally:
        extractor.to(original)


def _checksum(path: Path, offset: int, length: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining:
            block = handle.read(min(_CHUNK, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def _layout(count: int, k: int, dim: int) -> dict[str, Any]:
    feature_bytes = count * k * dim * 4
    return {
        "features": {"dtype": "float32", "shape": [count, k, dim], "offset": _HEADER_BYTES},
        "mask": {"dtype": "uint8", "shape": [count, k], "offset": _HEADER_BYTES + feature_bytes},
        "size": _HEADER_BYTES + feature_bytes + count * k,
    }


def _write_entry(
    path: Path,
    extractor: PrototypeExtractor,
    distinct: list[str],
    key: str,
    **extract_options: Any,
) -> None:
    """Extract into a temporary file beside ``path``, then publish it with one atomic rename."""
    layout = _layout(len(distinct), extractor.k, extractor.dim)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.truncate(layout["size"])
        features = np.memmap(
            temporary,
            np.float32,
            "r+",
            layout["features"]["offset"],
            tuple(layout["features"]["shape"]),
        )
        mask = np.memmap(
            temporary, np.uint8, "r+", layout["mask"]["offset"], tuple(layout["mask"]["shape"])
        )
        _extract_into(extractor, distinct, features, mask, **extract_options)
        features.flush()
        mask.flush()
        del features, mask
        header = {
            "format": FORMAT_VERSION,
            "key": key,
            "identity": extractor.identity(),
            "texts": len(distinct),
            **layout,
            "checksum": _checksum(temporary, _HEADER_BYTES, layout["size"] - _HEADER_BYTES),
        }
        encoded = _MAGIC + json.dumps(header, sort_keys=True, default=str).encode()
        if len(encoded) > _HEADER_BYTES:  # the identity is there for people only; the key decides
            header["identity"] = "(too long to store)"
            encoded = _MAGIC + json.dumps(header, sort_keys=True, default=str).encode()
        with open(temporary, "r+b") as handle:
            handle.write(encoded.ljust(_HEADER_BYTES, b" "))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        raw = handle.read(_HEADER_BYTES)
    if not raw.startswith(_MAGIC):
        raise ValueError("it does not start with the prototype-cache magic line")
    try:
        return json.loads(raw[len(_MAGIC) :].decode().strip())
    except ValueError as error:
        raise ValueError(f"its header is not valid JSON ({error})") from error


def _open_entry(path: Path, key: str, count: int, k: int, dim: int) -> tuple[Tensor, Tensor] | str:
    """The memory-mapped ``features (U, k, d)`` and ``mask (U, k)``, or why they cannot be used."""
    if not path.is_file():
        return "missing"
    try:
        header = _read_header(path)
    except (OSError, ValueError) as error:
        return str(error)
    expected = _layout(count, k, dim)
    for field, value in (("format", FORMAT_VERSION), ("key", key), ("texts", count)):
        if header.get(field) != value:
            return f"its header has {field}={header.get(field)!r}, expected {value!r}"
    for part in ("features", "mask", "size"):
        if header.get(part) != expected[part]:
            return f"its header describes {part} {header.get(part)!r}, expected {expected[part]!r}"
    stat = path.stat()
    if stat.st_size != expected["size"]:
        return f"it has {stat.st_size} bytes, expected {expected['size']} (truncated or partial)"
    if _checksum(path, _HEADER_BYTES, stat.st_size - _HEADER_BYTES) != header.get("checksum"):
        return "its data does not match the checksum in its header (corrupt)"
    # Copy-on-write mapping: pages are shared between processes, and a write to the tensor
    # stays private instead of reaching the file.
    features = np.memmap(path, np.float32, "c", _HEADER_BYTES, (count, k, dim))
    mask = np.memmap(path, np.uint8, "c", expected["mask"]["offset"], (count, k))
    return torch.from_numpy(features), torch.from_numpy(mask).view(torch.bool)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """An exclusive lock beside ``path``; yields whether it is really held (it is a no-op where
    ``fcntl`` does not exist). The kernel releases it when its holder dies, even by SIGKILL."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what builds of ``path`` killed midway left behind. Only called under the entry's
    lock: every writer holds it, so any temporary file of this entry is a dead build's."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _cached_entry(
    extractor: PrototypeExtractor,
    distinct: list[str],
    folder: Path,
    device: torch.device,
    **extract_options: Any,
) -> tuple[Tensor, Tensor, Path]:
    """The entry of ``distinct`` in ``folder``, built first if missing or unusable."""
    key = cache_key(extractor, distinct, _precision(device))
    path = folder / f"{extractor.kind}-{key[:32]}.protos"
    shape = (key, len(distinct), extractor.k, extractor.dim)
    entry = _open_entry(path, *shape)
    if isinstance(entry, tuple):
        return (*entry, path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the prototype cache folder {str(folder)!r} ({error}); set MACSC_CACHE "
            "or the cache_dir option to a writable folder, or turn the cache off (cache_dir=False)"
        ) from error
    with _locked(path) as exclusive:
        entry = _open_entry(path, *shape)  # another process may have built it while we waited
        if isinstance(entry, tuple):
            return (*entry, path)
        if exclusive:
            _remove_stale_temporaries(path)
        if entry != "missing":
            warnings.warn(
                f"prototype cache file {str(path)!r} is unusable ({entry}); rebuilding it",
                stacklevel=3,
            )
        _write_entry(path, extractor, distinct, key, device=device, **extract_options)
        entry = _open_entry(path, *shape)
    if not isinstance(entry, tuple):
        raise RuntimeError(
            f"prototype cache file {str(path)!r} is unusable right after writing: {entry}"
        )
    return (*entry, path)


def prototype_table(
    extractor: PrototypeExtractor,
    texts: list[str],
    batch_size: int = 64,
    progress: bool = True,
    description: str = "prototypes",
    *,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
) -> PrototypeTable:
    """Prototypes of ``texts``, each distinct text extracted once, read from or stored in the
    cache.

    batch_size: texts per :meth:`~PrototypeExtractor.extract` call. device: where to extract
    (default: where the extractor's weights are; the extractor is moved back afterwards).
    cache_dir: folder, None for ``$MACSC_CACHE`` or ``~/.cache/macsc``, False for no cache.
    Features come back as CPU ``float32`` (memory-mapped when cached), mask as CPU bool.
    """
    if batch_size < 1:
        raise ConfigError(f"prototype batch_size must be >= 1, got {batch_size}")
    distinct, rows = _distinct(list(texts))
    target = _compute_device(extractor, device)
    options = {"batch_size": batch_size, "progress": progress, "description": description}
    folder = resolve_cache_dir(cache_dir) if extractor.cacheable and distinct else None
    if folder is None:
        features = torch.empty(len(distinct), extractor.k, extractor.dim)
        mask = torch.zeros(len(distinct), extractor.k, dtype=torch.bool)
        _extract_into(extractor, distinct, features, mask, device=target, **options)
        return PrototypeTable(features, mask, rows)
    features, mask, path = _cached_entry(extractor, distinct, folder, target, **options)
    return PrototypeTable(features, mask, rows, path)


def build_prototype_cache(
    extractor: PrototypeExtractor,
    texts: list[str],
    batch_size: int = 64,
    progress: bool = True,
    description: str = "prototypes",
    *,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
) -> Path | None:
    """Make sure the cache holds the prototypes of ``texts`` (for ``prepare_data``); returns the
    entry's path, or None when this extractor or ``cache_dir=False`` does not cache."""
    folder = resolve_cache_dir(cache_dir) if extractor.cacheable else None
    if folder is None:
        return None
    table = prototype_table(
        extractor, texts, batch_size, progress, description, cache_dir=folder, device=device
    )
    return table.path
