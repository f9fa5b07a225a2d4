"""Prototype tables: every segment's prototypes, computed once (SPEC section 8).

This module is the single way data modules obtain prototypes for a dataset:

* :func:`prototype_table` is build-or-read: it returns the :class:`PrototypeTable` of a text list,
  from the cache when a valid entry exists, otherwise extracting (batched, with a progress bar,
  under bf16/fp16 autocast on CUDA) and storing it first.
* :func:`build_prototype_cache` only builds (no table returned): call it from a data module's
  ``prepare_data`` (one process per node under DDP), then call :func:`prototype_table` in
  ``setup`` on every rank, which reads. If ``setup`` runs first anyway, a file lock makes one
  process build while the others wait, then read.
* :func:`verify_cache_file` reads a file in full against its checksum (``macsc prototypes
  --verify``).

Storage. Prototypes are stored in half precision unless asked otherwise (``dtype``: ``float16``,
``bfloat16``, ``float32`` or ``auto``, which is ``bfloat16`` where extraction ran under bf16
autocast and ``float16`` otherwise): at MNLI's size (~520k segments, k = 8, widths 512 + 1024 +
512) that is ~17 GB instead of ~34 GB. The model casts them to its compute dtype in the
enhancer's projection; float16 rounds to 11 significant bits, less than bf16 compute changes
(``tests/test_prototype_storage.py``). A float16 entry refuses prototypes beyond float16's range
(65504) instead of storing infinities.

Layout. One cache entry holds the prototypes of one text list's *distinct* texts, in order of
first appearance: a single file ``<kind>-<key>.protos`` with a 4096-byte header (magic line,
then JSON: format version, key, identity, shapes, dtypes, offsets, a BLAKE2b checksum of all the
data and one of a sample of its blocks) followed by the raw features ``(U, k, d)`` in the storage
dtype and the ``uint8`` mask ``(U, k)``. Readers memory-map it copy-on-write, so DDP workers on
one machine share its pages. The key is a SHA-256 over the extractor's
:meth:`~PrototypeExtractor.identity` (kind, weights hash or tag, every option, tokenizer), the
extraction precision, the storage dtype and the ordered distinct texts; one file per (extractor,
dataset split) keeps reads a plain slice, at the price of storing a text twice when it occurs in
two splits.

Robustness. Entries are written to a temporary file in the same folder and published with one
atomic ``os.replace``, under a file lock, so a build killed midway leaves no entry (only a
temporary file, deleted by the next build) and of two processes racing one builds while the
other waits and reads. The full checksum is computed once, from the written file, when the entry
is published. At every open a reader checks only what is cheap: magic, version, key, shapes, the
file size, and the checksum of :data:`SAMPLE_BLOCKS` blocks of :data:`SAMPLE_BLOCK_BYTES` (the
first, the last and others spread over the file; :func:`sampled_ranges`): ~1 MiB read, whatever
the file's size. Any mismatch (a truncated, extended, foreign or overwritten file, a bad header)
is reported as a warning and the entry is rebuilt, never read as data; a file smaller than the
sample is checked in full. What the sampled check cannot catch: damage confined to bytes outside
the sampled blocks (a flipped bit, a bad sector) of a large file -- one damaged byte of a 3 GB
file is caught with a probability of ~1 MiB / 3 GB. ``macsc prototypes --verify`` reads every
byte against the full checksum and reports such a file as damaged.

Folder: ``cache_dir`` argument, else ``$MACSC_CACHE``, else ``~/.cache/macsc``; ``cache_dir=False``
turns caching off, and trainable extractors are never cached (their prototypes change as they
train).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .base import PrototypeExtractor, Prototypes

FORMAT_VERSION = 2
#: what the ``dtype`` option accepts besides ``auto``, and the torch dtype each stores in
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: blocks whose checksum every open verifies, and their size in bytes
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 1 << 14
_MAGIC = b"MACSC-PROTOTYPES\n"
_HEADER_BYTES = 4096
_CHUNK = 1 << 24


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


def _checksum(path: Path, ranges: list[tuple[int, int]]) -> str:
    """BLAKE2b of the bytes of ``ranges`` (``(offset, length)``) of ``path``, in order."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for offset, length in ranges:
            handle.seek(offset)
            remaining = length
            while remaining:
                block = handle.read(min(_CHUNK, remaining))
                if not block:
                    break
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()


