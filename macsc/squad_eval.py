"""SQuAD v1.1 / v2.0 evaluation, written from the definitions of the official scripts.

The scores match the official ``evaluate-v1.1.py`` and ``evaluate-v2.0.py`` (same normalisation,
same keys, same best-threshold search); ``macsc squad-eval`` prints the same JSON. The same
functions compute the validation metrics during training, so there is one definition of EM/F1.

Definitions:

- ``normalize_answer``: lower case, drop ASCII punctuation, drop the articles a/an/the (as whole
  words), collapse whitespace.
- EM: the normalised strings are equal. F1: token F1 over the normalised, whitespace-split tokens
  (bag-of-words overlap). Each question scores the maximum over its gold answers.
- v2.0 only: gold answers that normalise to ``""`` are ignored, a question left with none is
  unanswerable (gold ``[""]``), and F1 of two empty token lists is 1 (of one empty list, 0).
  v1.1 keeps every gold answer and its F1 of no shared tokens is 0.
- v2.0 with no-answer probabilities ``na_probs``: a question whose ``na_prob > na_prob_thresh`` is
  predicted unanswerable and scores 1 exactly when it has no gold answer. ``best_thresholds``
  searches the threshold that maximises the score over the sorted ``na_probs``.
- v2.0 precision–recall (``precision_recall_curve``): answer the questions in increasing
  ``na_prob`` order; wherever a threshold can fall (after the last of a run of equal ``na_prob``),
  precision = credit / questions answered and recall = credit / answerable questions, where credit
  sums the raw scores of the answerable questions answered so far. The curve starts at (recall 0,
  precision 1); AP is the step area, sum of precision x recall gained, in percent. ``pr_exact`` and
  ``pr_f1`` use the raw EM / F1; ``pr_oracle`` credits every answerable question 1, so it measures
  only how well ``na_prob`` separates answerable from unanswerable questions.

Where the official scripts differ from each other or fail, a choice here:

- a question absent from the predictions is an error (:class:`DataError` with the count and the
  first ids), because a silently partial file makes every score wrong without anyone noticing;
  with ``missing_as_wrong`` it scores 0 at every no-answer threshold, as v1.1 does (v2.0 crashes);
- a question id that appears twice in the data is an error (v1.1 scores each occurrence, v2.0 keeps
  the last one).

``macsc squad-eval`` takes both scripts' arguments and v2.0's flags (``-o -n -t -p -v``); see
:func:`build_parser`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import string
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from macsc.errors import ConfigError, DataError, MacscError

VERSIONS = ("1.1", "2.0")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
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


# --- normalisation and per-answer scores -----------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, then articles, then collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """The normalised whitespace tokens of ``text`` (``[]`` for an empty answer)."""
    return normalize_answer(text).split()


def exact_score(prediction: str, gold: str) -> int:
    """1 when the normalised strings are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, *, empty_matches_empty: bool = True) -> float:
    """Token F1 of the normalised answers.

    empty_matches_empty: the v2.0 rule — when either side has no tokens, the score is 1 if both
        are empty and 0 otherwise. With ``False`` (v1.1), no shared token means 0 even for two
        empty answers.
    """
    pred_tokens, gold_tokens = answer_tokens(prediction), answer_tokens(gold)
    if empty_matches_empty and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    shared = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# --- reading the official format -------------------------------------------------------------


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


