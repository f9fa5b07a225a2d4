"""Reading CommonGen: concept sets and their reference sentences, from three kinds of source.

- the Hugging Face hub dataset ``allenai/common_gen`` (``concept_set_idx``, ``concepts``,
  ``target``; one row per reference, the test split's targets empty);
- JSON Lines, one object per line: ``{"concepts": [...], "target": "..."}`` (one reference) or
  ``{"concepts": [...], "references": [...]}`` (all of them; ``gold`` is read as
  ``references``, so a ``predictions-<split>.jsonl`` written by ``macsc validate`` is also a
  references file); ``concept_set_idx`` optional; a line with neither is unlabelled;
- the original release, ``commongen.{train,dev,test}.src_alpha.txt`` (one line of
  space-separated concepts per reference) with its aligned ``.tgt.txt`` beside it (absent: the
  split is unlabelled).

Every source becomes a list of :class:`ConceptExample` (one per line or row). Evaluation groups
them into :class:`ConceptSet` (one per distinct set, all its references), as the CommonGen
evaluation does; training uses every (concept set, reference) pair. Only the hub path imports
:mod:`datasets`; nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macsc.errors import DataError
from macsc.paths import load_hub_dataset

HUB_NAME = "allenai/common_gen"
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson", ".json")
SOURCE_SUFFIX, TARGET_SUFFIX = ".src_alpha.txt", ".tgt.txt"


@dataclass(frozen=True)
class ConceptExample:
    """One line or row of a source.

    concepts: the concept words in the source's order. references: its reference sentences (one
    for a hub row or a ``target`` line, several for a ``references`` line, none when unlabelled).
    set_id: the source's ``concept_set_idx`` when it has one. where: the file and line, or hub
    row, for error messages.
    """

    concepts: tuple[str, ...]
    references: tuple[str, ...]
    set_id: str | None
    where: str


@dataclass(frozen=True)
class ConceptSet:
    """One distinct concept set with every reference of it.

    id: the ``concept_set_idx`` when the source has one, else the concepts joined by ``#`` in
    the order first seen (the key of the CommonGen evaluation script).
    """

    id: str
    concepts: tuple[str, ...]
    references: tuple[str, ...]
    where: str


def concept_set_key(concepts: Iterable[str]) -> str:
    """The key under which two concept lists are the same set: order, case and surrounding
    spaces do not matter (``["Dog", "cat"]`` and ``["cat", "dog"]`` -> ``"cat#dog"``)."""
    return "#".join(sorted(concept.strip().lower() for concept in concepts))


def concept_text(concepts: Iterable[str]) -> str:
    """The model's input: the concepts joined by single spaces, in the given order."""
    return " ".join(concept.strip() for concept in concepts)


def group_concept_sets(examples: Iterable[ConceptExample]) -> list[ConceptSet]:
    """One :class:`ConceptSet` per distinct set, in order of first appearance.

    Grouped by ``set_id`` when the examples have one, else by :func:`concept_set_key`. References
    keep their order (duplicates too, as the CommonGen evaluation keeps them).
    """
    groups: dict[tuple[str, str], list[ConceptExample]] = {}
    for example in examples:
        if example.set_id is not None:
            key = ("id", example.set_id)
        else:
            key = ("concepts", concept_set_key(example.concepts))
        members = groups.setdefault(key, [])
        if members and concept_set_key(members[0].concepts) != concept_set_key(example.concepts):
            raise DataError(
                f"{example.where}: concept_set_idx {example.set_id} has the concepts "
                f"{list(example.concepts)} here but {list(members[0].concepts)} at "
                f"{members[0].where}; one id should name one concept set"
            )
        members.append(example)
    return [
        ConceptSet(
            id=members[0].set_id or "#".join(members[0].concepts),
            concepts=members[0].concepts,
            references=tuple(r for member in members for r in member.references),
            where=members[0].where,
        )
        for members in groups.values()
    ]


# --- sources ---------------------------------------------------------------------------------


