"""Loading SQuAD v1.1 / v2.0 into flat examples, checking answer offsets, sampling a fraction.

A flat example is one question::

    {"id": str, "title": str, "context": str, "question": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]}}

with empty answer lists for an unanswerable (v2.0) question. Sources: the official JSON files
(``train-v2.0.json``, ``dev-v2.0.json``, v1.1 alike), JSON Lines (one flat example per line; the
answers may also be the official list of ``{text, answer_start}``), or the Hugging Face hub
(``squad``, ``squad_v2``) when online.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError, DataError
from macsc.squad.files import iter_squad_questions, read_json
from tasks.base import fraction_indices

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
HUB_NAMES = ("squad", "squad_v2", "rajpurkar/squad", "rajpurkar/squad_v2")
# How far (in characters, each side) a misaligned answer's text is searched for around its stated
# start; the known SQuAD offset slips are a few characters.
SEARCH_WINDOW = 50
_SHOWN_IDS = 5


# --- sources ---------------------------------------------------------------------------------


def read_squad_json(path: str | Path) -> list[dict[str, Any]]:
    """Flat examples from an official SQuAD JSON file (v1.1 or v2.0)."""
    squad = read_json(path, "SQuAD")
    return [
        {key: question[key] for key in ("id", "title", "context", "question", "answers")}
        for question in iter_squad_questions(squad, str(path))
    ]


def _flat_answers(answers: Any, where: str) -> dict[str, list[Any]]:
    """Answers as ``{text: [...], answer_start: [...]}`` from either accepted JSON Lines shape."""
    if isinstance(answers, Mapping):
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(
                f"{where}: 'answers' should hold equal-length lists 'text' and 'answer_start'"
            )
    elif isinstance(answers, list):
        if not all(isinstance(a, Mapping) and "text" in a and "answer_start" in a for a in answers):
            raise DataError(f"{where}: each item of 'answers' needs 'text' and 'answer_start'")
        texts = [a["text"] for a in answers]
        starts = [a["answer_start"] for a in answers]
    else:
        raise DataError(f"{where}: 'answers' should be an object or a list, got {answers!r}")
    if not all(isinstance(t, str) for t in texts) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in starts
    ):
        raise DataError(f"{where}: answer texts should be strings and answer_start integers")
    return {"text": list(texts), "answer_start": list(starts)}


def read_squad_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Flat examples from JSON Lines, one question per line (blank lines skipped).

    Required fields per line: ``id``, ``question``, ``context``, ``answers``; ``title`` optional.
    """
    examples = []
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"SQuAD file {str(path)!r} does not exist") from err
    with handle:
        for number, line in enumerate(_utf8_lines(handle, path), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where} is not valid JSON: {err}") from err
            if not isinstance(record, Mapping):
                raise DataError(f"{where} should be a JSON object (one question per line)")
            for key in ("id", "question", "context", "answers"):
                if key not in record:
                    raise DataError(
                        f"{where} has no field {key!r} (each line needs id, question, "
                        f"context, answers)"
                    )
            for key in ("question", "context"):
                if not isinstance(record[key], str):
                    raise DataError(f"{where}: field {key!r} should be a string")
            examples.append(
                {
                    "id": str(record["id"]),
                    "title": str(record.get("title", "")),
                    "context": record["context"],
                    "question": record["question"],
                    "answers": _flat_answers(record["answers"], f"{where} (id {record['id']!r})"),
                }
            )
    return examples


def _utf8_lines(handle: Any, path: str | Path) -> list[str]:
    """The lines of a file opened as UTF-8; other bytes are a DataError naming the line."""
    try:
        return handle.read().splitlines()
    except UnicodeDecodeError:
        raw = Path(path).read_bytes()
        line = raw[: _first_bad_byte(raw)].count(b"\n") + 1
        raise DataError(f"{path}:{line} is not UTF-8 text; save the file as UTF-8") from None


def _first_bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start
    return len(raw)


