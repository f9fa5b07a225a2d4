"""The visual-reasoning probe data sets of paper Table 7 (SPEC section 11), read from the files
their authors publish; nothing is bundled.

- Memory-Color (Norlund et al., 2021): JSON Lines ``{"descriptor", "item", "label", ...}``, or
  the CSV copy ``Index,Descriptor,Item,Color`` (CRLF line ends, trailing spaces in
  descriptors); 109 objects, 11 colours.
- ColorTerms (Bruni et al., 2012): CSV ``Object,color``; 52 objects, the same colours, no
  descriptor.
- ObjectShape (ViComTe shape, Zhang et al., 2022): JSON Lines ``{"sub", "obj", "alt"}``
  (``alt``, a distractor for the authors' own pairwise test, is not used); 12 shape classes,
  three of which also score a synonym. A folder is read as the ViComTe ``db/shape`` folder:
  ``test.jsonl`` (140 objects) or, with ``split="single"``, ``single/test.jsonl`` (101).

Each loader returns a :class:`macsc.analysis.probes.Probe` with its classes and templates; a malformed row
or a label outside the class set is a :class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from macsc.analysis.probes import Probe, ProbeExample
from macsc.errors import ConfigError, DataError

COLOURS = (
    "white",
    "green",
    "yellow",
    "red",
    "brown",
    "grey",
    "black",
    "blue",
    "orange",
    "pink",
    "purple",
)
#: spellings of a colour label read as the class (not scored as extra words)
COLOUR_LABEL_ALIASES = {"gray": "grey"}

SHAPES = (
    "cross",
    "heart",
    "octagon",
    "oval",
    "polygon",
    "rectangle",
    "rhombus",
    "round",
    "semicircle",
    "square",
    "star",
    "triangle",
)
#: word -> shape class; the class scores the sum of its own and its synonyms' probabilities,
#: and a gold label may be written with either word
SHAPE_SYNONYMS = {"circle": "round", "diamond": "rhombus", "hexagon": "polygon"}

#: Memory-Color's 13 templates (ColorTerms uses them with no descriptor)
COLOUR_TEMPLATES = (
    "Q: What is the color of [DESCRIPTOR] [ITEM]? A: It is [MASK].",
    "Q: What is the color of [DESCRIPTOR] [ITEM]? [SEP] A: It is [MASK].",
    "Q: What is the colour of [DESCRIPTOR] [ITEM]? A: It is [MASK].",
    "What is the color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
    "What is the colour of [DESCRIPTOR] [ITEM]? [MASK].",
    "The color of [DESCRIPTOR] [ITEM] is [MASK].",
    "The usual color of [DESCRIPTOR] [ITEM] is [MASK].",
    "[DESCRIPTOR] [ITEM] usually has the color of [MASK].",
    "What is the usual color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the usual color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
    "What is the typical color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the typical color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
)

#: ViComTe's 7 shape templates; its ``[X]`` (the object) is ``[ITEM]`` here, ``[Y]`` ``[MASK]``
SHAPE_TEMPLATES = (
    "[ITEM] can be of shape [MASK] .",
    "[ITEM] has shape [MASK] .",
    "[ITEM] is of shape [MASK] .",
    "The shape of [ITEM] can be [MASK] .",
    "The shape of the [ITEM] is [MASK] .",
    "[MASK] [ITEM] .",
    "This is a [MASK] [ITEM] .",
)

#: ObjectShape split -> file inside the ViComTe ``db/shape`` folder
SHAPE_SPLITS = {"test": "test.jsonl", "single": "single/test.jsonl"}


def colour_classes() -> dict[str, tuple[str, ...]]:
    return {colour: (colour,) for colour in COLOURS}


def shape_classes() -> dict[str, tuple[str, ...]]:
    return {
        shape: (shape, *(word for word, cls in SHAPE_SYNONYMS.items() if cls == shape))
        for shape in SHAPES
    }


# ------------------------------------------------------------------------------------ reading
def _read(path: str | Path, what: str) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist")
    try:
        return path, path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"{what} file {str(path)!r} cannot be read as UTF-8 text: {error}"
        ) from error


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-blank line; ``where`` is ``"FILE, line N"``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _csv_rows(
    path: Path, text: str, columns: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, str]]]:
    """``(where, row)`` for each data row, keyed by the lower-cased header names; the header
    must name every one of ``columns`` (in any case)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    names = [name.strip().lower() for name in header or []]
    missing = [column for column in columns if column not in names]
    if missing:
        raise DataError(
            f"{path}, line 1: the CSV header {header} lacks the column(s) {missing}; expected "
            f"{', '.join(columns)}"
        )
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise DataError(f"{where}: {len(row)} fields where the header has {len(names)}")
        yield where, dict(zip(names, row, strict=True))


