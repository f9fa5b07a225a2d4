"""The extractive-QA head (SQuAD; SPEC 3-4): start and end distributions per branch, the
mixture loss, context-restricted allocation distributions and official-style scoring."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from macsc.method.heads.base import (
    EvaluationContext,
    EvaluationResult,
    HeadOutput,
    TaskHead,
    register_head,
)
from macsc.method.losses import weighted_aggregation_loss
from macsc.method.network import BranchRepresentations
from macsc.method.stacked import StackedLinear
from macsc.task import TaskSpec


@dataclass
class SpanEvaluationData:
    """What post-processing needs to turn one split's per-feature logits into scored answers.

    examples: flat SQuAD examples ``{id, context, answers: {text, answer_start}}`` (split order).
    features: per-feature lists ``example_id``, ``offset_mapping`` and ``null_index`` as made
        by :func:`macsc.squad.features.prepare_squad_features`; a batch's ``feature_index`` indexes them.
    version_2: SQuAD v2.0 (unanswerable questions; the null threshold is tuned on the split).
    n_best, max_answer_length: see :func:`macsc.squad.features.span_candidates`.
    null_threshold: v2, for unlabelled data (predict) only: answer "" where the null odds exceed
        it (labelled splits use the best threshold on the split itself).
    """

    examples: list[dict[str, Any]]
    features: dict[str, list[Any]]
    version_2: bool
    n_best: int = 20
    max_answer_length: int = 30
    null_threshold: float = 0.0


@dataclass
class SpanScores:
    """Scores of one branch on one split, and what was scored.

    metrics: name -> percentage (``best_f1_thresh`` is a null-odds threshold).
    predictions: question id -> answer text, ``""`` for "no answer" (v2, at the reported threshold).
    null_odds: v2 only, question id -> null score minus best span score.
    """

    metrics: dict[str, float]
    predictions: dict[str, str]
    null_odds: dict[str, float] | None = None


#: Feature logits of a split: feature index -> (start (L_f,), end (L_f,)) over its real tokens.
FeatureLogits = dict[int, tuple[np.ndarray, np.ndarray]]


def span_logits(outputs: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Start and end logits ``(M, B, l)`` float from head outputs ``(M, B, l, 2)``, ``-inf`` on
    the batch padding (``attention_mask`` ``(B, l)``) so no probability goes there."""
    padding = ~attention_mask.bool()[None, :, :, None]
    logits = outputs.float().masked_fill(padding, float("-inf"))
    return logits[..., 0], logits[..., 1]


def mixture_log_probabilities(branch_logits: Tensor, rho_logits: Tensor) -> Tensor:
    """``log sum_m rho_m softmax(z_m)`` (Eq. 11 in log space, no underflow): ``(M, B, l)`` ->
    ``(B, l)``."""
    log_rho = torch.log_softmax(rho_logits.to(branch_logits.dtype), dim=0)
    log_probs = torch.log_softmax(branch_logits, dim=-1)
    return torch.logsumexp(log_rho.view(-1, *([1] * (log_probs.dim() - 1))) + log_probs, dim=0)


