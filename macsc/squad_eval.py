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

One deliberate difference: the official scripts warn about (v2.0) or score as zero (v1.1) a
question with no prediction; here a predictions file that misses question ids is an error
(:class:`DataError` with the count and the first ids), because a silently partial file makes every
score wrong without anyone noticing.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import string
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError, DataError, MacscError

VERSIONS = ("1.1", "2.0")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_SHOWN_IDS = 5


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
                q_where = f"{q_where} (id {qid!r})"
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
        where = f"{source}[{n}] (id {qid!r})"
        answers = _field(question, "answers", (Mapping, list), where)
        if isinstance(answers, Mapping):
            texts = _field(answers, "text", list, f"{where}.answers")
        else:
            texts = [_field(a, "text", str, f"{where}.answers[{i}]") for i, a in enumerate(answers)]
        if qid in golds:
            raise DataError(f"{source}: question id {qid!r} appears twice; ids must be unique")
        golds[qid] = list(texts)
    if not golds:
        raise DataError(f"{source} holds no questions")
    return golds


def _require_ids(golds: Mapping[str, Any], values: Mapping[str, Any], what: str) -> None:
    """Raise a DataError listing the count and first ids of questions absent from ``values``."""
    missing = [qid for qid in golds if qid not in values]
    if missing:
        shown = ", ".join(repr(qid) for qid in missing[:_SHOWN_IDS])
        more = ", ..." if len(missing) > _SHOWN_IDS else ""
        raise DataError(
            f"{what} miss {len(missing)} of {len(golds)} question ids ({shown}{more}); "
            f"give a value for every question of the data file"
        )


def _check_predictions(golds: Mapping[str, Any], predictions: Mapping[str, Any]) -> None:
    _require_ids(golds, predictions, "the predictions")
    for qid in golds:
        if not isinstance(predictions[qid], str):
            raise DataError(
                f"the prediction for question {qid!r} should be a string (the answer text), "
                f"got {type(predictions[qid]).__name__}"
            )


# --- v1.1 ------------------------------------------------------------------------------------


def evaluate_v1(
    dataset: Any, predictions: Mapping[str, str], *, source: str = "data"
) -> dict[str, float]:
    """Official v1.1 scores: ``{"exact_match": %, "f1": %}`` (percentages, 0–100).

    dataset: see :func:`gold_answers` (``source`` names it in errors). predictions: question id ->
    answer text, every id present.
    """
    golds = gold_answers(dataset, source)
    _check_predictions(golds, predictions)
    exact = f1 = 0.0
    for qid, answers in golds.items():
        if not answers:
            raise DataError(
                f"question {qid!r} has no gold answer; v1.1 needs one for every question "
                f"(use --version 2.0 for data with unanswerable questions)"
            )
        prediction = predictions[qid]
        exact += max(exact_score(prediction, gold) for gold in answers)
        f1 += max(f1_score(prediction, gold, empty_matches_empty=False) for gold in answers)
    return {"exact_match": 100.0 * exact / len(golds), "f1": 100.0 * f1 / len(golds)}


# --- v2.0 ------------------------------------------------------------------------------------


def raw_scores_v2(
    golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question (exact, f1) before any no-answer threshold, with the v2.0 gold rule."""
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    for qid, answers in golds.items():
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
) -> dict[str, float]:
    """Scores after predicting "no answer" wherever ``na_prob > na_prob_thresh``."""
    return {
        qid: float(not has_answer[qid]) if na_probs[qid] > na_prob_thresh else score
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
    ``scores`` are skipped.
    """
    running = best = sum(1 for qid in scores if not has_answer[qid])
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda key: na_probs[key]):
        if qid not in scores:
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


