"""The token cache: each split tokenised once, then memory-mapped by every run and every DDP
rank (issue 20), as the prototype cache does for prototypes (SPEC 8).

What is stored. :meth:`tasks.base.MaCSCDataModule.tokenize` makes a few integer columns of one
split: *ragged* ones, one sequence per item (``input_ids``, ``token_type_ids``, SQuAD's offsets
``(L, 2)``, CommonGen's target ids), and *scalar* ones, one int per item (SQuAD's positions). A
ragged column is stored as its values back to back in the smallest integer dtype that holds them
(``uint16`` for a 30,522-word vocabulary, ``uint8`` for token types), plus the ``N + 1`` bounds of
its items: no padding (MNLI's train split is ~30 MB, not the ~400 MB of int64 at length 128).
Readers map the file copy-on-write, so the DDP ranks of a node share its pages, and a scalar
column is read into a list of Python ints (what the collator stacks).

Key. SHA-256 over the format version (:data:`FORMAT_VERSION`, raised whenever a task's
``tokenize`` changes what it makes), the tokenizer (:func:`tokenizer_fingerprint`), the data
module's class and everything its :meth:`~tasks.base.MaCSCDataModule.encoding_key` names: the
digests of the ordered texts, ``max_length``, the truncation rule and the task's own options
(SQuAD: doc stride, question length, version, answers and ids; CommonGen: prefix, targets).

File. ``tokens-<key>.tokens`` in the prototype cache's folder (``cache_dir``, else
``$MACSC_CACHE``, else ``~/.cache/macsc``; ``cache_dir: false`` turns both caches off): a
4096-byte header (magic line, then JSON: version, key, what the key was made of, the columns'
layout, the checksum of all the data and of sampled blocks), then the arrays. Publication and
checks are the prototype cache's (:mod:`macsc.prototypes.cache_files`): written to a temporary
file under a lock and published with one atomic rename, so of several processes one builds and
the others wait and read; each open checks the header, the size and the sampled checksum, and a
file that fails is rebuilt with a warning, never read as data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from macsc.prototypes.cache_files import (
    HEADER_BYTES,
    open_or_build,
    read_header,
    sample_problem,
    seal,
)

FORMAT_VERSION = 1

SUFFIX = ".tokens"

#: column name -> one sequence (ragged) or one int (scalar) per item, as ``tokenize`` makes them
Columns = dict[str, Sequence[Any]]

_MAGIC = b"MACSC-TOKENS\n"

_ALIGN = 64

_INTEGER_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64)

#: hash of a backend tokenizer's JSON -> :func:`_backend_digest` of it
_BACKEND_DIGESTS: dict[str, str] = {}

#: tokenizer init arguments that say where files were, not what the tokenizer does
_LOCATION_ARGUMENTS = ("name_or_path", "is_local", "local_files_only", "cache_dir")


def compact_dtype(low: int, high: int) -> np.dtype:
    """The smallest integer dtype that holds every value in ``[low, high]``."""
    for dtype in _INTEGER_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise ValueError(f"integers in [{low}, {high}] do not fit in int64")


def ordered_digest(distinct_digest: str, rows: np.ndarray) -> str:
    """SHA-256 of an ordered text list given as its distinct texts' digest and the row of each
    text (:func:`macsc.prototypes.index_texts`): equal exactly when the lists are equal."""
    digest = hashlib.sha256(distinct_digest.encode())
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 of ``value`` written as JSON (for ids, answers and other non-text inputs)."""
    encoded = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


