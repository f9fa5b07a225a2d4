"""Reading SQuAD files: the official dataset JSON, predictions and no-answer probabilities (JSON
or JSON Lines), their checks, and telling which file is which when they are given out of order."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from macsc.errors import DataError

_SHOWN_IDS = 5


# The most characters of a file's content that any message quotes: a swapped argument must not
# paste a megabyte data file into the terminal.
EXCERPT_CHARS = 80


JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` marks the cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ids_excerpt(ids: Sequence[Any], limit: int = EXCERPT_CHARS) -> str:
    """The first few ids, quoted, as many as fit in ``limit`` characters (at least one, cut)."""
    shown = excerpt(ids[0], limit) if ids else ""
    count = 1
    for qid in ids[1:_SHOWN_IDS]:
        longer = f"{shown}, {qid!r}"
        if len(longer) > limit:
            break
        shown, count = longer, count + 1
    return shown + (", ..." if count < len(ids) else "")


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[key]``, checked to be of ``kind``; a DataError names the JSON path otherwise."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where} should be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where} has no field {key!r}; is this a SQuAD-format JSON file?")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}.{key} should be {names}, got {type(value).__name__}")
    return value


def iter_squad_questions(squad: Any, source: str = "data") -> Iterator[dict[str, Any]]:
    """Walk an official SQuAD JSON (the whole object or its ``data`` list), one question at a time.

    Yields ``{id, title, context, question, answers: {text: [str], answer_start: [int]},
    is_impossible}``. A missing or mistyped field raises :class:`DataError` naming ``source`` and
    the JSON path (``data[0].paragraphs[3].qas[1].answers``) and, once known, the question id.
    """
    articles = _field(squad, "data", list, source) if isinstance(squad, Mapping) else squad
    if not isinstance(articles, list):
        raise DataError(f"{source} should hold a 'data' list of articles (official SQuAD format)")
    for a, article in enumerate(articles):
        where = f"{source}: data[{a}]"
        title = article.get("title", "") if isinstance(article, Mapping) else ""
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where)):
            p_where = f"{where}.paragraphs[{p}]"
            context = _field(paragraph, "context", str, p_where)
            for q, qa in enumerate(_field(paragraph, "qas", list, p_where)):
                q_where = f"{p_where}.qas[{q}]"
                qid = _field(qa, "id", (str, int), q_where)
                q_where = f"{q_where} (id {excerpt(qid)})"
                texts, starts = [], []
                for n, answer in enumerate(_field(qa, "answers", list, q_where)):
                    texts.append(_field(answer, "text", str, f"{q_where}.answers[{n}]"))
                    starts.append(_field(answer, "answer_start", int, f"{q_where}.answers[{n}]"))
                yield {
                    "id": str(qid),
                    "title": title,
                    "context": context,
                    "question": _field(qa, "question", str, q_where),
                    "answers": {"text": texts, "answer_start": starts},
                    "is_impossible": bool(qa.get("is_impossible", False)),
                }


def gold_answers(dataset: Any, source: str = "data") -> dict[str, list[str]]:
    """Map question id -> gold answer texts, in the data's order.

    dataset: an official SQuAD JSON object, its ``data`` list, or flat examples
        (``[{id, answers: {text: [...]}}]`` as produced by ``tasks.squad_data``).
    """
    is_flat = (
        isinstance(dataset, list)
        and bool(dataset)
        and isinstance(dataset[0], Mapping)
        and "paragraphs" not in dataset[0]
    )
    if is_flat:
        questions: Iterator[Mapping[str, Any]] = iter(dataset)
    else:
        questions = iter_squad_questions(dataset, source)
    golds: dict[str, list[str]] = {}
    for n, question in enumerate(questions):
        qid = str(_field(question, "id", (str, int), f"{source}[{n}]"))
        where = f"{source}[{n}] (id {excerpt(qid)})"
        answers = _field(question, "answers", (Mapping, list), where)
        if isinstance(answers, Mapping):
            texts = _field(answers, "text", list, f"{where}.answers")
        else:
            texts = [_field(a, "text", str, f"{where}.answers[{i}]") for i, a in enumerate(answers)]
        if qid in golds:
            raise DataError(
                f"{source}: question id {excerpt(qid)} appears twice; ids must be unique"
            )
        golds[qid] = list(texts)
    if not golds:
        raise DataError(f"{source} holds no questions")
    return golds


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing or unparsable file is a DataError naming it and ``what``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise DataError(f"{what} file {str(path)!r} does not exist") from err
    except json.JSONDecodeError as err:
        hint = ""
        if Path(path).suffix.lower() in JSONL_SUFFIXES:
            hint = " (JSON Lines are read only as DATA_JSON; predictions are one JSON object)"
        raise DataError(f"{what} file {str(path)!r} is not valid JSON: {err}{hint}") from err
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise DataError(
            f"{what} file {str(path)!r} line {line} is not UTF-8 text (byte "
            f"{err.object[err.start : err.start + 1]!r}); save it as UTF-8"
        ) from err


def read_json_lines(path: str | Path, what: str) -> list[Any]:
    """Parse a JSON Lines file (blank lines skipped) into a list of its values."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{what} file {str(path)!r} does not exist") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{what} file {str(path)!r} line {line} is not UTF-8 text") from err
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{what} file {str(path)!r} line {number}: {err}") from err
    return values


