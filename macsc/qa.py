"""Extractive QA (SQuAD) features and post-processing, as pure functions over lists and arrays.

Feature building turns flat examples (``tasks.squad_data``) into sliding windows over the
context; post-processing turns per-window start/end logits back into answer text of the original
context. Neither needs a model, so both are tested on crafted inputs.

Positions (``start_positions``, ``end_positions``, ``null_index``) index the tokens of each
feature as returned here. With the default ``pad_to_max_length=False`` a collate function that
pads on the right keeps them valid; one that pads on the left must shift them by the padding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from macsc.errors import ConfigError

log = logging.getLogger(__name__)

Offset = tuple[int, int]
_SHOWN_IDS = 5


# --- features --------------------------------------------------------------------------------


def answer_token_span(
    offsets: Sequence[Offset | None], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token indices ``(start, end)`` (inclusive) covering characters ``[start_char, end_char)``.

    offsets: per token, its ``(start, end)`` characters in the context, or None for a token that
        is not context (question, special, padding).
    Returns None when the window does not hold the whole answer. The start token is the first
    context token ending after ``start_char`` and the end token the last one starting before
    ``end_char``, so an answer whose text begins or ends with whitespace still maps to the words.
    """
    context = [i for i, offset in enumerate(offsets) if offset is not None]
    if not context or end_char <= start_char:
        return None
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return (start, end) if start <= end else None


def truncate_questions(
    questions: Sequence[str], ids: Sequence[str], tokenizer: Any, max_question_length: int
) -> list[str]:
    """Questions cut after their ``max_question_length``-th token (logged with the first ids).

    Why: a window must leave room for the context; the tokenizer refuses to window a pair whose
    question alone nearly fills ``max_length``.
    """
    encoded = tokenizer(list(questions), add_special_tokens=False, return_offsets_mapping=True)
    kept, cut_ids = [], []
    for question, offsets, qid in zip(questions, encoded["offset_mapping"], ids, strict=True):
        if len(offsets) > max_question_length:
            question = question[: offsets[max_question_length - 1][1]]
            cut_ids.append(qid)
        kept.append(question)
    if cut_ids:
        shown = ", ".join(repr(qid) for qid in cut_ids[:_SHOWN_IDS])
        log.warning(
            "%d questions longer than max_question_length=%d tokens were cut (%s)",
            len(cut_ids),
            max_question_length,
            shown,
        )
    return kept


def null_position(input_ids: Sequence[int], attention_mask: Sequence[int], tokenizer: Any) -> int:
    """The position where one window scores "no answer" (SQuAD v2's null, ``start + end`` there).

    The tokenizer's CLS token where it has one (first for BERT and RoBERTa, last for XLNet).
    Otherwise the last end-of-sequence token among the window's real tokens, the one that
    closes it: CLIP's tokenizer has no CLS, and its text towers are causal (SPEC 13), so their
    start token sees nothing of the input while the final EOT has seen the question and the
    context. With neither token, the first position.

    input_ids, attention_mask: one window's tokens and mask (padding, which may repeat the
    end-of-sequence token as CLIP's does, has mask 0).
    """
    cls_id = tokenizer.cls_token_id
    if cls_id is not None and cls_id in input_ids:
        return list(input_ids).index(cls_id)
    eos_id = tokenizer.eos_token_id
    ends = [
        i
        for i, (token, real) in enumerate(zip(input_ids, attention_mask, strict=True))
        if real and token == eos_id
    ]
    return ends[-1] if ends else 0