def _backend_digest(serialised: str) -> str:
    """The digest of a fast tokenizer's backend JSON without its last call's truncation and
    padding, which each call's arguments set (the encoding key holds those); remembered by the
    hash of the JSON, since writing the definition out again takes ~0.1 s at 30k words."""
    raw = hashlib.sha256(serialised.encode("utf-8", "surrogatepass")).hexdigest()
    if raw not in _BACKEND_DIGESTS:
        definition = json.loads(serialised)
        definition.pop("truncation", None)
        definition.pop("padding", None)
        _BACKEND_DIGESTS[raw] = json_digest(definition)
    return _BACKEND_DIGESTS[raw]


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any] | None:
    """What decides the ids a Hugging Face tokenizer gives: its class and name, a hash of its
    whole definition (a fast tokenizer's backend JSON: vocabulary, merges, normaliser,
    pre-tokeniser, special-token template; else the vocabulary and init arguments), its special
    tokens, padding and truncation sides, and the library versions. None for an object that
    offers neither a backend nor a vocabulary: its splits are tokenised in memory every run."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = _backend_digest(backend.to_str())
    elif callable(getattr(tokenizer, "get_vocab", None)):
        settings = {
            name: value
            for name, value in getattr(tokenizer, "init_kwargs", {}).items()
            if name not in _LOCATION_ARGUMENTS and not name.endswith("_file")
        }
        definition = json_digest(
            {"vocabulary": sorted(tokenizer.get_vocab().items()), "settings": settings}
        )
    else:
        return None
    import tokenizers
    import transformers

    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    return {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "definition": definition,
        "special_tokens": {name: str(token) for name, token in special.items()},
        "special_ids": [int(i) for i in getattr(tokenizer, "all_special_ids", [])],
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        "versions": [transformers.__version__, tokenizers.__version__],
    }


def token_cache_key(described: dict[str, Any]) -> str:
    """SHA-256 over :data:`FORMAT_VERSION` and ``described`` (module docstring: Key)."""
    return json_digest({"format": FORMAT_VERSION, **described})


def _mapped(path: Path, spec: dict[str, Any]) -> np.ndarray:
    """One array of a token cache file, mapped copy-on-write (pages shared between processes)."""
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    if not int(np.prod(shape)):
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "c", spec["offset"], shape)


class RaggedColumn(Sequence):
    """One sequence per item, read from flat ``values`` ``(T, ...)`` cut by ``bounds``
    ``(N + 1,)``: item ``i`` is ``values[bounds[i]:bounds[i + 1]]`` (a view, no copy).

    source: ``(path, values spec, bounds spec)`` when mapped from a cache file; a pickled copy
    (a DataLoader worker started by ``spawn``) then maps the file again instead of carrying
    the data.
    """

    def __init__(self, values: np.ndarray, bounds: np.ndarray, source: tuple | None = None) -> None:
        self.values = values
        self.bounds = bounds
        self.source = source

    @classmethod
    def mapped(cls, path: Path, values: dict[str, Any], bounds: dict[str, Any]) -> RaggedColumn:
        return cls(_mapped(path, values), _mapped(path, bounds), (path, values, bounds))

    def __reduce__(self) -> tuple:
        if self.source is not None:
            return (type(self).mapped, self.source)
        return (type(self), (np.asarray(self.values), np.asarray(self.bounds)))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[self.bounds[index] : self.bounds[index + 1]]

    def lengths(self) -> list[int]:
        return np.diff(self.bounds).tolist()


def _is_ragged(values: Sequence[Any]) -> bool:
    return len(values) > 0 and not isinstance(values[0], int | np.integer)


def _flatten(name: str, values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A column as one int64 array of its values and, when ragged, the bounds of its items."""
    if not _is_ragged(values):
        return np.asarray(values, dtype=np.int64).reshape(len(values)), None
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    first = np.asarray(values[0])
    if first.ndim > 1 or isinstance(values[0], np.ndarray):
        flat = np.concatenate(
            [np.asarray(v, dtype=np.int64).reshape(-1, *first.shape[1:]) for v in values]
        )
    else:
        flat = np.fromiter(itertools.chain.from_iterable(values), np.int64, int(bounds[-1]))
    if not np.issubdtype(first.dtype, np.integer) and first.size:
        raise TypeError(f"token cache column {name!r} holds {first.dtype} values, not integers")
    return flat, bounds


