"""Features of images retrieved for each example, read in place of a modality's prototypes
(SPEC 14; the "+Image" rows of paper Tables 2 and 3).

The paper retrieves images per example with a web search and encodes them with CLIP's image
tower. Here the user supplies the features, one folder per split (``scripts/image_features.py``
writes it from a folder of retrieved images with open_clip's image tower):

- ``features.npy``: ``(N, n_images, d)`` float16 or float32, memory-mapped when read;
- ``ids.json``: the ``N`` example ids in the rows' order (a JSON list of strings or numbers);
- ``mask.npy`` (optional): ``(N, n_images)`` bool, True where a row holds a real image (an
  example with fewer images pads with zeros); absent means every image is real.

Rows are looked up by example id (GLUE ``idx``, the SQuAD question id, the CommonGen concept-set
id: ``TextSplit.ids``, or the example's position in its split when the source has no ids; the
``id`` of ``predictions-<split>.jsonl``), compared as text, so the file's order does not matter
and one folder may cover several splits whose ids do not collide (SQuAD's do not, GLUE's do). An
example without a row is an error that names its id. The features then go through the same
enhancement and heads as prototypes do: the ``n_images`` vectors are the modality's ``H^m``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from macsc.errors import ConfigError, DataError
from macsc.prototypes.base import PrototypeExtractor, Prototypes, register_extractor
from macsc.prototypes.cache import PrototypeTable

FEATURES_FILE, IDS_FILE, MASK_FILE = "features.npy", "ids.json", "mask.npy"
_STORED_DTYPES = (np.float16, np.float32)
_SHOWN_IDS = 3


@dataclass
class ImageFeatures:
    """One features folder. ids: ``N`` ids as text; features ``(N, n, d)`` and mask ``(N, n)``
    bool, memory-mapped copy-on-write (a write stays private, never reaches the file)."""

    folder: Path
    ids: list[str]
    features: Tensor
    mask: Tensor

    def rows(self, ids: Sequence[Any], split: str) -> Tensor:
        """``(len(ids),)`` long: the row of each id (compared as text); a DataError names the
        first ids that have none."""
        index = {name: row for row, name in enumerate(self.ids)}
        rows = [index.get(str(name), -1) for name in ids]
        missing = [str(name) for name, row in zip(ids, rows, strict=True) if row < 0]
        if missing:
            shown = ", ".join(repr(name) for name in missing[:_SHOWN_IDS])
            raise DataError(
                f"image features {self.folder}: no row for example id {shown} of the {split!r} "
                f"split ({len(missing)} of its {len(ids)} examples have none; the folder holds "
                f"{len(self.ids)} ids); write features for every example of the split "
                "(scripts/image_features.py --ids FILE lists them)"
            )
        return torch.tensor(rows, dtype=torch.long)


def write_image_features(
    folder: str | os.PathLike,
    ids: Sequence[Any],
    features: np.ndarray | Tensor,
    mask: np.ndarray | Tensor | None = None,
) -> Path:
    """Write a features folder (module docstring); ids are stored as given (strings or ints)."""
    folder = Path(folder)
    features = _as_numpy(features)
    if features.ndim != 3 or features.shape[0] != len(ids):
        raise DataError(
            f"image features must be (N, n_images, d) with N = {len(ids)} ids; got "
            f"{tuple(features.shape)}"
        )
    if features.dtype not in _STORED_DTYPES:
        features = features.astype(np.float32)
    if len({str(name) for name in ids}) != len(ids):
        raise DataError(f"image features for {folder}: the ids repeat; give each example once")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / FEATURES_FILE, features)
    (folder / IDS_FILE).write_text(json.dumps([_plain(name) for name in ids]), encoding="utf-8")
    if mask is not None:
        mask = _as_numpy(mask).astype(bool)
        if mask.shape != features.shape[:2]:
            raise DataError(f"image mask {mask.shape} does not match features {features.shape}")
        np.save(folder / MASK_FILE, mask)
    elif (folder / MASK_FILE).exists():
        (folder / MASK_FILE).unlink()  # a stale mask of other features
    return folder


def read_image_features(folder: str | os.PathLike) -> ImageFeatures:
    """Open a features folder, checking that its files agree."""
    folder = Path(folder).expanduser()
    if not (folder / FEATURES_FILE).is_file() or not (folder / IDS_FILE).is_file():
        raise DataError(
            f"image features folder {str(folder)!r} has no {FEATURES_FILE} and {IDS_FILE}; "
            "write it with scripts/image_features.py (docs/prototypes.md, +Image rows)"
        )
    try:
        array = np.load(folder / FEATURES_FILE, mmap_mode="c")
        ids = json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise DataError(f"image features {folder}: cannot be read ({error})") from error
    if array.ndim != 3 or array.dtype not in _STORED_DTYPES:
        raise DataError(
            f"{folder / FEATURES_FILE} holds {array.dtype} {array.shape}; expected float16 or "
            "float32 of shape (N, n_images, d)"
        )
    if not isinstance(ids, list) or len(ids) != array.shape[0]:
        count = len(ids) if isinstance(ids, list) else "no list of"
        raise DataError(
            f"{folder / IDS_FILE} holds {count} ids for the {array.shape[0]} rows of "
            f"{FEATURES_FILE}; write one id per row"
        )
    names = [str(name) for name in ids]
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise DataError(f"{folder / IDS_FILE}: id {repeated!r} appears more than once")
    if (folder / MASK_FILE).is_file():
        mask_array = np.load(folder / MASK_FILE, mmap_mode="c")
        if mask_array.shape != array.shape[:2] or mask_array.dtype != np.bool_:
            raise DataError(
                f"{folder / MASK_FILE} holds {mask_array.dtype} {mask_array.shape}; expected "
                f"bool of shape {array.shape[:2]}"
            )
        mask = torch.from_numpy(mask_array)
    else:
        mask = torch.ones(array.shape[:2], dtype=torch.bool)
    return ImageFeatures(folder, names, torch.from_numpy(array), mask)


@register_extractor("image_features")
class ImageFeatureSource(PrototypeExtractor):
    """A modality whose ``H^m`` are stored features of each example (module docstring), read
    by the data module (:meth:`table`), never extracted from text.

    Options:
      files: a folder per split, ``{train: DIR, validation: DIR, ...}``, or one path for all
        splits; ``{split}`` and ``{task}`` in a path stand for the split's name
        (``validation_matched``) and the data module's task (``squad_v2.0``, ``commongen``,
        ``sst2``), so one config serves several tasks.
      dim: the features' width ``d`` (CLIP ViT-B/32 images: 512); the files must match it.
    """

    def __init__(self, files: str | Mapping[str, str], dim: int = 512) -> None:
        super().__init__(k=1, trainable=False)
        if not files or not isinstance(files, str | Mapping):
            raise ConfigError(
                "the image_features source needs files: a folder per split "
                "({train: DIR, validation: DIR}) or one path with {split} in it"
            )
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"image_features option dim must be an integer >= 1, got {dim!r}")
        self.files = files if isinstance(files, str) else {k: str(v) for k, v in files.items()}
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def cacheable(self) -> bool:
        return False  # already stored: nothing to extract or cache

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "files": self.files}

    def folder(self, split: str, task: str) -> Path:
        """The features folder of ``split`` of ``task``."""
        if isinstance(self.files, str):
            pattern = self.files
        elif split in self.files:
            pattern = self.files[split]
        else:
            raise ConfigError(
                f"the image_features source has no folder for the {split!r} split (files has "
                f"{sorted(self.files)}); add files.{split}: DIR"
            )
        return Path(pattern.replace("{split}", split).replace("{task}", task)).expanduser()

    def table(self, split: str, task: str, ids: Sequence[Any]) -> PrototypeTable:
        """The features of the examples ``ids`` of ``split``, in that order (row ``i`` of the
        table's ``rows`` is example ``i``'s row of the file)."""
        stored = read_image_features(self.folder(split, task))
        width = stored.features.shape[2]
        if width != self.dim:
            raise DataError(
                f"{stored.folder / FEATURES_FILE} holds features of width {width}, but the "
                f"image_features source has dim: {self.dim}; set dim: {width}"
            )
        rows = stored.rows(ids, split)
        return PrototypeTable(
            stored.features, stored.mask, rows, path=stored.folder / FEATURES_FILE
        )

    def _extract(self, texts: list[str]) -> Prototypes:
        raise ConfigError(
            "image features are read per example from their files by a macsc data module "
            "(tasks.*), not extracted from text"
        )


def _as_numpy(values: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        return values.float().numpy() if values.dtype == torch.bfloat16 else values.numpy()
    return np.asarray(values)


def _plain(name: Any) -> Any:
    """An id as JSON can hold it: ints and strings as they are, anything else as text."""
    if isinstance(name, bool) or not isinstance(name, int | str):
        return int(name) if isinstance(name, np.integer) else str(name)
    return name