def prepare_squad_features(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    *,
    max_question_length: int = 64,
    pad_to_max_length: bool = False,
) -> dict[str, list[Any]]:
    """Sliding-window features over each example's context, one row per window.

    examples: flat SQuAD examples ``{id, question, context, answers: {text, answer_start}}``.
    tokenizer: a fast (offset-mapping) Hugging Face tokenizer. With ``padding_side == "right"``
        (BERT, RoBERTa) the pair is (question, context); with ``"left"`` (XLNet) it is
        (context, question). Only the context is truncated.
    max_length: tokens per window, special tokens included.
    doc_stride: tokens shared by consecutive windows (the Hugging Face ``stride``; the original
        BERT script's ``doc_stride`` was the step between windows instead).
    max_question_length: longer questions are cut (see :func:`truncate_questions`).
    pad_to_max_length: pad every window to ``max_length`` (on the tokenizer's side) here;
        by default windows are left unpadded for dynamic padding in the collate function.

    Returns per-feature lists (F = number of windows, L_f = tokens of window f):
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them):
            F lists of L_f ints;
        ``offset_mapping``: F lists of L_f items, ``(start, end)`` characters in the context for
            context tokens and None for every other token;
        ``example_id``: F question ids; ``null_index``: F ints, where the window scores "no
            answer" (:func:`null_position`: the CLS token, or a causal text tower's final EOT);
        ``start_positions``, ``end_positions``: F ints, the answer's first and last token (the
            question's first gold answer), or ``null_index`` when the question is unanswerable
            or the answer is not wholly inside this window.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"SQuAD features need a fast tokenizer (offset mappings); "
            f"{type(tokenizer).__name__} is not one — load it with use_fast=True"
        )
    room = max_length - max_question_length - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= doc_stride:
        raise ConfigError(
            f"doc_stride={doc_stride} leaves no step between windows: max_length={max_length} "
            f"minus max_question_length={max_question_length} and special tokens is {room}; "
            f"lower doc_stride or max_question_length, or raise max_length"
        )
    ids = [str(example["id"]) for example in examples]
    # Leading whitespace in some SQuAD questions would only waste window tokens.
    questions = [example["question"].lstrip() for example in examples]
    questions = truncate_questions(questions, ids, tokenizer, max_question_length)
    contexts = [example["context"] for example in examples]
    question_first = tokenizer.padding_side == "right"
    pair = (questions, contexts) if question_first else (contexts, questions)
    encoded = tokenizer(
        *pair,
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=True,
        padding="max_length" if pad_to_max_length else False,
    )
    context_sequence = 1 if question_first else 0
    features: dict[str, list[Any]] = {
        key: list(encoded[key])
        for key in ("input_ids", "attention_mask", "token_type_ids")
        if key in encoded
    }
    features.update(
        offset_mapping=[],
        example_id=[],
        null_index=[],
        start_positions=[],
        end_positions=[],
    )
    for f, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        input_ids = encoded["input_ids"][f]
        offsets = [
            tuple(offset) if sequence == context_sequence else None
            for offset, sequence in zip(
                encoded["offset_mapping"][f], encoded.sequence_ids(f), strict=True
            )
        ]
        null_index = null_position(input_ids, encoded["attention_mask"][f], tokenizer)
        answers = examples[example_index]["answers"]
        span = None
        if answers["text"]:
            start_char = answers["answer_start"][0]
            span = answer_token_span(offsets, start_char, start_char + len(answers["text"][0]))
        start, end = span if span is not None else (null_index, null_index)
        features["offset_mapping"].append(offsets)
        features["example_id"].append(ids[example_index])
        features["null_index"].append(null_index)
        features["start_positions"].append(start)
        features["end_positions"].append(end)
    return features


# --- post-processing -------------------------------------------------------------------------


def span_candidates(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: Sequence[Offset | None],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[tuple[float, int, int]]:
    """Scored spans of one feature: ``[(start_logit + end_logit, start_char, end_char)]``.

    start_logits, end_logits: (L,) scores of this feature; positions beyond ``len(offsets)``
        (batch padding) are ignored.
    Takes the ``n_best`` best context positions for the start and for the end and keeps the
    pairs with ``start <= end`` and at most ``max_answer_length`` tokens.
    """
    length = min(len(offsets), len(start_logits), len(end_logits))
    positions = np.array([i for i in range(length) if offsets[i] is not None], dtype=np.int64)
    if positions.size == 0:
        return []
    # A stable sort keeps ties in text order, so results do not depend on the sort algorithm.
    starts = positions[np.argsort(-start_logits[positions], kind="stable")[:n_best]]
    ends = positions[np.argsort(-end_logits[positions], kind="stable")[:n_best]]
    start_grid, end_grid = np.meshgrid(starts, ends, indexing="ij")
    span_length = end_grid - start_grid + 1
    valid = (span_length >= 1) & (span_length <= max_answer_length)
    scores = start_logits[start_grid] + end_logits[end_grid]
    return [
        (float(scores[i, j]), offsets[start_grid[i, j]][0], offsets[end_grid[i, j]][1])
        for i, j in zip(*np.nonzero(valid), strict=True)
    ]


def postprocess_qa_predictions(
    examples: Sequence[Mapping[str, Any]],
    features: Mapping[str, Sequence[Any]],
    start_logits: Sequence[np.ndarray] | np.ndarray,
    end_logits: Sequence[np.ndarray] | np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Answer text per question from per-feature start/end logits.

    examples: flat examples ``{id, context, ...}``.
    features: at least ``example_id``, ``offset_mapping`` and ``null_index`` per feature, as
        made by :func:`prepare_squad_features` (in any order; several features per example).
    start_logits, end_logits: F rows of (L_f,) or (L,) float scores (log-probabilities work too),
        row f for feature f; a row may be longer than its offsets (batch padding).
    n_best, max_answer_length: see :func:`span_candidates`; the best of the ``n_best`` spans of
        all the example's windows is the answer, mapped to ``context[start_char:end_char]``.
    version_2: predict ``""`` when ``null_odds > null_threshold``.

    Returns ``(predictions, null_odds)``: question id -> answer text, and question id ->
    ``null score - best span score`` (the null score is the smallest ``start[null] + end[null]``
    over the example's windows, at each window's ``null_index``; ``inf`` when no window has a valid span). Examples with no
    feature (a partial validation pass) get no entry.
    """
    if not len(features["example_id"]) == len(start_logits) == len(end_logits):
        raise ValueError(
            f"{len(features['example_id'])} features but {len(start_logits)} start and "
            f"{len(end_logits)} end logit rows"
        )
    by_example: dict[str, list[int]] = {}
    for f, qid in enumerate(features["example_id"]):
        by_example.setdefault(str(qid), []).append(f)
    predictions: dict[str, str] = {}
    null_odds: dict[str, float] = {}
    for example in examples:
        qid = str(example["id"])
        if qid not in by_example:
            continue
        null_score = np.inf
        candidates: list[tuple[float, int, int]] = []
        for f in by_example[qid]:
            starts = np.asarray(start_logits[f], dtype=np.float64)
            ends = np.asarray(end_logits[f], dtype=np.float64)
            null = features["null_index"][f]
            null_score = min(null_score, starts[null] + ends[null])
            offsets = features["offset_mapping"][f]
            candidates += span_candidates(starts, ends, offsets, n_best, max_answer_length)
        if candidates:
            score, start_char, end_char = max(candidates, key=lambda c: c[0])
            text = example["context"][start_char:end_char]
            null_odds[qid] = float(null_score - score)
        else:
            text, null_odds[qid] = "", float("inf")
        predictions[qid] = "" if version_2 and null_odds[qid] > null_threshold else text
    return predictions, null_odds


def apply_null_threshold(
    predictions: Mapping[str, str], null_odds: Mapping[str, float], threshold: float
) -> dict[str, str]:
    """``""`` where ``null_odds > threshold``, else the span prediction.

    Used to report v2.0 scores at the best dev-set threshold: post-process with
    ``null_threshold=inf`` (always a span), find the threshold with
    ``squad_eval.evaluate_v2(..., na_probs=null_odds)`` (``best_f1_thresh``), then apply it.
    """
    return {qid: "" if null_odds[qid] > threshold else text for qid, text in predictions.items()}


def write_squad_predictions(
    directory: str | Path,
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write ``predictions.json`` ({qid: text}) and, given ``null_odds``, ``null_odds.json``
    ({qid: float}) into ``directory`` in the official formats; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "predictions.json"]
    written[0].write_text(json.dumps(predictions, indent=2, ensure_ascii=False), encoding="utf-8")
    if null_odds is not None:
        written.append(directory / "null_odds.json")
        written[1].write_text(json.dumps(dict(null_odds), indent=2), encoding="utf-8")
    return written