def load_squad_hub(name: str, split: str) -> list[dict[str, Any]]:
    """Flat examples of ``datasets.load_dataset(name, split=split)`` (``squad`` / ``squad_v2``).

    Offline, or for an unknown name or split, raises DataError saying to pass local files.
    """
    import datasets  # heavy; only the hub path needs it

    try:
        rows = datasets.load_dataset(name, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise DataError(
            f"could not load {name!r} split {split!r} from the Hugging Face hub ({err}); "
            f"when offline, pass the official JSON files (train-v2.0.json, dev-v2.0.json) or "
            f"JSON Lines instead"
        ) from err
    return [
        {
            "id": str(row["id"]),
            "title": row.get("title", ""),
            "context": row["context"],
            "question": row["question"],
            "answers": {
                "text": list(row["answers"]["text"]),
                "answer_start": [int(s) for s in row["answers"]["answer_start"]],
            },
        }
        for row in rows
    ]


def read_squad(source: str | Path, split: str = "validation") -> list[dict[str, Any]]:
    """Flat examples from a file (by suffix) or, for a hub name, from the hub's ``split``."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        examples = read_squad_json(path)
    elif suffix in JSONL_SUFFIXES:
        examples = read_squad_jsonl(path)
    elif str(source) in HUB_NAMES:
        examples = load_squad_hub(str(source), split)
    else:
        raise DataError(
            f"SQuAD source {str(source)!r} is neither a .json / .jsonl file nor a hub name "
            f"({', '.join(HUB_NAMES)})"
        )
    _check_unique_ids(examples, str(source))
    if not examples:
        raise DataError(f"SQuAD source {str(source)!r} holds no questions")
    return examples


def _check_unique_ids(examples: Iterable[Mapping[str, Any]], source: str) -> None:
    seen: set[str] = set()
    for example in examples:
        if example["id"] in seen:
            raise DataError(f"{source}: question id {example['id']!r} appears twice")
        seen.add(example["id"])


# --- answer alignment ------------------------------------------------------------------------


@dataclass
class AlignmentReport:
    """What :func:`align_answers` changed; ids are question ids, in data order.

    checked: answers checked. repaired: questions with an answer moved to where its text is.
    dropped: questions that lost an answer whose text is not near its ``answer_start``.
    removed: questions removed because every answer was dropped (keeping them would turn an
    answerable question into a false "no answer").
    """

    checked: int = 0
    repaired: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.repaired or self.dropped)

    def summary(self, source: str) -> str:
        def ids(values: list[str]) -> str:
            more = ", ..." if len(values) > _SHOWN_IDS else ""
            return ", ".join(repr(v) for v in values[:_SHOWN_IDS]) + more

        parts = [f"{source}: {self.checked} answers checked against their context"]
        if self.repaired:
            parts.append(
                f"{len(self.repaired)} questions had answer_start repaired ({ids(self.repaired)})"
            )
        if self.dropped:
            parts.append(
                f"{len(self.dropped)} questions lost an answer whose text is not at or near its "
                f"answer_start ({ids(self.dropped)})"
            )
        if self.removed:
            parts.append(
                f"{len(self.removed)} questions left without answers were removed "
                f"({ids(self.removed)})"
            )
        return "; ".join(parts)


def find_answer_start(
    context: str, text: str, start: int, window: int = SEARCH_WINDOW
) -> int | None:
    """``start`` if ``text`` is there, else the nearest occurrence within ``±window`` characters.

    Returns None when ``text`` is not found in that range (or is empty).
    """
    if not text:
        return None
    if 0 <= start and context[start : start + len(text)] == text:
        return start
    low = max(0, start - window)
    high = min(len(context), start + window + len(text))
    candidates = []
    position = context.find(text, low, high)
    while position != -1:
        candidates.append(position)
        position = context.find(text, position + 1, high)
    return min(candidates, key=lambda p: (abs(p - start), p)) if candidates else None


def align_answers(
    examples: Sequence[Mapping[str, Any]], window: int = SEARCH_WINDOW
) -> tuple[list[dict[str, Any]], AlignmentReport]:
    """Check ``context[answer_start : answer_start + len(text)] == text`` for every answer.

    A misaligned answer is moved to the nearest occurrence of its text within ``±window``
    characters, else dropped from its question's answers; a question that loses all of its
    answers is removed. Nothing changes silently: the report lists every affected question.
    Returns new example dicts (the inputs are not modified) and the report.
    """
    report = AlignmentReport()
    aligned = []
    for example in examples:
        answers = example["answers"]
        texts, starts = [], []
        repaired = dropped = False
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            report.checked += 1
            found = find_answer_start(example["context"], text, start, window)
            if found is None:
                dropped = True
                continue
            repaired |= found != start
            texts.append(text)
            starts.append(found)
        if repaired:
            report.repaired.append(example["id"])
        if dropped:
            report.dropped.append(example["id"])
            if not texts:
                report.removed.append(example["id"])
                continue
        aligned.append({**example, "answers": {"text": texts, "answer_start": starts}})
    return aligned, report


# --- sampling and the one entry point --------------------------------------------------------


def sample_fraction(
    examples: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0
) -> list[Mapping[str, Any]]:
    """A seeded random ``fraction`` of the questions (whole questions, never windows), in data
    order; at least one question. ``fraction = 1`` returns all of them unchanged. The subset is
    :func:`tasks.base.fraction_indices` of the question count, as for every task.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"data_fraction must be in (0, 1], got {fraction}")
    # The rule of every task's data_fraction (GLUE included), so a seed means the same everywhere.
    return [examples[i] for i in fraction_indices(len(examples), fraction, seed)]


def load_squad(
    source: str | Path,
    split: str = "validation",
    *,
    data_fraction: float = 1.0,
    seed: int = 0,
    align: bool = True,
    window: int = SEARCH_WINDOW,
) -> list[dict[str, Any]]:
    """Read ``source`` (see :func:`read_squad`), sample ``data_fraction``, check answer offsets.

    Sampling comes first, so a seed picks the same questions whatever the alignment check later
    removes. Misaligned answers are repaired or dropped by :func:`align_answers` and reported with
    a logged warning that names the first affected question ids.
    """
    examples = sample_fraction(read_squad(source, split), data_fraction, seed)
    if not align:
        return [dict(example) for example in examples]
    aligned, report = align_answers(examples, window)
    if report.changed:
        log.warning(report.summary(str(source)))
    return aligned