class SpanLogits(Metric):
    """Accumulates per-feature start/end scores of one branch for SQuAD post-processing.

    States are concatenated across DDP ranks; a feature seen twice (the distributed sampler
    repeats a few to even out the ranks) keeps its first scores. ``compute`` returns
    :data:`FeatureLogits` on the CPU.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # Features differ in length, so scores are stored flat, cut by ``lengths``.
        for name in ("feature_index", "lengths", "start", "end"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, start: Tensor, end: Tensor, lengths: Tensor, feature_index: Tensor) -> None:
        """start, end: ``(B, l)`` scores; lengths: ``(B,)`` real tokens of each feature;
        feature_index: ``(B,)`` the feature of each row."""
        real = torch.arange(start.shape[-1], device=start.device) < lengths[:, None]
        self.start.append(start.detach().float()[real])
        self.end.append(end.detach().float()[real])
        self.lengths.append(lengths.long())
        self.feature_index.append(feature_index.long())

    def compute(self) -> FeatureLogits:
        lengths = dim_zero_cat(self.lengths).cpu().tolist()
        features = dim_zero_cat(self.feature_index).cpu().tolist()
        starts = torch.split(dim_zero_cat(self.start).cpu(), lengths)
        ends = torch.split(dim_zero_cat(self.end).cpu(), lengths)
        result: FeatureLogits = {}
        for feature, start, end in zip(features, starts, ends, strict=True):
            result.setdefault(feature, (start.numpy(), end.numpy()))
        return result


def score_spans(
    data: SpanEvaluationData, logits: FeatureLogits, labelled: bool = True
) -> SpanScores:
    """Answers from per-feature logits (:mod:`macsc.squad.features`), scored as the official scripts do
    (:mod:`macsc.squad.metric`).

    Only questions with at least one scored feature are answered and scored, so a partial pass
    (sanity check, ``limit_val_batches``) scores what it saw. v1.1: ``exact``, ``f1``. v2.0: the
    null threshold is the best-F1 one on these questions (as usual for v2): ``exact``, ``f1``,
    ``HasAns_*``, ``NoAns_*`` at that threshold, plus ``best_f1`` and ``best_f1_thresh``.
    ``labelled=False`` (predict): nothing is scored; v2 answers use ``data.null_threshold``.
    """
    from macsc.squad.metric import evaluate_v1, evaluate_v2
    from macsc.squad.postprocess import apply_null_threshold, postprocess_qa_predictions

    order = sorted(logits)
    features = {
        key: [data.features[key][f] for f in order]
        for key in ("example_id", "offset_mapping", "null_index")
    }
    seen = set(map(str, features["example_id"]))
    examples = [example for example in data.examples if str(example["id"]) in seen]
    spans, null_odds = postprocess_qa_predictions(
        examples,
        features,
        [logits[f][0] for f in order],
        [logits[f][1] for f in order],
        n_best=data.n_best,
        max_answer_length=data.max_answer_length,
        version_2=data.version_2,
        null_threshold=math.inf,  # always a span here; the threshold is chosen below
    )
    if not labelled:
        if not data.version_2:
            return SpanScores({}, spans)
        return SpanScores(
            {}, apply_null_threshold(spans, null_odds, data.null_threshold), null_odds
        )
    if not data.version_2:
        scores = evaluate_v1(examples, spans)
        return SpanScores({"exact": scores["exact_match"], "f1": scores["f1"]}, spans)
    best = evaluate_v2(examples, spans, null_odds)
    predictions = apply_null_threshold(spans, null_odds, best["best_f1_thresh"])
    metrics = {
        name: value
        for name, value in evaluate_v2(examples, predictions).items()
        if not name.endswith("total")
    }
    metrics.update(best_f1=best["best_f1"], best_f1_thresh=best["best_f1_thresh"])
    return SpanScores(metrics, predictions, null_odds)


def question_scores(
    examples: list[dict[str, Any]], predictions: dict[str, str], version_2: bool
) -> dict[str, tuple[int, float]]:
    """Per question id, ``(exact, f1)`` of its prediction, by the official rules of the version
    (v2.0: an unanswerable question's gold is ``""``; v1.1: no shared token scores 0)."""
    from macsc.squad.metric import exact_score, f1_score, normalize_answer

    scores = {}
    for example in examples:
        qid = str(example["id"])
        if qid not in predictions:
            continue
        golds = list(example["answers"]["text"])
        if version_2:
            golds = [text for text in golds if normalize_answer(text)] or [""]
        prediction = predictions[qid]
        scores[qid] = (
            max(exact_score(prediction, gold) for gold in golds),
            max(f1_score(prediction, gold, empty_matches_empty=version_2) for gold in golds),
        )
    return scores


@register_head("span")
class SpanHead(TaskHead):
    """Extractive QA (SQuAD): start/end logits over the tokens for each branch (SPEC 3-4).

    The text branch reads ``H^t``, modality ``m`` reads ``Ĥ^t_m``: outputs ``(M, B, l, 2)``
    (start, end); each branch's contrastive feature is that tensor at the backbone's sentence
    position (SPEC 3 and 5). The batch padding is masked where the batch is known (loss, allocation,
    metrics). The batch must hold ``attention_mask``, ``start_positions``, ``end_positions``
    (``(B,)``), ``context_mask`` (``(B, l)`` bool: the positions an answer may take, context
    tokens and for v2 the null position) and ``feature_index`` (``(B,)``, for the metrics).
    """

    needs_tokens = True
    uses_prior = False
    identity_positives = True

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int, dropout: float = 0.0):
        super().__init__(spec, num_branches, hidden_size, dropout)
        self.prior_size = 1  # no class prior for spans (alpha = 0); the buffer keeps one entry
        self.linear = StackedLinear(num_branches, hidden_size, 2)

    def forward(self, representations: BranchRepresentations, batch: dict) -> HeadOutput:
        tokens = representations.token_branches()  # (M, B, l, d)
        # each branch's contrastive feature pools the very tokens its span head reads
        pooled = representations.sentence(tokens)  # (M, B, d)
        return HeadOutput(self.linear(self.dropout(tokens)), pooled)  # (M, B, l, 2)

    def aggregation_loss(self, outputs, rho_logits, batch):
        """SPEC 3: the mixture cross-entropy of the start and of the end, averaged."""
        start, end = span_logits(outputs, batch["attention_mask"])
        start_loss = weighted_aggregation_loss(start, rho_logits, batch["start_positions"])
        end_loss = weighted_aggregation_loss(end, rho_logits, batch["end_positions"])
        return (start_loss + end_loss) / 2

    def allocation_distributions(self, outputs, prior, alpha, batch):
        """SPEC 4 for QA: ``[softmax(start) ; softmax(end)]`` over the answer positions
        (``context_mask``), zero elsewhere: ``(M, B, 2, l)``, detached. No prior (alpha = 0)."""
        outside = ~batch["context_mask"].bool()[None]
        start, end = span_logits(outputs.detach(), batch["attention_mask"])
        distributions = torch.stack(
            [
                torch.softmax(start.masked_fill(outside, float("-inf")), dim=-1),
                torch.softmax(end.masked_fill(outside, float("-inf")), dim=-1),
            ],
            dim=2,
        )
        # a feature with no answer position at all (softmax of all -inf) is a zero vector,
        # which the allocation weights treat as "no agreement", instead of NaN
        return distributions.nan_to_num(0.0)

    def positive_keys(self, batch):
        """The positives of a sample are itself seen from the other modalities."""
        return torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def has_targets(self, batch):
        return "start_positions" in batch and "end_positions" in batch

    def make_metrics(self, branches: list[str]) -> nn.Module:
        return nn.ModuleDict({branch: SpanLogits() for branch in branches})

    def update_metrics(self, metrics, output, representations, rho_logits, batch):
        """The fused branch stores the log of the mixture probabilities, each modality its own
        logits; both are scores the post-processing ranks spans by."""
        start, end = span_logits(output.outputs, batch["attention_mask"])
        lengths = batch["attention_mask"].sum(-1)
        features = batch["feature_index"]
        metrics["fused"].update(
            mixture_log_probabilities(start, rho_logits),
            mixture_log_probabilities(end, rho_logits),
            lengths,
            features,
        )
        for index, name in enumerate(list(metrics.keys())[1:]):
            metrics[name].update(start[index], end[index], lengths, features)

    def compute_metrics(self, metrics, context: EvaluationContext) -> EvaluationResult:
        """Post-processes and scores each branch (:func:`score_spans`): the metrics, one record
        per question (with its EM and F1), and the fused branch's ``predictions.json`` (and
        ``null_odds.json`` for v2) in the official formats."""
        data = _span_evaluation_data(context)
        labelled = context.stage != "predict"
        values: dict[str, float] = {}
        answers: dict[str, dict[str, str]] = {}
        fused: SpanScores | None = None
        for branch, metric in metrics.items():
            scores = score_spans(data, metric.compute(), labelled)
            metric.reset()
            suffix = "" if branch == "fused" else f"/{branch}"
            values.update({f"{name}{suffix}": float(v) for name, v in scores.metrics.items()})
            answers[branch] = scores.predictions
            fused = scores if branch == "fused" else fused
        assert fused is not None
        per_question = question_scores(data.examples, fused.predictions, data.version_2)
        # a split with answers (predict on SQuAD's dev set, the default) gets its gold and
        # verdicts in every stage; one with none at all (a test set) is unlabelled
        answered = any(example["answers"]["text"] for example in data.examples)
        records = []
        for example in data.examples:
            qid = str(example["id"])
            if qid not in fused.predictions:
                continue
            record = {"id": qid, "gold": list(example["answers"]["text"]) if answered else None}
            record["prediction"] = fused.predictions[qid]
            if answered:
                exact, f1 = per_question[qid]
                record.update(correct=exact == 1, exact=exact, f1=round(f1, 6))
            else:
                record["correct"] = None
            if fused.null_odds is not None:
                record["null_odds"] = fused.null_odds[qid]
            record["branches"] = {b: answers[b][qid] for b in list(answers)[1:]}
            records.append(record)
        files: dict[str, Any] = {"predictions.json": fused.predictions}
        if fused.null_odds is not None:
            files["null_odds.json"] = fused.null_odds
        return EvaluationResult(values, records, files)


def _span_evaluation_data(context: EvaluationContext) -> SpanEvaluationData:
    source = getattr(context.datamodule, "span_evaluation", None)
    if source is None:
        raise ValueError(
            f"span metrics need the evaluation examples and features of {context.split!r}: run "
            "with a data module that has span_evaluation(stage, split) (tasks.squad)"
        )
    return source(context.stage, context.split)
