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

import collections
import math
import re
import string
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

from macsc.errors import DataError
from macsc.squad.files import excerpt, gold_answers, ids_excerpt

VERSIONS = ("1.1", "2.0")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


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


# --- images (v2.0 -p) ------------------------------------------------------------------------


# --- command line ----------------------------------------------------------------------------