def _field(row: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing the field {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {value!r}")
    value = " ".join(value.split())
    if required and not value:
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _label(value: str, classes: tuple[str, ...], aliases: dict[str, str], where: str) -> str:
    label = aliases.get(value.lower(), value.lower())
    if label not in classes:
        raise DataError(
            f"{where}: label {value!r} is not one of the {len(classes)} classes "
            f"({', '.join(classes)})"
        )
    return label


def _probe(name: str, path: Path, examples: list[ProbeExample], **protocol: Any) -> Probe:
    if not examples:
        raise DataError(f"{name} file {str(path)!r} holds no examples")
    return Probe(name=name, examples=examples, source=str(path), **protocol)


# ------------------------------------------------------------------------------------ loaders
def load_memory_color(path: str | Path) -> Probe:
    """Memory-Color from its JSON Lines file or its CSV copy (told apart by content)."""
    path, text = _read(path, "Memory-Color")
    if text.lstrip().startswith("{"):
        rows, label = _json_lines(path, text), "label"
    else:
        rows, label = _csv_rows(path, text, ("descriptor", "item", "color")), "color"
    examples = [
        ProbeExample(
            item=_field(row, "item", where),
            label=_label(_field(row, label, where), COLOURS, COLOUR_LABEL_ALIASES, where),
            descriptor=_field(row, "descriptor", where, required=False),
        )
        for where, row in rows
    ]
    return _probe(
        "memory_color", path, examples, classes=colour_classes(), templates=COLOUR_TEMPLATES
    )


def load_color_terms(path: str | Path) -> Probe:
    """ColorTerms from its CSV ``Object,color``; no descriptors."""
    path, text = _read(path, "ColorTerms")
    examples = [
        ProbeExample(
            item=_field(row, "object", where),
            label=_label(_field(row, "color", where), COLOURS, COLOUR_LABEL_ALIASES, where),
        )
        for where, row in _csv_rows(path, text, ("object", "color"))
    ]
    return _probe(
        "color_terms", path, examples, classes=colour_classes(), templates=COLOUR_TEMPLATES
    )


def object_shape_file(path: str | Path, split: str = "test") -> Path:
    """The ObjectShape file: ``path`` itself, or ``SHAPE_SPLITS[split]`` inside a folder."""
    if split not in SHAPE_SPLITS:
        raise ConfigError(f"ObjectShape split {split!r} is unknown; choose {list(SHAPE_SPLITS)}")
    path = Path(path)
    if path.is_dir():
        return path / SHAPE_SPLITS[split]
    if split != "test":
        raise ConfigError(
            f"ObjectShape split {split!r} picks a file inside the ViComTe shape folder; give "
            f"that folder, not the file {str(path)!r}"
        )
    return path


def load_object_shape(path: str | Path, split: str = "test") -> Probe:
    """ObjectShape (ViComTe shape): a ``.jsonl`` file, or the ``db/shape`` folder and a split."""
    path, text = _read(object_shape_file(path, split), "ObjectShape")
    examples = [
        ProbeExample(
            item=_field(row, "sub", where),
            label=_label(_field(row, "obj", where), SHAPES, SHAPE_SYNONYMS, where),
        )
        for where, row in _json_lines(path, text)
    ]
    return _probe(
        "object_shape", path, examples, classes=shape_classes(), templates=SHAPE_TEMPLATES
    )


def load_probes(
    memory_color: str | Path | None = None,
    color_terms: str | Path | None = None,
    object_shape: str | Path | None = None,
    shape_split: str = "test",
) -> list[Probe]:
    """The probes whose files are given, in Table 7's order."""
    probes = []
    if memory_color is not None:
        probes.append(load_memory_color(memory_color))
    if color_terms is not None:
        probes.append(load_color_terms(color_terms))
    if object_shape is not None:
        probes.append(load_object_shape(object_shape, shape_split))
    return probes
