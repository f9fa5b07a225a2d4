"""The folder of an exported model: what ``macsc export`` writes and
:meth:`macsc.inference.MaCSC.from_pretrained` reads, with no pickle in it.

::

    DIR/
      macsc.json           what rebuilds the model (:data:`FORMAT_VERSION`; written by
                           :mod:`macsc.inference.export`)
      macsc.safetensors    every tensor of the model's state dict: backbone, enhancers, heads,
                           rho, Z, the class prior, a trainable extractor's weights
      config.json          the backbone's Hugging Face configuration (generation_config.json
                           too for a generating backbone), and its tokenizer's files
      README.md            the model card (:mod:`macsc.inference.card`)

The weights file is named ``macsc.safetensors``, not ``model.safetensors``, so that
``transformers.AutoModel.from_pretrained(DIR)`` fails loudly instead of loading a backbone
with none of its weights. A frozen extractor's weights are not in it: they are the published
weights its options in ``macsc.json`` name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from macsc.errors import CheckpointError, first_line

MANIFEST = "macsc.json"
WEIGHTS = "macsc.safetensors"
FORMAT = "macsc-export"
#: the layout of ``macsc.json``; a folder of a later layout is refused with one line
FORMAT_VERSION = 1
#: the safetensors metadata entry naming the keys that hold the same tensor as another key
ALIASES = "macsc_aliases"


def as_plain(value: Any) -> Any:
    """``value`` as JSON data: tuples as lists, paths and other objects as their text."""
    return json.loads(json.dumps(value, default=str))


def write_weights(state: dict[str, Tensor], path: Path) -> int:
    """Write ``state`` to ``path`` as safetensors; returns the number of tensors stored.

    safetensors stores no tensor twice: a key whose tensor is another key's (tied weights,
    ``enhancer.shared``) is written once and named in the metadata (:data:`ALIASES`); a tensor
    that only overlaps another's memory is copied."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        where = (
            storage,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() and where in seen:
            aliases[key] = seen[where]
            continue
        if tensor.numel():
            seen[where] = key
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    save_file(tensors, str(path), metadata={"format": "pt", ALIASES: json.dumps(aliases)})
    return len(tensors)


def read_weights(
    path: Path,
    expected: dict[str, Tensor],
    describe: str,
    upgrade: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """The state dict in ``path``, checked against ``expected`` (the state dict of the model
    ``describe`` names): a file that is not safetensors, or a key missing, unexpected or of
    another shape, is one CheckpointError line naming the keys and shapes. ``upgrade`` maps a
    state dict of an earlier layout to today's before the check (an export written before the
    enhancers were stacked holds one set of enhancer tensors per modality)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from macsc.prototypes.published_weights import state_dict_mismatch

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the folder holds no exported weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
        aliases = json.loads(metadata.get(ALIASES) or "{}")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} cannot be read as safetensors ({first_line(error)}); export the model "
            "again (macsc export RUN DIR)"
        ) from error
    for alias, key in aliases.items():
        if key in state:
            state[alias] = state[key]
    if upgrade is not None:
        state = upgrade(state)
    problems = state_dict_mismatch(expected, state)
    if problems:
        raise CheckpointError(
            f"{path} does not fit {describe}: " + "; ".join(problems) + ". The file was changed "
            "or comes from another model: export the model again (macsc export RUN DIR)"
        )
    return state


def read_manifest(folder: Path) -> dict[str, Any]:
    """``macsc.json`` of an exported model's folder, checked for its format."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(
            f"{str(folder)!r} is not a folder; give the folder `macsc export` wrote"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} holds no {MANIFEST}: it is not an exported MaCSC model; write one "
            "with `macsc export RUN_OR_CKPT DIR`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({first_line(error)})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not the {MANIFEST} of an exported MaCSC model")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}, written by a later macsc (this one reads "
            f"up to {FORMAT_VERSION}); upgrade macsc"
        )
    for key in ("model", "prototypes", "backbone"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r} object; export the model again")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(as_plain(manifest), indent=2) + "\n", encoding="utf-8")
    return path