def _layout(columns: Columns) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header's description of where each array sits, and the arrays in that order."""
    described: dict[str, Any] = {}
    arrays: list[np.ndarray] = []
    offset = HEADER_BYTES
    for name, values in columns.items():
        flat, bounds = _flatten(name, values)
        parts = {"values": flat} if bounds is None else {"values": flat, "bounds": bounds}
        described[name] = {}
        for part, array in parts.items():
            if array.size:  # bounds too: int32 while a column has under 2**31 values
                array = array.astype(compact_dtype(int(array.min()), int(array.max())))
            described[name][part] = {
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
            }
            arrays.append(array)
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
    return {"columns": described, "size": offset}, arrays


def _write(path: Path, key: str, described: dict[str, Any], columns: Columns) -> None:
    """Write ``columns`` to a temporary file beside ``path``, then publish it atomically."""
    layout, arrays = _layout(columns)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.truncate(layout["size"])
            parts = [part for column in layout["columns"].values() for part in column.values()]
            for part, array in zip(parts, arrays, strict=True):
                handle.seek(part["offset"])
                handle.write(np.ascontiguousarray(array).tobytes())
        header = {"format": FORMAT_VERSION, "key": key, "identity": described, **layout}
        seal(temporary, path, _MAGIC, header)
    finally:
        temporary.unlink(missing_ok=True)


def _problem(path: Path, key: str, header: dict[str, Any]) -> str | None:
    """Why ``header`` does not describe a usable entry of ``key`` at ``path`` (None if it does)."""
    for field, value in (("format", FORMAT_VERSION), ("key", key)):
        if header.get(field) != value:
            return f"its header has {field}={header.get(field)!r}, expected {value!r}"
    size = header.get("size")
    try:
        parts = [part for column in header["columns"].values() for part in column.values()]
        end = HEADER_BYTES
        for part in sorted(parts, key=lambda part: part["offset"]):
            count = int(np.prod(part["shape"], dtype=np.int64))
            if np.dtype(part["dtype"]).kind not in "iu":
                return f"its header describes {part['dtype']!r} arrays, not integers"
            if part["offset"] != end or count < 0:
                return "its header describes overlapping or misplaced arrays"
            end += -(-count * np.dtype(part["dtype"]).itemsize // _ALIGN) * _ALIGN
    except (AttributeError, KeyError, TypeError, ValueError):
        return "its header describes no valid layout"
    if size != end:
        return f"its header gives size {size!r}, its arrays need {end}"
    actual = path.stat().st_size
    if actual != size:
        return f"it has {actual} bytes, expected {size} (truncated or partial)"
    return sample_problem(path, header)


def _open(path: Path, key: str) -> Columns | str:
    """The columns of the entry at ``path``, or why it cannot be used."""
    if not path.is_file():
        return "missing"
    try:
        header = read_header(path, _MAGIC, "token-cache")
        problem = _problem(path, key, header)
    except (OSError, ValueError) as error:
        return str(error)
    if problem is not None:
        return problem
    columns: Columns = {}
    for name, parts in header["columns"].items():
        if "bounds" in parts:
            columns[name] = RaggedColumn.mapped(path, parts["values"], parts["bounds"])
        else:
            columns[name] = _mapped(path, parts["values"]).tolist()
    return columns


def cached_columns(
    folder: Path, key: str, described: dict[str, Any], tokenize: Callable[[], Columns]
) -> Columns:
    """The columns of entry ``key`` in ``folder``: read, or made by ``tokenize()`` and stored
    first when the entry is missing or unusable (a warning says why it is rebuilt)."""
    path = folder / f"tokens-{key[:32]}{SUFFIX}"
    return open_or_build(
        path,
        lambda: _open(path, key),
        lambda: _write(path, key, described, tokenize()),
        "token cache",
    )[0]
