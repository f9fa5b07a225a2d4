"""The on-disk format of a prototype cache entry (SPEC 8): one file per entry, memory-mapped by
its readers, published atomically, checked cheaply at every open and in full on demand
(:func:`verify_cache_file`, ``macsc prototypes --verify``).

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

The header size, the checksums (:func:`checksum`, :func:`sample_block_ranges`), the lock and the
clean-up of dead builds' temporaries are shared with the token cache (:mod:`tasks.token_cache`),
whose files live in the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from macsc.errors import ConfigError

FORMAT_VERSION = 2


#: what the ``dtype`` option accepts besides ``auto``, and the torch dtype each stores in
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


#: blocks whose checksum every open verifies, and their size in bytes
SAMPLE_BLOCKS = 64


SAMPLE_BLOCK_BYTES = 1 << 14


_MAGIC = b"MACSC-PROTOTYPES\n"


HEADER_BYTES = 4096


_CHUNK = 1 << 24

Entry = TypeVar("Entry")


def checksum(path: Path, ranges: list[tuple[int, int]]) -> str:
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
    return [(HEADER_BYTES, header["size"] - HEADER_BYTES)]


def sample_block_ranges(size: int, seed: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the sampled blocks of a file of ``size`` bytes: every block of
    the data when it has at most :data:`SAMPLE_BLOCKS`, else the first, the last and a seeded
    random choice of the others, in file order."""
    count = -(-(size - HEADER_BYTES) // SAMPLE_BLOCK_BYTES)
    if count <= SAMPLE_BLOCKS:
        chosen = range(count)
    else:
        middle = random.Random(seed).sample(range(1, count - 1), SAMPLE_BLOCKS - 2)
        chosen = sorted([0, *middle, count - 1])
    ranges = []
    for block in chosen:
        offset = HEADER_BYTES + block * SAMPLE_BLOCK_BYTES
        ranges.append((offset, min(SAMPLE_BLOCK_BYTES, size - offset)))
    return ranges


def _layout(count: int, k: int, dim: int, dtype: str) -> dict[str, Any]:
    feature_bytes = count * k * dim * STORAGE_DTYPES[dtype].itemsize
    return {
        "features": {"dtype": dtype, "shape": [count, k, dim], "offset": HEADER_BYTES},
        "mask": {"dtype": "uint8", "shape": [count, k], "offset": HEADER_BYTES + feature_bytes},
        "size": HEADER_BYTES + feature_bytes + count * k,
    }


def _mapped(path: Path, layout: dict[str, Any], mode: str) -> tuple[Tensor, Tensor]:
    """Tensors over the features and the mask of a cache file mapped in ``mode`` (numpy's
    ``r+`` writes through; ``c`` is copy-on-write: pages are shared between processes, and a
    write to a tensor stays private instead of reaching the file)."""
    shape = layout["features"]["shape"]
    dtype = STORAGE_DTYPES[layout["features"]["dtype"]]
    raw = np.memmap(path, np.uint8, mode, HEADER_BYTES, (layout["mask"]["offset"] - HEADER_BYTES,))
    features = torch.from_numpy(raw).view(dtype).view(shape)
    mask = np.memmap(path, np.uint8, mode, layout["mask"]["offset"], tuple(shape[:2]))
    return features, torch.from_numpy(mask).view(torch.bool)


def write_entry(
    path: Path,
    shape: tuple[int, int, int],
    dtype: str,
    key: str,
    identity: Any,
    fill: Callable[[Tensor, Tensor], None],
) -> None:
    """Write an entry of ``features`` ``shape`` ``(U, k, d)`` in ``dtype`` (and its mask) to a
    temporary file beside ``path``, filled in place by ``fill(features, mask)``, then publish it
    with one atomic rename. ``identity`` is stored in the header for people to read."""
    layout = _layout(*shape, dtype)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.truncate(layout["size"])
        features, mask = _mapped(temporary, layout, "r+")
        fill(features, mask)
        del features, mask  # unmapped; the fsync below writes the pages out
        header = {"format": FORMAT_VERSION, "key": key, "identity": identity, "texts": shape[0]}
        seal(temporary, path, _MAGIC, {**header, **layout})
    finally:
        temporary.unlink(missing_ok=True)


def seal(
    temporary: Path,
    path: Path,
    magic: bytes,
    header: dict[str, Any],
) -> None:
    """Publish a cache file written to ``temporary``: its header (``header``, which holds
    ``key``, ``identity`` and ``size``, with the full checksum of all after the header and the
    sampled blocks' checksum added) written after ``magic`` into its first
    :data:`HEADER_BYTES`, the file synced, then renamed to ``path`` in one atomic step. Shared by
    the prototype cache and the token cache (:mod:`tasks.token_cache`)."""
    seed = int(header["key"][:16], 16)
    header = {
        **header,
        "checksum": checksum(temporary, _data_range(header)),
        "sample": {
            "seed": seed,
            "blocks": SAMPLE_BLOCKS,
            "block_bytes": SAMPLE_BLOCK_BYTES,
            "checksum": checksum(temporary, sample_block_ranges(header["size"], seed)),
        },
    }
    encoded = magic + json.dumps(header, sort_keys=True, default=str).encode()
    if len(encoded) > HEADER_BYTES:  # the identity is there for people only; the key decides
        header["identity"] = "(too long to store)"
        encoded = magic + json.dumps(header, sort_keys=True, default=str).encode()
    if len(encoded) > HEADER_BYTES:  # it would overwrite the data that follows
        raise ValueError(f"the header of {path.name} is over {HEADER_BYTES} bytes")
    with open(temporary, "r+b") as handle:
        handle.write(encoded.ljust(HEADER_BYTES, b" "))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_header(path: Path, magic: bytes = _MAGIC, kind: str = "prototype-cache") -> dict[str, Any]:
    """The JSON header of a cache file that starts with ``magic``; a ValueError saying what is
    wrong otherwise (``kind`` names the cache in it)."""
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if not raw.startswith(magic):
        raise ValueError(f"it does not start with the {kind} magic line")
    try:
        header = json.loads(raw[len(magic) :].decode().strip())
    except ValueError as error:
        raise ValueError(f"its header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def sample_problem(path: Path, header: dict[str, Any]) -> str | None:
    """Why the blocks the header samples do not match their checksum (None when they do): the
    check every open makes, whatever the cache."""
    sample = header.get("sample")
    if not isinstance(sample, dict) or not isinstance(sample.get("seed"), int):
        return "its header has no valid sample description"
    if checksum(path, sample_block_ranges(header["size"], sample["seed"])) != sample.get(
        "checksum"
    ):
        return "its data does not match the checksum of its sampled blocks (corrupt)"
    return None


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
    header = read_header(path)
    return sample_block_ranges(header["size"], header["sample"]["seed"])


def open_entry(
    path: Path, key: str, count: int, k: int, dim: int, dtype: str
) -> tuple[Tensor, Tensor] | str:
    """The memory-mapped ``features (U, k, d)`` and ``mask (U, k)``, or why they cannot be
    used. Checks what is cheap: header, size, key and the sampled blocks' checksum."""
    if not path.is_file():
        return "missing"
    try:
        header = read_header(path)
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
    problem = sample_problem(path, header)
    if problem is not None:
        return problem
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
        header = read_header(path)
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
    if problem is None and checksum(path, _data_range(header)) != header.get("checksum"):
        problem = "its data does not match the checksum in its header (corrupt)"
    if problem is not None:
        return CacheFileCheck(path, "damaged", problem, texts, size)
    return CacheFileCheck(path, "ok", "", texts, size)


def cache_files(folder: str | os.PathLike) -> list[Path]:
    """The published cache files in ``folder`` (no lock or temporary files), sorted."""
    return sorted(p for p in Path(folder).glob("*.protos") if p.is_file())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[bool]:
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


def remove_stale_temporaries(path: Path) -> None:
    """Delete what builds of ``path`` killed midway left behind. Only called under the entry's
    lock: every writer holds it, so any temporary file of this entry is a dead build's."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def open_or_build(
    path: Path, open_entry: Callable[[], Entry | str], build: Callable[[], None], kind: str
) -> tuple[Entry, bool]:
    """The entry ``open_entry()`` reads from ``path``, built first by ``build()`` when it says
    why it cannot be used (a string: "missing", or what is wrong, which a warning repeats). The
    build runs under the file's lock; a process that waited for another's build uses that one.
    ``kind`` names the cache in messages. Returns the entry and whether this call built it.
    Shared by the prototype cache and the token cache (:mod:`tasks.token_cache`)."""
    entry = open_entry()
    if not isinstance(entry, str):
        return entry, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the {kind} folder {str(path.parent)!r} ({error}); set MACSC_CACHE "
            "or the cache_dir option to a writable folder, or turn the cache off (cache_dir=False)"
        ) from error
    with locked(path) as exclusive:
        entry = open_entry()  # another process may have built it while we waited
        if not isinstance(entry, str):
            return entry, False
        if exclusive:
            remove_stale_temporaries(path)
        if entry != "missing":
            warnings.warn(
                f"{kind} file {str(path)!r} is unusable ({entry}); rebuilding it", stacklevel=4
            )
        build()
        entry = open_entry()
    if isinstance(entry, str):
        raise RuntimeError(f"{kind} file {str(path)!r} is unusable right after writing: {entry}")
    return entry, True