def missing_ids(golds: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
    """The question ids of ``golds`` (in data order) that ``values`` has no entry for."""
    return [qid for qid in golds if qid not in values]


def _require_ids(golds: Mapping[str, Any], values: Mapping[str, Any], what: str) -> None:
    """Raise a DataError listing the count and first ids of questions absent from ``values``."""
    missing = missing_ids(golds, values)
    if missing:
        raise DataError(
            f"{what} miss {len(missing)} of {len(golds)} question ids ({ids_excerpt(missing)}); "
            f"give a value for every question of the data file"
        )


def _check_predictions(
    golds: Mapping[str, Any], predictions: Mapping[str, Any], missing_as_wrong: bool
) -> None:
    missing = missing_ids(golds, predictions)
    if missing and not missing_as_wrong:
        raise DataError(
            f"the predictions miss {len(missing)} of {len(golds)} question ids "
            f'({ids_excerpt(missing)}); give an answer ("" for none) for every question of the '
            f"data file, or score the missing ones 0 with --missing-as-wrong"
        )
    for qid in golds:
        if qid in predictions and not isinstance(predictions[qid], str):
            raise DataError(
                f"the prediction for question {excerpt(qid)} should be a string (the answer "
                f"text), got {type(predictions[qid]).__name__}"
            )


# --- v1.1 ------------------------------------------------------------------------------------


def score_v1(
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    missing_as_wrong: bool = False,
) -> dict[str, float]:
    """Official v1.1 scores ``{"exact_match": %, "f1": %}`` of ``golds`` (see :func:`gold_answers`).

    predictions: question id -> answer text. A question without one is an error, or with
    ``missing_as_wrong`` scores 0 (and still counts in the total), as the official v1.1 script.
    """
    _check_predictions(golds, predictions, missing_as_wrong)
    exact = f1 = 0.0
    for qid, answers in golds.items():
        if not answers:
            raise DataError(
                f"question {excerpt(qid)} has no gold answer; v1.1 needs one for every question "
                f"(use --version 2.0 for data with unanswerable questions)"
            )
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        exact += max(exact_score(prediction, gold) for gold in answers)
        f1 += max(f1_score(prediction, gold, empty_matches_empty=False) for gold in answers)
    return {"exact_match": 100.0 * exact / len(golds), "f1": 100.0 * f1 / len(golds)}


def evaluate_v1(
    dataset: Any,
    predictions: Mapping[str, str],
    *,
    source: str = "data",
    missing_as_wrong: bool = False,
) -> dict[str, float]:
    """Official v1.1 scores: ``{"exact_match": %, "f1": %}`` (percentages, 0–100).

    dataset: see :func:`gold_answers` (``source`` names it in errors). predictions: question id ->
    answer text, every id present unless ``missing_as_wrong`` (see :func:`score_v1`).
    """
    golds = gold_answers(dataset, source)
    return score_v1(golds, predictions, missing_as_wrong=missing_as_wrong)


# --- v2.0 ------------------------------------------------------------------------------------


def raw_scores_v2(
    golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question (exact, f1) before any no-answer threshold, with the v2.0 gold rule.

    A question absent from ``predictions`` scores 0 on both.
    """
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    for qid, answers in golds.items():
        if qid not in predictions:
            exact[qid], f1[qid] = 0, 0.0
            continue
        answers = [text for text in answers if normalize_answer(text)] or [""]
        prediction = predictions[qid]
        exact[qid] = max(exact_score(prediction, gold) for gold in answers)
        f1[qid] = max(f1_score(prediction, gold) for gold in answers)
    return exact, f1


def apply_na_threshold(
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
    na_prob_thresh: float,
    unanswered: Collection[str] = (),
) -> dict[str, float]:
    """Scores after predicting "no answer" wherever ``na_prob > na_prob_thresh``.

    unanswered: questions without a prediction; they keep their score (0) at every threshold.
    """
    return {
        qid: float(not has_answer[qid])
        if qid not in unanswered and na_probs[qid] > na_prob_thresh
        else score
        for qid, score in scores.items()
    }


def _score_summary(
    scores: Sequence[Mapping[str, float]], qids: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    exact, f1 = scores
    total = len(qids)
    return {
        f"{prefix}exact": 100.0 * sum(exact[qid] for qid in qids) / total,
        f"{prefix}f1": 100.0 * sum(f1[qid] for qid in qids) / total,
        f"{prefix}total": total,
    }


def best_threshold(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """The best score (%) over no-answer thresholds, and that threshold.

    Start from "every question unanswerable" (score = number of unanswerable questions, threshold
    0.0), then answer questions in increasing ``na_prob`` order (a stable sort, so ties keep the
    order of ``na_probs``): an answerable question adds its raw score, an unanswerable one loses 1
    if its prediction is a non-empty string. The threshold is the ``na_prob`` of the question at
    which the running score was highest (first reached). Ids of ``na_probs`` that are not in
    ``scores`` are skipped; a question of ``scores`` absent from ``predictions`` scores 0 at every
    threshold.
    """
    running = best = sum(1 for qid in scores if not has_answer[qid] and qid in predictions)
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda key: na_probs[key]):
        if qid not in scores or qid not in predictions:
            continue
        if has_answer[qid]:
            running += scores[qid]
        elif predictions[qid]:
            running -= 1
        if running > best:
            best, threshold = running, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def best_thresholds(
    predictions: Mapping[str, str],
    exact: Mapping[str, float],
    f1: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> dict[str, float]:
    """``best_exact``, ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` from raw scores."""
    best_exact, exact_thresh = best_threshold(predictions, exact, na_probs, has_answer)
    best_f1, f1_thresh = best_threshold(predictions, f1, na_probs, has_answer)
    return {
        "best_exact": best_exact,
        "best_exact_thresh": exact_thresh,
        "best_f1": best_f1,
        "best_f1_thresh": f1_thresh,
    }


class PrecisionRecall(NamedTuple):
    """One precision–recall curve: points in threshold order, and its average precision (%)."""

    precisions: list[float]
    recalls: list[float]
    average_precision: float


def precision_recall_curve(
    scores: Mapping[str, float], na_probs: Mapping[str, float], has_answer: Mapping[str, bool]
) -> PrecisionRecall:
    """The official v2.0 precision–recall curve of answering in increasing ``na_prob`` order.

    scores: the credit of each question if answered (only answerable questions earn any);
    na_probs: question id -> no-answer probability, ids not in ``scores`` ignored; has_answer:
    every question of ``scores``, at least one True. Points: (recall 0, precision 1), then one
    after each run of equal ``na_prob`` with precision = credit / answered and recall = credit /
    answerable. AP = sum of precision x (recall - previous recall), in percent.
    """
    answerable = sum(1 for qid in scores if has_answer[qid])
    order = sorted((qid for qid in na_probs if qid in scores), key=lambda key: na_probs[key])
    precisions, recalls = [1.0], [0.0]
    credit = area = 0.0
    for answered, qid in enumerate(order, start=1):
        if has_answer[qid]:
            credit += scores[qid]
        if answered < len(order) and na_probs[order[answered]] == na_probs[qid]:
            continue  # no threshold separates this question from the next one
        precision, recall = credit / answered, credit / answerable
        area += precision * (recall - recalls[-1])
        precisions.append(precision)
        recalls.append(recall)
    return PrecisionRecall(precisions, recalls, 100.0 * area)


def _v2_inputs(
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None,
    missing_as_wrong: bool,
) -> tuple[dict[str, bool], list[str], Mapping[str, float]]:
    """Check the inputs; return has_answer, the unanswered ids and the na_probs to use.

    Without ``na_probs`` every ``na_prob`` is 0. An unanswered question (``missing_as_wrong``)
    needs no ``na_prob``; one it lacks is +inf, so the precision–recall walk answers it last.
    """
    _check_predictions(golds, predictions, missing_as_wrong)
    unanswered = missing_ids(golds, predictions)
    if na_probs is None:
        na_values: Mapping[str, float] = dict.fromkeys(golds, 0.0)
    else:
        answered = {qid: golds[qid] for qid in golds if qid in predictions}
        _require_ids(answered, na_probs, "the no-answer probabilities")
        na_values = {**na_probs, **{q: math.inf for q in unanswered if q not in na_probs}}
    has_answer = {qid: bool(answers) for qid, answers in golds.items()}
    return has_answer, unanswered, na_values


def score_v2(
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
    *,
    missing_as_wrong: bool = False,
) -> dict[str, float]:
    """Official v2.0 scores of ``golds`` (see :func:`gold_answers`); see :func:`evaluate_v2`."""
    has_answer, unanswered, na_values = _v2_inputs(golds, predictions, na_probs, missing_as_wrong)
    exact_raw, f1_raw = raw_scores_v2(golds, predictions)
    thresholded = [
        apply_na_threshold(raw, na_values, has_answer, na_prob_thresh, set(unanswered))
        for raw in (exact_raw, f1_raw)
    ]
    result = _score_summary(thresholded, list(golds))
    has_ans_qids = [qid for qid, has in has_answer.items() if has]
    no_ans_qids = [qid for qid, has in has_answer.items() if not has]
    if has_ans_qids:
        result.update(_score_summary(thresholded, has_ans_qids, "HasAns_"))
    if no_ans_qids:
        result.update(_score_summary(thresholded, no_ans_qids, "NoAns_"))
    if na_probs is not None:
        result.update(best_thresholds(predictions, exact_raw, f1_raw, na_values, has_answer))
    return result


def precision_recall_curves(
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float],
    *,
    missing_as_wrong: bool = False,
) -> dict[str, PrecisionRecall]:
    """The official v2.0 ``pr_exact``, ``pr_f1`` and ``pr_oracle`` curves (see the module text).

    Empty when no question is answerable (the official script then adds no ``pr_*`` key).
    """
    has_answer, _, na_values = _v2_inputs(golds, predictions, na_probs, missing_as_wrong)
    if not any(has_answer.values()):
        return {}
    exact_raw, f1_raw = raw_scores_v2(golds, predictions)
    oracle = {qid: float(has) for qid, has in has_answer.items()}
    return {
        name: precision_recall_curve(scores, na_values, has_answer)
        for name, scores in (("pr_exact", exact_raw), ("pr_f1", f1_raw), ("pr_oracle", oracle))
    }


def evaluate_v2(
    dataset: Any,
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
    *,
    source: str = "data",
    missing_as_wrong: bool = False,
) -> dict[str, float]:
    """Official v2.0 scores (percentages) with the official keys, in the official order.

    Always ``exact``, ``f1``, ``total``; ``HasAns_*`` / ``NoAns_*`` when the data has answerable /
    unanswerable questions; with ``na_probs`` also ``best_exact``, ``best_exact_thresh``,
    ``best_f1``, ``best_f1_thresh``.

    dataset: see :func:`gold_answers` (``source`` names it in errors). predictions: question id ->
    answer text (``""`` = no answer), every id present unless ``missing_as_wrong``: then a
    question without a prediction scores 0 at every threshold (and in the best-threshold search).
    na_probs: question id -> no-answer probability or score (higher = more likely unanswerable),
    every answered id present; without it every ``na_prob`` is 0.
    """
    golds = gold_answers(dataset, source)
    return score_v2(golds, predictions, na_probs, na_prob_thresh, missing_as_wrong=missing_as_wrong)


# --- files -----------------------------------------------------------------------------------


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


# --- images (v2.0 -p) ------------------------------------------------------------------------

PR_TITLES = {
    "pr_exact": "Precision-Recall curve for Exact Match score",
    "pr_f1": "Precision-Recall curve for F1 score",
    "pr_oracle": "Oracle Precision-Recall curve (binary task of HasAns vs. NoAns)",
}


def _new_figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure()
    FigureCanvasAgg(figure)  # Agg: no display needed, and pyplot's global state stays untouched
    return figure


def plot_precision_recall(curve: PrecisionRecall, path: Path, title: str) -> None:
    """The curve as a filled step plot (precision held until the next recall), PNG at ``path``."""
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.step(curve.recalls, curve.precisions, where="post", color="b", alpha=0.2)
    axes.fill_between(curve.recalls, curve.precisions, step="post", color="b", alpha=0.2)
    axes.set(xlabel="Recall", ylabel="Precision", xlim=(0.0, 1.05), ylim=(0.0, 1.05), title=title)
    figure.savefig(path)


def plot_na_prob_histogram(values: Sequence[float], path: Path, name: str) -> None:
    """Share of questions per no-answer probability bin (20 bins over [0, 1]; values outside
    are not drawn, as in the official script), PNG at ``path``."""
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(values, bins=20, range=(0.0, 1.0), weights=[1.0 / len(values)] * len(values))
    axes.set(
        xlabel="Model probability of no-answer",
        ylabel="Proportion of dataset",
        title=f"Histogram of no-answer probability: {name}",
    )
    figure.savefig(path)


def write_images(
    image_dir: str,
    curves: Mapping[str, PrecisionRecall],
    golds: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float],
) -> list[Path]:
    """``pr_exact.png``, ``pr_f1.png``, ``pr_oracle.png`` (when there are curves) and
    ``na_prob_hist_hasAns.png`` / ``na_prob_hist_noAns.png`` (when the group has questions with a
    no-answer probability) into ``image_dir`` (created); returns the files written."""
    folder = Path(image_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"-p/--out-image-dir {image_dir!r} cannot be created: {err}") from err
    written = []
    for name, curve in curves.items():
        written.append(folder / f"{name}.png")
        plot_precision_recall(curve, written[-1], PR_TITLES[name])
    for name, answerable in (("hasAns", True), ("noAns", False)):
        values = [
            na_probs[q] for q, gold in golds.items() if bool(gold) == answerable and q in na_probs
        ]
        if values:
            written.append(folder / f"na_prob_hist_{name}.png")
            plot_na_prob_histogram(values, written[-1], name)
    return written


# --- command line ----------------------------------------------------------------------------

EPILOG = """\
A drop-in for the official scripts: the arguments of evaluate-v1.1.py and evaluate-v2.0.py
(DATA_JSON PRED_JSON) and v2.0's flags -o -n -t -p -v. The scoring rules follow the data file's
'version' field (override with --version). The metrics are printed as one JSON object, last on
stdout, with the official keys: v1.1 exact_match, f1; v2.0 exact, f1, total, HasAns_*, NoAns_*,
with -n best_exact, best_exact_thresh, best_f1, best_f1_thresh, with -n and -p pr_exact_ap,
pr_f1_ap, pr_oracle_ap. Warnings and -v details go to stderr.

Where the official scripts differ or fail:
  - a question missing from PRED_JSON is an error naming the first ids; --missing-as-wrong
    scores it 0 instead, with a warning (official v1.1 does that; v2.0 crashes). In v2.0 it is
    wrong at every no-answer threshold (best_* too) and, without a probability in -n, the
    precision-recall curves answer it last;
  - a question id that appears twice in DATA_JSON is an error (v1.1 scores every occurrence,
    v2.0 keeps the last);
  - -o writes the metrics to the file and still prints them;
  - -p without -n draws nothing, as the official script, but says so on stderr.
DATA_JSON may also be JSON Lines of flat examples ({"id", "answers": {"text": [...]}} per line).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc squad-eval",
        description="Score SQuAD predictions exactly as the official v1.1 / v2.0 scripts do.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data_file", metavar="DATA_JSON", help="official SQuAD JSON (dev set)")
    parser.add_argument("pred_file", metavar="PRED_JSON", help="predictions {question id: text}")
    parser.add_argument(
        "-o",
        "--out-file",
        metavar="FILE",
        help="also write the metrics JSON to FILE (the official v2.0 script writes it instead)",
    )
    parser.add_argument(
        "-n",
        "--na-prob-file",
        metavar="NA_PROB_JSON",
        help="v2.0: no-answer probabilities {question id: number}; adds the best_* keys",
    )
    parser.add_argument(
        "-t",
        "--na-prob-thresh",
        type=float,
        default=None,
        metavar="T",
        help="v2.0: predict no answer where the no-answer probability is above T (default 1.0)",
    )
    parser.add_argument(
        "-p",
        "--out-image-dir",
        metavar="DIR",
        help="v2.0 with -n: save the precision-recall curves (pr_exact/pr_f1/pr_oracle.png, "
        "adding their *_ap keys) and na-prob histograms (na_prob_hist_hasAns/noAns.png) to DIR",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="say what was read and written, on stderr"
    )
    parser.add_argument(
        "--missing-as-wrong",
        action="store_true",
        help="score a question missing from PRED_JSON 0 (warning on stderr) instead of stopping",
    )
    parser.add_argument(
        "--version",
        choices=VERSIONS,
        default=None,
        help="evaluation script to follow (default: the data file's 'version' field, else 2.0)",
    )
    return parser


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _check_options(args: argparse.Namespace, version: str) -> None:
    if version == "2.0":
        return
    for given, flag in (
        (args.na_prob_file, "-n/--na-prob-file"),
        (args.na_prob_thresh is not None, "-t/--na-prob-thresh"),
        (args.out_image_dir, "-p/--out-image-dir"),
    ):
        if given:
            raise ConfigError(f"{flag} applies to SQuAD v2.0 only; drop it or use --version 2.0")


def _warn_missing(golds: Mapping[str, Any], predictions: Mapping[str, Any], verbose: bool) -> None:
    missing = missing_ids(golds, predictions)
    if missing:
        shown = ", ".join(map(repr, missing)) if verbose else ids_excerpt(missing)
        _note(
            f"macsc: warning: the predictions miss {len(missing)} of {len(golds)} question ids "
            f"({shown}); they score 0 (--missing-as-wrong)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``macsc squad-eval DATA_JSON PRED_JSON [-o FILE] [-n NA_PROB_JSON] [-t T] [-p DIR] [-v]
    [--missing-as-wrong] [--version 2.0|1.1]``: print the official JSON to stdout and return 0.

    Bad input raises :class:`MacscError` (DataError / ConfigError) with a one-line message naming
    the file, the field or the question ids, and quoting at most :data:`EXCERPT_CHARS` characters
    of any file.
    """
    args = build_parser().parse_args(argv)
    files = {
        "DATA_JSON": (args.data_file, read_data(args.data_file)),
        "PRED_JSON": (args.pred_file, read_json(args.pred_file, "predictions")),
    }
    if args.na_prob_file:
        files["NA_PROB_JSON"] = (
            args.na_prob_file,
            read_json(args.na_prob_file, "no-answer probabilities"),
        )
    squad = files["DATA_JSON"][1]
    if json_kind(squad) not in _EXPECTED_KINDS["DATA_JSON"]:
        check_file_order(files)  # e.g. the predictions first: say so before parsing them as data
    golds = gold_answers(squad, args.data_file)
    check_file_order(files)
    predictions = _mapping_file(args.pred_file, files["PRED_JSON"][1], "predictions", str)
    version = _version_of(squad, args.version)
    _check_options(args, version)
    na_probs = None
    if args.na_prob_file:
        na_probs = _mapping_file(
            args.na_prob_file, files["NA_PROB_JSON"][1], "no-answer probabilities", (int, float)
        )
    if args.verbose:
        answerable = sum(1 for answers in golds.values() if answers)
        extra = sum(1 for qid in predictions if qid not in golds)
        _note(
            f"squad-eval: v{version} rules; {len(golds)} questions ({answerable} answerable, "
            f"{len(golds) - answerable} unanswerable) in {args.data_file!r}; "
            f"{len(predictions)} predictions in {args.pred_file!r} ({extra} not in the data, "
            f"ignored)"
        )
    if args.missing_as_wrong:
        _warn_missing(golds, predictions, args.verbose)
    try:
        if version == "1.1":
            metrics = score_v1(golds, predictions, missing_as_wrong=args.missing_as_wrong)
            text = json.dumps(metrics)
        else:
            metrics = _score_v2_command(args, golds, predictions, na_probs)
            text = json.dumps(metrics, indent=2)
    except DataError as err:
        raise DataError(f"scoring {args.pred_file}: {err}") from err
    if args.out_file:
        try:
            Path(args.out_file).write_text(text + "\n", encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"-o/--out-file {args.out_file!r} cannot be written: {err}") from err
        if args.verbose:
            _note(f"squad-eval: wrote the metrics to {args.out_file!r}")
    print(text)
    return 0


def _score_v2_command(
    args: argparse.Namespace,
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None,
) -> dict[str, float]:
    """v2.0 metrics, plus the ``pr_*_ap`` keys and the images for ``-p`` (which needs ``-n``)."""
    threshold = 1.0 if args.na_prob_thresh is None else args.na_prob_thresh
    missing_as_wrong = args.missing_as_wrong
    metrics = score_v2(golds, predictions, na_probs, threshold, missing_as_wrong=missing_as_wrong)
    if not args.out_image_dir:
        return metrics
    if na_probs is None:
        _note(
            "macsc: warning: -p/--out-image-dir needs -n/--na-prob-file (the curves rank the "
            "questions by no-answer probability); no images written"
        )
        return metrics
    curves = precision_recall_curves(
        golds, predictions, na_probs, missing_as_wrong=missing_as_wrong
    )
    metrics.update({f"{name}_ap": curve.average_precision for name, curve in curves.items()})
    written = write_images(args.out_image_dir, curves, golds, na_probs)
    if args.verbose:
        _note(
            f"squad-eval: wrote {', '.join(path.name for path in written)} to {args.out_image_dir!r}"
        )
    return metrics


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MacscError as error:
        print(f"macsc: error: {error}", file=sys.stderr)
        sys.exit(2)