def read_data(path: str | Path) -> Any:
    """The data file: official SQuAD JSON, or JSON Lines of flat examples (by suffix)."""
    if Path(path).suffix.lower() in JSONL_SUFFIXES:
        return read_json_lines(path, "SQuAD data")
    return read_json(path, "SQuAD data")


KINDS = {
    "dataset": "a SQuAD dataset",
    "examples": "SQuAD examples (one object per question)",
    "predictions": "a predictions file ({question id: answer})",
    "na_probs": "a no-answer probability file ({question id: number})",
}


def json_kind(value: Any) -> str | None:
    """Which of :data:`KINDS` a parsed file looks like, or None when it is none of them.

    A dataset is an object with a ``data`` list (or that list: articles with ``paragraphs``);
    examples are a list of objects with ``id`` and ``answers``; a predictions file is a non-empty
    flat object of strings; a no-answer probability file one of numbers.
    """
    if isinstance(value, Mapping):
        if isinstance(value.get("data"), list):
            return "dataset"
        if value and all(isinstance(v, str) for v in value.values()):
            return "predictions"
        if value and all(_is_number(v) for v in value.values()):
            return "na_probs"
        return None
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        if "paragraphs" in value[0]:
            return "dataset"
        if "id" in value[0] and "answers" in value[0]:
            return "examples"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


USAGE_ORDER = "macsc squad-eval DATA_JSON PRED_JSON [-n NA_PROB_JSON]"


_EXPECTED_KINDS = {
    "DATA_JSON": ("dataset", "examples"),
    "PRED_JSON": ("predictions",),
    "NA_PROB_JSON": ("na_probs",),
}


def check_file_order(files: Mapping[str, tuple[str, Any]]) -> None:
    """Raise a short DataError when a file looks like one that belongs in another place.

    files: role (``DATA_JSON``, ``PRED_JSON``, ``NA_PROB_JSON``) -> (path, parsed content). The
    message names each misplaced file and what it looks like, then the expected order; it never
    quotes the files.
    """
    misplaced = []
    for role, (path, value) in files.items():
        kind = json_kind(value)
        if kind is not None and kind not in _EXPECTED_KINDS[role]:
            misplaced.append((role, path, kind))
    if not misplaced:
        return
    parts = [f"{role} {path!r} looks like {KINDS[kind]}" for role, path, kind in misplaced[:1]]
    parts += [f"{role} {path!r} like {KINDS[kind]}" for role, path, kind in misplaced[1:]]
    raise DataError(f"{' and '.join(parts)}; the order is: {USAGE_ORDER}")


def _mapping_file(path: str, value: Any, what: str, kind: type | tuple[type, ...]) -> dict:
    """``value`` (read from ``path``) checked to be one object {question id: ``kind``}."""
    if not isinstance(value, dict):
        raise DataError(f"{what} file {path!r} should hold one JSON object {{question id: value}}")
    for qid, item in value.items():
        if not isinstance(item, kind) or isinstance(item, bool):
            raise DataError(
                f"{what} file {path!r}: the value for question {excerpt(qid)} is "
                f"{excerpt(item)}, not a {kind.__name__ if isinstance(kind, type) else 'number'}"
            )
    return value


def _version_of(squad: Any, requested: str | None) -> str:
    """``--version`` when given, else the data file's own ``version`` field (default 2.0)."""
    if requested is not None:
        return requested
    declared = str(squad.get("version", "")) if isinstance(squad, Mapping) else ""
    return "1.1" if declared.lstrip("v").startswith("1") else "2.0"