def read_examples(source: str | Path, split: str | None = None) -> list[ConceptExample]:
    """The examples of a JSON Lines file, a release ``.src_alpha.txt`` / ``.tgt.txt`` file, or
    the hub: ``source`` is then a dataset name (``allenai/common_gen``) and ``split`` its split,
    or ``NAME:SPLIT`` as one string."""
    path = Path(source).expanduser()
    name = path.name.lower()
    if name.endswith((SOURCE_SUFFIX, TARGET_SUFFIX)):
        return read_release(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        return read_jsonl(path)
    if path.exists():
        raise DataError(
            f"{path}: unknown CommonGen file type; give JSON Lines (.jsonl) or the release "
            f"files (commongen.dev{SOURCE_SUFFIX} with its {TARGET_SUFFIX} beside it)"
        )
    hub_name, _, hub_split = str(source).partition(":")
    if hub_split or split is not None:
        return read_hub(hub_name, hub_split or split)
    raise DataError(
        f"{source} does not exist; give a JSON Lines file, a release {SOURCE_SUFFIX} file, or a "
        f"hub split as NAME:SPLIT (e.g. {HUB_NAME}:validation)"
    )


def read_jsonl(path: str | Path) -> list[ConceptExample]:
    """Examples of a JSON Lines file (module docstring); blank lines are skipped."""
    examples = []
    for number, line in enumerate(read_utf8_lines(path), start=1):
        if line.strip():
            where = f"{path} line {number}"
            examples.append(example_from_record(json_object(line, where), where))
    if not examples:
        raise DataError(f"{path} holds no CommonGen examples (it is empty)")
    return examples


def example_from_record(record: Mapping[str, Any], where: str) -> ConceptExample:
    """A :class:`ConceptExample` from one JSON object (``concepts`` and optionally
    ``target`` / ``references`` / ``gold``, ``concept_set_idx``)."""
    concepts = concept_list(record.get("concepts"), where)
    given = [key for key in ("target", "references", "gold") if key in record]
    if len(given) > 1:
        raise DataError(
            f"{where} has both {given[0]!r} and {given[1]!r}; give one reference field "
            "('target': one sentence, or 'references': a list)"
        )
    references: list[str] = []
    if given:
        value = record[given[0]]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DataError(
                f"{where}: {given[0]!r} should be a sentence or a list of sentences, got "
                f"{value!r:.80}"
            )
        references = [v.strip() for v in values if v.strip()]
    set_id = record.get("concept_set_idx")
    return ConceptExample(
        tuple(concepts), tuple(references), None if set_id is None else str(set_id), where
    )


def concept_list(value: Any, where: str) -> list[str]:
    """``value`` checked to be a non-empty list of non-empty strings (stripped)."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(c, str) and c.strip() for c in value)
    ):
        raise DataError(
            f"{where}: 'concepts' should be a non-empty list of words like "
            f'["dog", "frisbee", "catch"], got {value!r:.80}'
        )
    return [c.strip() for c in value]


def read_release(path: str | Path) -> list[ConceptExample]:
    """Examples of the original release: ``*.src_alpha.txt`` and the ``*.tgt.txt`` beside it
    (either path may be given; without a ``.tgt.txt`` the examples are unlabelled)."""
    path = Path(path)
    stem = str(path)[: -len(TARGET_SUFFIX if path.name.endswith(TARGET_SUFFIX) else SOURCE_SUFFIX)]
    source, target = Path(stem + SOURCE_SUFFIX), Path(stem + TARGET_SUFFIX)
    if not source.is_file():
        raise DataError(
            f"{source} does not exist; the release format needs the {SOURCE_SUFFIX} file of "
            f"concepts (its {TARGET_SUFFIX} of sentences beside it)"
        )
    concept_lines = _strip_final_blank(read_utf8_lines(source))
    if target.is_file():
        sentences = _strip_final_blank(read_utf8_lines(target))
        if len(sentences) != len(concept_lines):
            raise DataError(
                f"{source} has {len(concept_lines)} lines but {target} has {len(sentences)}; "
                "the two files should be aligned, one sentence per line of concepts"
            )
    else:
        sentences = [""] * len(concept_lines)
    examples = []
    for number, (line, sentence) in enumerate(zip(concept_lines, sentences, strict=True), 1):
        where = f"{source} line {number}"
        if not line.split():
            raise DataError(f"{where} is empty; each line should hold space-separated concepts")
        references = (sentence.strip(),) if sentence.strip() else ()
        examples.append(ConceptExample(tuple(line.split()), references, None, where))
    if not examples:
        raise DataError(f"{source} holds no CommonGen examples (it is empty)")
    return examples


def _strip_final_blank(lines: list[str]) -> list[str]:
    return lines[:-1] if lines and not lines[-1].strip() else lines


def load_hub(name: str) -> Any:
    """``datasets.load_dataset(name)`` (all splits); a DataError saying to pass local files
    when it fails (offline, unknown name, damaged cache)."""
    return load_hub_dataset(
        name,
        advice='when offline, pass local files: JSON Lines ({"concepts": [...], "target": '
        f'"..."}}) or the release commongen.*{SOURCE_SUFFIX} with its {TARGET_SUFFIX}',
    )


def hub_examples(dataset: Any, name: str, split: str) -> list[ConceptExample]:
    """The examples of ``split`` of a loaded hub dataset (``concept_set_idx``, ``concepts``,
    ``target``; an empty target is no reference)."""
    if split not in dataset:
        raise DataError(f"{name} has no split {split!r}; it has {list(dataset)}")
    rows = dataset[split]
    missing = {"concepts", "target"} - set(rows.column_names)
    if missing:
        raise DataError(
            f"{name} {split} has columns {rows.column_names}, not the CommonGen columns "
            "concept_set_idx, concepts, target"
        )
    ids = rows["concept_set_idx"] if "concept_set_idx" in rows.column_names else None
    examples = []
    for i, (concepts, target) in enumerate(zip(rows["concepts"], rows["target"], strict=True)):
        where = f"{name} {split} row {i}"
        examples.append(
            ConceptExample(
                tuple(concept_list(list(concepts), where)),
                (target.strip(),) if target and target.strip() else (),
                None if ids is None else str(ids[i]),
                where,
            )
        )
    return examples


def read_hub(name: str, split: str) -> list[ConceptExample]:
    """The examples of one split of a hub dataset (:func:`load_hub`, :func:`hub_examples`)."""
    return hub_examples(load_hub(name), name, split)


# --- small readers ---------------------------------------------------------------------------


def read_utf8_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file; a missing file or other bytes are a DataError."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist") from error
    except IsADirectoryError as error:
        raise DataError(f"{path} is a folder; give a file") from error
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        data = error.object
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path} line {line} is not UTF-8 text; save the file as UTF-8") from error


def json_object(line: str, where: str) -> dict[str, Any]:
    """One line parsed as a JSON object; anything else is a DataError naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where} is not valid JSON ({error}); write one object per line"
        ) from error
    if not isinstance(record, dict):
        raise DataError(f"{where} should be a JSON object, got {record!r:.60}")
    return record


