"""Extractive QA (SQuAD) features and post-processing, as pure functions over lists and arrays.

Feature building turns flat examples (``tasks.squad_data``) into sliding windows over the
context; post-processing turns per-window start/end logits back into answer text of the original
context. Neither needs a model, so both are tested on crafted inputs.

Positions (``start_positions``, ``end_positions``, ``null_index``) index the tokens of each
feature as returned here. With the default ``pad_to_max_length=False`` a collate function that
pads on the right keeps them valid; one that pads on the left must shift them by the padding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

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
