"""Extractive QA post-processing as pure functions over arrays: n-best span candidates, the answer
of each question, the null-score threshold and the official prediction files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from macsc.squad.features import Offset


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