def read_references(source: str) -> list[ConceptSet]:
    """Concept sets with their references from a file or ``NAME:SPLIT`` of the hub, grouped."""
    sets = group_concept_sets(read_examples(source))
    unlabelled = [s for s in sets if not s.references]
    if len(unlabelled) == len(sets) and _has_field(source, "prediction"):
        raise DataError(
            f"REFERENCES {source} holds predictions ('prediction', no 'references' or "
            "'target'); the order is: macsc commongen-eval REFERENCES PREDICTIONS"
        )
    if unlabelled:
        raise DataError(
            f"REFERENCES {source}: {len(unlabelled)} of {len(sets)} concept sets have no "
            f"reference sentence (first: {unlabelled[0].where}); give 'references' or "
            "'target' on every line"
        )
    by_key: dict[str, ConceptSet] = {}
    for concept_set in sets:
        key = concept_set_key(concept_set.concepts)
        if key in by_key:  # one set under two ids: score it once, with all references
            first = by_key[key]
            concept_set = ConceptSet(
                first.id, first.concepts, first.references + concept_set.references, first.where
            )
        by_key[key] = concept_set
    return list(by_key.values())


def read_predictions(path: str) -> dict[str, tuple[str, str]]:
    """Concept-set key -> (prediction, where) from JSON Lines ``{"concepts", "prediction"}``.

    A set given twice must have the same prediction both times.
    """
    predictions: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(read_utf8_lines(path), start=1):
        if not line.strip():
            continue
        where = f"PREDICTIONS {path} line {number}"
        record = json_object(line, where)
        if "prediction" not in record:
            if any(key in record for key in ("references", "target")):
                raise DataError(
                    f"{where} holds references, not a 'prediction'; the order is: "
                    "macsc commongen-eval REFERENCES PREDICTIONS"
                )
            raise DataError(f"{where} has no 'prediction' field (a sentence)")
        prediction = record["prediction"]
        if not isinstance(prediction, str):
            raise DataError(f"{where}: 'prediction' should be a sentence, got {prediction!r:.60}")
        if not isinstance(record.get("concepts"), list) or not record["concepts"]:
            raise DataError(
                f"{where}: 'concepts' should be a non-empty list of words, got "
                f"{record.get('concepts')!r:.60}"
            )
        key = concept_set_key(str(c) for c in record["concepts"])
        if key in predictions and predictions[key][0] != prediction:
            raise DataError(
                f"{where}: concept set {key!r} already has a different prediction at "
                f"{predictions[key][1]}; give one sentence per concept set"
            )
        predictions[key] = (prediction, where)
    if not predictions:
        raise DataError(f"PREDICTIONS {path} holds no predictions (it is empty)")
    return predictions


def _has_field(source: str, field: str) -> bool:
    """Whether the first JSON object of a file has ``field`` (false for anything else)."""
    try:
        first = next(line for line in read_utf8_lines(source) if line.strip())
        return field in json.loads(first)
    except (DataError, StopIteration, ValueError, TypeError):
        return False