def _data_range(header: dict[str, Any]) -> list[tuple[int, int]]:
    return [(_HEADER_BYTES, header["size"] - _HEADER_BYTES)]


def _sample_ranges(size: int, seed: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the sampled blocks of a file of ``size`` bytes: every block of
    the data when it has at most :data:`SAMPLE_BLOCKS`, else the first, the last and a seeded
    random choice of the others, in file order."""
    count = -(-(size - _HEADER_BYTES) // SAMPLE_BLOCK_BYTES)
    if count <= SAMPLE_BLOCKS:
        chosen = range(count)
    else:
        middle = random.Random(seed).sample(range(1, count - 1), SAMPLE_BLOCKS - 2)
        chosen = sorted([0, *middle, count - 1])
    ranges = []
    for block in chosen:
        offset = _HEADER_BYTES + block * SAMPLE_BLOCK_BYTES
        ranges.append((offset, min(SAMPLE_BLOCK_BYTES, size - offset)))
    return ranges


def _layout(count: int, k: int, dim: int, dtype: str) -> dict[str, Any]:
    feature_bytes = count * k * dim * STORAGE_DTYPES[dtype].itemsize
    return {
        "features": {"dtype": dtype, "shape": [count, k, dim], "offset": _HEADER_BYTES},
        "mask": {"dtype": "uint8", "shape": [count, k], "offset": _HEADER_BYTES + feature_bytes},
        "size": _HEADER_BYTES + feature_bytes + count * k,
    }


def _mapped(path: Path, layout: dict[str, Any], mode: str) -> tuple[Tensor, Tensor]:
    """Tensors over the features and the mask of a cache file mapped in ``mode`` (numpy's
    ``r+`` writes through; ``c`` is copy-on-write: pages are shared between processes, and a
    write to a tensor stays private instead of reaching the file)."""
    shape = layout["features"]["shape"]
    dtype = STORAGE_DTYPES[layout["features"]["dtype"]]
    raw = np.memmap(
        path, np.uint8, mode, _HEADER_BYTES, (layout["mask"]["offset"] - _HEADER_BYTES,)
    )
    features = torch.from_numpy(raw).view(dtype).view(shape)
    mask = np.memmap(path, np.uint8, mode, layout["mask"]["offset"], tuple(shape[:2]))
    return features, torch.from_numpy(mask).view(torch.bool)


def _write_entry(
    path: Path,
    extractor: PrototypeExtractor,
    distinct: list[str],
    key: str,
    dtype: str,
    **extract_options: Any,
) -> None:
    """Extract into a temporary file beside ``path``, then publish it with one atomic rename."""
    layout = _layout(len(distinct), extractor.k, extractor.dim, dtype)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.truncate(layout["size"])
        features, mask = _mapped(temporary, layout, "r+")
        _extract_into(extractor, distinct, features, mask, **extract_options)
        del features, mask  # unmapped; the fsync below writes the pages out
        seed = int(key[:16], 16)
        header = {
            "format": FORMAT_VERSION,
            "key": key,
            "identity": extractor.identity(),
            "texts": len(distinct),
            **layout,
            "checksum": _checksum(temporary, _data_range(layout)),
            "sample": {
                "seed": seed,
                "blocks": SAMPLE_BLOCKS,
                "block_bytes": SAMPLE_BLOCK_BYTES,
                "checksum": _checksum(temporary, _sample_ranges(layout["size"], seed)),
            },
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
        header = json.loads(raw[len(_MAGIC) :].decode().strip())
    except ValueError as error:
        raise ValueError(f"its header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def _layout_problem(path: Path, header: dict[str, Any]) -> str | None:
    """Why the header's layout does not describe ``path`` (None when it does)."""
    try:
        count, k, dim = header["features"]["shape"]
        expected = _layout(count, k, dim, header["features"]["dtype"])
    except (KeyError, TypeError, ValueError):
        return "its header describes no valid layout"
    for part in ("features", "mask", "size"):
        if header.get(part) != expected[part]:
            return f"its header describes {part} {header.get(part)!r}, expected {expected[part]!r}"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"it has {size} bytes, expected {expected['size']} (truncated or partial)"
    return None


def sampled_ranges(path: str | os.PathLike) -> list[tuple[int, int]]:
    """``(offset, length)`` in bytes of the blocks of a cache file whose checksum every open
    verifies (module docstring); read from the file's header."""
    path = Path(path)
    header = _read_header(path)
    return _sample_ranges(header["size"], header["sample"]["seed"])


def _open_entry(
    path: Path, key: str, count: int, k: int, dim: int, dtype: str
) -> tuple[Tensor, Tensor] | str:
    """The memory-mapped ``features (U, k, d)`` and ``mask (U, k)``, or why they cannot be
    used. Checks what is cheap: header, size, key and the sampled blocks' checksum."""
    if not path.is_file():
        return "missing"
    try:
        header = _read_header(path)
    except (OSError, ValueError) as error:
        return str(error)
    expected = _layout(count, k, dim, dtype)
    for field, value in (
        ("format", FORMAT_VERSION),
        ("key", key),
        ("texts", count),
        ("features", expected["features"]),
    ):
        if header.get(field) != value:
            return f"its header has {field}={header.get(field)!r}, expected {value!r}"
    problem = _layout_problem(path, header)
    if problem is not None:
        return problem
    sample = header.get("sample")
    if not isinstance(sample, dict) or not isinstance(sample.get("seed"), int):
        return "its header has no valid sample description"
    ranges = _sample_ranges(expected["size"], sample["seed"])
    if _checksum(path, ranges) != sample.get("checksum"):
        return "its data does not match the checksum of its sampled blocks (corrupt)"
    return _mapped(path, expected, "c")


@dataclass(frozen=True)
class CacheFileCheck:
    """The outcome of :func:`verify_cache_file`.

    status: ``ok``, ``damaged`` (it would be rebuilt if its damage is seen at open, and must not
    be used otherwise), or ``stale`` (written by another cache format; no longer read).
    reason: why, when not ok. texts, nbytes: what the header says it holds, when readable.
    """

    path: Path
    status: str
    reason: str = ""
    texts: int | None = None
    nbytes: int | None = None


def verify_cache_file(path: str | os.PathLike) -> CacheFileCheck:
    """Read every byte of a cache file against the full checksum in its header (about a second
    per GB): what the check at open, which reads only sampled blocks, cannot promise."""
    path = Path(path)
    try:
        header = _read_header(path)
    except (OSError, ValueError) as error:
        return CacheFileCheck(path, "damaged", str(error))
    texts, size = header.get("texts"), header.get("size")
    if header.get("format") != FORMAT_VERSION:
        reason = (
            f"written by cache format {header.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}; it is no longer used and can be deleted"
        )
        return CacheFileCheck(path, "stale", reason, texts, size)
    problem = _layout_problem(path, header)
    if problem is None and _checksum(path, _data_range(header)) != header.get("checksum"):
        problem = "its data does not match the checksum in its header (corrupt)"
    if problem is not None:
        return CacheFileCheck(path, "damaged", problem, texts, size)
    return CacheFileCheck(path, "ok", "", texts, size)


def cache_files(folder: str | os.PathLike) -> list[Path]:
    """The published cache files in ``folder`` (no lock or temporary files), sorted."""
    return sorted(p for p in Path(folder).glob("*.protos") if p.is_file())


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
    entry = _open_entry(path, *shape)
    if isinstance(entry, tuple):
        return (*entry, path, False)
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
            return (*entry, path, False)
        if exclusive:
            _remove_stale_temporaries(path)
        if entry != "missing":
            warnings.warn(
                f"prototype cache file {str(path)!r} is unusable ({entry}); rebuilding it",
                stacklevel=3,
            )
        _write_entry(path, extractor, texts.distinct, key, dtype, device=device, **extract_options)
        entry = _open_entry(path, *shape)
    if not isinstance(entry, tuple):
        raise RuntimeError(
            f"prototype cache file {str(path)!r} is unusable right after writing: {entry}"
        )
    return (*entry, path, True)


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