def evaluate_v2(
    dataset: Any,
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
    *,
    source: str = "data",
) -> dict[str, float]:
    """Official v2.0 scores (percentages) with the official keys, in the official order.

    Always ``exact``, ``f1``, ``total``; ``HasAns_*`` / ``NoAns_*`` when the data has answerable /
    unanswerable questions; with ``na_probs`` also ``best_exact``, ``best_exact_thresh``,
    ``best_f1``, ``best_f1_thresh``.

    dataset: see :func:`gold_answers` (``source`` names it in errors). predictions: question id ->
    answer text (``""`` = no answer), every id present. na_probs: question id -> no-answer
    probability or score (higher = more likely unanswerable), every id present; without it every
    ``na_prob`` is 0.
    """
    golds = gold_answers(dataset, source)
    _check_predictions(golds, predictions)
    if na_probs is None:
        na_values: Mapping[str, float] = dict.fromkeys(predictions, 0.0)
    else:
        _require_ids(golds, na_probs, "the no-answer probabilities")
        na_values = na_probs
    has_answer = {qid: bool(answers) for qid, answers in golds.items()}
    exact_raw, f1_raw = raw_scores_v2(golds, predictions)
    thresholded = [
        apply_na_threshold(raw, na_values, has_answer, na_prob_thresh)
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


# --- command line ----------------------------------------------------------------------------


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing or unparsable file is a DataError naming it and ``what``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise DataError(f"{what} file {str(path)!r} does not exist") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{what} file {str(path)!r} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise DataError(
            f"{what} file {str(path)!r} line {line} is not UTF-8 text (byte "
            f"{err.object[err.start : err.start + 1]!r}); save it as UTF-8"
        ) from err


def _version_of(squad: Any, requested: str | None) -> str:
    """``--version`` when given, else the data file's own ``version`` field (default 2.0)."""
    if requested is not None:
        return requested
    declared = str(squad.get("version", "")) if isinstance(squad, Mapping) else ""
    return "1.1" if declared.lstrip("v").startswith("1") else "2.0"


def _mapping_file(path: str, what: str, value_kind: type | tuple[type, ...]) -> dict[str, Any]:
    values = read_json(path, what)
    if not isinstance(values, dict):
        raise DataError(f"{what} file {path!r} should hold one JSON object {{question id: value}}")
    for qid, value in values.items():
        if not isinstance(value, value_kind) or isinstance(value, bool):
            raise DataError(f"{what} file {path!r}: the value for question {qid!r} is {value!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc squad-eval",
        description="Score SQuAD predictions exactly as the official v1.1 / v2.0 scripts do.",
    )
    parser.add_argument("data_file", metavar="DATA_JSON", help="official SQuAD JSON (dev set)")
    parser.add_argument("pred_file", metavar="PRED_JSON", help="predictions {question id: text}")
    parser.add_argument("--na-prob-file", help="v2.0: no-answer probabilities {question id: float}")
    parser.add_argument(
        "--na-prob-thresh",
        type=float,
        default=1.0,
        help="v2.0: predict no answer where the no-answer probability is above this (1.0)",
    )
    parser.add_argument(
        "--version",
        choices=VERSIONS,
        default=None,
        help="evaluation script to follow (default: the data file's 'version' field, else 2.0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``macsc squad-eval DATA_JSON PRED_JSON [--na-prob-file F] [--na-prob-thresh T]
    [--version 2.0|1.1]``: print the official JSON to stdout and return 0.

    Bad input raises :class:`MacscError` (DataError / ConfigError) with a one-line message naming
    the file, the field or the question ids.
    """
    args = build_parser().parse_args(argv)
    squad = read_json(args.data_file, "SQuAD data")
    predictions = _mapping_file(args.pred_file, "predictions", str)
    version = _version_of(squad, args.version)
    na_probs = None
    if args.na_prob_file:
        if version != "2.0":
            raise ConfigError("--na-prob-file applies to SQuAD v2.0 only; drop it or use 2.0")
        na_probs = _mapping_file(args.na_prob_file, "no-answer probabilities", (int, float))
    source = args.data_file
    try:
        if version == "1.1":
            print(json.dumps(evaluate_v1(squad, predictions, source=source)))
        else:
            scores = evaluate_v2(squad, predictions, na_probs, args.na_prob_thresh, source=source)
            print(json.dumps(scores, indent=2))
    except DataError as err:
        raise DataError(f"scoring {args.pred_file}: {err}") from err
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MacscError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
