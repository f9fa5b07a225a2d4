"""Per-modality prediction heads and what each task kind means for the objective (SPEC 3-4).

A task declares its kind in :class:`macsc.task.TaskSpec`; :func:`build_task_head` returns the
matching :class:`TaskHead`, which owns one head per modality and knows the kind's weighted
aggregation loss, its allocation distributions and its positive pairs. The model composes these
and never branches on the task kind itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from .allocation import debiased_distribution, nearest_bin, soft_bin_distribution
from .losses import (
    fused_regression,
    mixture_probabilities,
    weighted_aggregation_loss,
    weighted_regression_loss,
)
from .task import TaskSpec


class StackedLinear(nn.Module):
    """``M`` independent linear maps applied at once: ``(M, ..., d)`` -> ``(M, ..., out)``."""

    def __init__(self, branches: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(
            torch.empty(branches, out_features, in_features).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(branches, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("m...d,mod->m...o", x, self.weight.to(x.dtype))
        return out + self.bias.to(x.dtype).view(self.bias.shape[0], *([1] * (x.dim() - 2)), -1)


@dataclass
class EvaluationContext:
    """What a head may need to turn accumulated outputs into metrics at the end of an epoch.

    stage: ``val`` or ``test``; split: the dataloader's name (``validation``, ``matched``);
    datamodule: the running data module (SQuAD reads its examples and features);
    log_dir: the run's log folder (SQuAD writes ``predictions.json`` there), or None.
    """

    stage: str
    split: str
    datamodule: Any = None
    log_dir: Path | None = None


class TaskHead(nn.Module):
    """The per-branch heads of one task kind.

    ``forward(pooled (M, B, d), tokens (M, B, l, d) | None) -> outputs`` gives every branch's raw
    output; the other methods interpret those outputs for the loss, the allocation estimate and
    the metrics.
    """

    #: how many entries the class prior has (classes, or bins for regression)
    prior_size: int
    #: whether the branch heads read token states (span) rather than pooled states
    needs_tokens: bool = False
    #: alpha of Eq. 4 used by this kind (span overrides to 0: no class prior for spans)
    uses_prior: bool = True
    #: positives are "the same example" (span), so keys must stay unique across DDP ranks
    identity_positives: bool = False

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int) -> None:
        super().__init__()
        self.spec = spec

    def aggregation_loss(self, outputs: Tensor, rho_logits: Tensor, batch: dict) -> Tensor:
        raise NotImplementedError

    def allocation_distributions(
        self, outputs: Tensor, prior: Tensor, alpha: float, batch: dict
    ) -> Tensor:
        """``(M, B, C)`` debiased branch distributions ``p_i^m`` (Eq. 4), detached."""
        raise NotImplementedError

    def positive_keys(self, batch: dict) -> Tensor:
        """``(B,)`` keys; samples ``i, j`` are positives when their keys are equal."""
        raise NotImplementedError

    def prior_classes(self, labels: Tensor) -> Tensor:
        """Class index of each label for the class prior."""
        return labels.long()

    def fused_prediction(self, outputs: Tensor, rho_logits: Tensor) -> Tensor:
        raise NotImplementedError

    def branch_prediction(self, outputs: Tensor, branch: int) -> Tensor:
        raise NotImplementedError

    def targets(self, batch: dict) -> Tensor:
        return batch["labels"]

    def has_targets(self, batch: dict) -> bool:
        """False for unlabelled batches (GLUE test splits), which are not scored."""
        labels = batch.get("labels")
        return (
            labels is not None and bool((labels >= 0).all())
            if self.spec.kind == "classification"
            else labels is not None
        )

    def make_metrics(self) -> nn.Module:
        """The metric state of one branch on one evaluation split."""
        raise NotImplementedError

    def update_metrics(
        self, metrics: nn.ModuleDict, outputs: Tensor, rho_logits: Tensor, batch: dict
    ) -> None:
        """Accumulate one evaluation batch; ``metrics`` maps ``fused`` and each modality to the
        object from :meth:`make_metrics`, in branch order after ``fused``."""
        targets = self.targets(batch)
        branches = list(metrics.keys())
        metrics["fused"].update(self.fused_prediction(outputs, rho_logits), targets)
        for index, name in enumerate(branches[1:]):
            metrics[name].update(self.branch_prediction(outputs, index), targets)

    def compute_metrics(
        self, metrics: nn.ModuleDict, context: EvaluationContext
    ) -> dict[str, Tensor]:
        """``{metric: value}`` for the fused prediction and ``{metric/branch: value}`` for each
        branch alone; resets the accumulated state."""
        values: dict[str, Tensor] = {}
        for branch, collection in metrics.items():
            suffix = "" if branch == "fused" else f"/{branch}"
            values.update(
                {f"{name}{suffix}": value for name, value in collection.compute().items()}
            )
            collection.reset()
        return values


class ClassificationHead(TaskHead):
    """``softmax(W^m pool + b^m)`` per branch (Eq. 10); positives share the label."""

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int) -> None:
        super().__init__(spec, num_branches, hidden_size)
        self.prior_size = spec.num_labels
        self.linear = StackedLinear(num_branches, hidden_size, spec.num_labels)

    def forward(self, pooled: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.linear(pooled)  # (M, B, C)

    def aggregation_loss(self, outputs, rho_logits, batch):
        return weighted_aggregation_loss(outputs.float(), rho_logits, batch["labels"])

    def allocation_distributions(self, outputs, prior, alpha, batch):
        return debiased_distribution(outputs.detach().float(), prior, alpha)

    def positive_keys(self, batch):
        return batch["labels"].long()

    def has_targets(self, batch):
        # GLUE test splits carry -1 for "no label"; one host sync per evaluation batch
        labels = batch.get("labels")
        return labels is not None and bool((labels >= 0).all())

    def fused_prediction(self, outputs, rho_logits):
        return mixture_probabilities(outputs.float(), rho_logits).argmax(-1)

    def branch_prediction(self, outputs, branch):
        return outputs[branch].argmax(-1)

    def make_metrics(self) -> MetricCollection:
        from torchmetrics.classification import (
            BinaryF1Score,
            MulticlassAccuracy,
            MulticlassF1Score,
        )

        classes = self.spec.num_labels
        # no argument checks: they sync with the host at every update, and the predictions
        # (argmax) and labels (checked by the data modules and has_targets) are valid already
        checks = {"validate_args": False}
        available: dict[str, Metric] = {
            "accuracy": MulticlassAccuracy(classes, average="micro", **checks),
            # GLUE's F1 (MRPC, QQP) is the F1 of the positive class
            "f1": BinaryF1Score(**checks)
            if classes == 2
            else MulticlassF1Score(classes, average="macro", **checks),
        }
        return MetricCollection({name: available[name] for name in self.spec.metrics})


class RegressionHead(TaskHead):
    """A scalar per branch; for the allocation estimate each scalar becomes a soft assignment
    to the label bins, and positives share a bin (SPEC 4)."""

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int) -> None:
        super().__init__(spec, num_branches, hidden_size)
        self.register_buffer(
            "bins", torch.tensor(spec.label_bins, dtype=torch.float), persistent=False
        )
        self.prior_size = len(spec.label_bins)
        self.linear = StackedLinear(num_branches, hidden_size, 1)

    def forward(self, pooled: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.linear(pooled).squeeze(-1)  # (M, B)

    def aggregation_loss(self, outputs, rho_logits, batch):
        return weighted_regression_loss(outputs.float(), rho_logits, batch["labels"].float())

    def allocation_distributions(self, outputs, prior, alpha, batch):
        soft = soft_bin_distribution(outputs.detach().float(), self.bins)
        return debiased_distribution(soft.clamp_min(1e-12).log(), prior, alpha)

    def prior_classes(self, labels):
        return nearest_bin(labels, self.bins)

    def positive_keys(self, batch):
        return self.prior_classes(batch["labels"])

    def fused_prediction(self, outputs, rho_logits):
        return fused_regression(outputs.float(), rho_logits)

    def branch_prediction(self, outputs, branch):
        return outputs[branch].float()

    def targets(self, batch):
        return batch["labels"].float()

    def make_metrics(self) -> MetricCollection:
        from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

        available: dict[str, Metric] = {
            "spearman": SpearmanCorrCoef(),
            "pearson": PearsonCorrCoef(),
            "mse": MeanSquaredError(),
        }
        return MetricCollection({name: available[name] for name in self.spec.metrics})


# --- extractive QA (SQuAD) ---------------------------------------------------------------------


@dataclass
class SpanEvaluationData:
    """What post-processing needs to turn one split's per-feature logits into scored answers.

    examples: flat SQuAD examples ``{id, context, answers: {text, answer_start}}`` (split order).
    features: per-feature lists ``example_id``, ``offset_mapping`` and ``cls_index`` as made by
        :func:`macsc.qa.prepare_squad_features`; a batch's ``feature_index`` indexes them.
    version_2: SQuAD v2.0 (unanswerable questions; the null threshold is tuned on the split).
    n_best, max_answer_length: see :func:`macsc.qa.span_candidates`.
    """

    examples: list[dict[str, Any]]
    features: dict[str, list[Any]]
    version_2: bool
    n_best: int = 20
    max_answer_length: int = 30


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


def score_spans(data: SpanEvaluationData, logits: FeatureLogits) -> SpanScores:
    """Answers from per-feature logits (:mod:`macsc.qa`), scored as the official scripts do
    (:mod:`macsc.squad_eval`).

    Only questions with at least one scored feature are answered and scored, so a partial pass
    (sanity check, ``limit_val_batches``) scores what it saw. v1.1: ``exact``, ``f1``. v2.0: the
    null threshold is the best-F1 one on these questions (as usual for v2): ``exact``, ``f1``,
    ``HasAns_*``, ``NoAns_*`` at that threshold, plus ``best_f1`` and ``best_f1_thresh``.
    """
    from .qa import apply_null_threshold, postprocess_qa_predictions
    from .squad_eval import evaluate_v1, evaluate_v2

    order = sorted(logits)
    features = {
        key: [data.features[key][f] for f in order]
        for key in ("example_id", "offset_mapping", "cls_index")
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


class SpanHead(TaskHead):
    """Extractive QA (SQuAD): start/end logits over the tokens for each branch (SPEC 3-4).

    ``forward`` gives ``(M, B, l, 2)`` (start, end) from ``tokens`` ``(M, B, l, d)``: the text
    branch reads ``H^t``, modality ``m`` reads ``Ĥ^t_m``. The batch padding is masked where the
    batch is known (loss, allocation, metrics); ``fused_prediction`` and ``branch_prediction``
    see no batch and leave it to the caller.

    The batch must hold ``attention_mask``, ``start_positions``, ``end_positions`` (``(B,)``),
    ``context_mask`` (``(B, l)`` bool: the positions an answer may take, context tokens and for
    v2 the CLS position) and ``feature_index`` (``(B,)``, for the metrics).
    """

    needs_tokens = True
    uses_prior = False
    identity_positives = True

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int) -> None:
        super().__init__(spec, num_branches, hidden_size)
        self.prior_size = 1  # no class prior for spans (alpha = 0); the buffer keeps one entry
        self.linear = StackedLinear(num_branches, hidden_size, 2)

    def forward(self, pooled: Tensor, tokens: Tensor | None = None) -> Tensor:
        if tokens is None:
            raise ValueError("SpanHead reads token states: call it with tokens (M, B, l, d)")
        return self.linear(tokens)  # (M, B, l, 2)

    def aggregation_loss(self, outputs, rho_logits, batch):
        """SPEC 3: the mixture cross-entropy of the start and of the end, averaged."""
        start, end = span_logits(outputs, batch["attention_mask"])
        start_loss = weighted_aggregation_loss(start, rho_logits, batch["start_positions"])
        end_loss = weighted_aggregation_loss(end, rho_logits, batch["end_positions"])
        return (start_loss + end_loss) / 2

    def allocation_distributions(self, outputs, prior, alpha, batch):
        """SPEC 4 for QA: ``[softmax(start) ; softmax(end)]`` over the answer positions
        (``context_mask``), zero elsewhere: ``(M, B, 2l)``, detached. No prior (alpha = 0)."""
        outside = ~batch["context_mask"].bool()[None]
        start, end = span_logits(outputs.detach(), batch["attention_mask"])
        distributions = torch.cat(
            [
                torch.softmax(start.masked_fill(outside, float("-inf")), dim=-1),
                torch.softmax(end.masked_fill(outside, float("-inf")), dim=-1),
            ],
            dim=-1,
        )
        # a feature with no answer position at all (softmax of all -inf) is a zero vector,
        # which the allocation weights treat as "no agreement", instead of NaN
        return distributions.nan_to_num(0.0)

    def positive_keys(self, batch):
        """The positives of a sample are itself seen from the other modalities."""
        return torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def targets(self, batch):
        return torch.stack([batch["start_positions"], batch["end_positions"]], dim=-1)

    def has_targets(self, batch):
        return "start_positions" in batch and "end_positions" in batch

    def fused_prediction(self, outputs, rho_logits):
        """``(B, l, 2)`` log mixture probabilities of start and end (batch padding included)."""
        logits = outputs.float()
        return torch.stack(
            [mixture_log_probabilities(logits[..., i], rho_logits) for i in (0, 1)], dim=-1
        )

    def branch_prediction(self, outputs, branch):
        return outputs[branch].float()  # (B, l, 2)

    def make_metrics(self) -> SpanLogits:
        return SpanLogits()

    def update_metrics(self, metrics, outputs, rho_logits, batch):
        """The fused branch stores the log of the mixture probabilities, each modality its own
        logits; both are scores the post-processing ranks spans by."""
        start, end = span_logits(outputs, batch["attention_mask"])
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

    def compute_metrics(self, metrics, context):
        """Post-processes and scores each branch (:func:`score_spans`); writes the fused
        branch's ``predictions.json`` (and ``null_odds.json`` for v2) to
        ``log_dir / f"{stage}_{split}_step{global_step}"`` -- on global rank 0, not during the
        sanity check, and only when there is a log folder."""
        data = _span_evaluation_data(context)
        values: dict[str, float] = {}
        for branch, metric in metrics.items():
            scores = score_spans(data, metric.compute())
            metric.reset()
            suffix = "" if branch == "fused" else f"/{branch}"
            values.update({f"{name}{suffix}": float(v) for name, v in scores.metrics.items()})
            folder = _prediction_folder(context) if branch == "fused" else None
            if folder is not None:
                from .qa import write_squad_predictions

                write_squad_predictions(folder, scores.predictions, scores.null_odds)
        return values


def _span_evaluation_data(context: EvaluationContext) -> SpanEvaluationData:
    source = getattr(context.datamodule, "span_evaluation", None)
    if source is None:
        raise ValueError(
            f"span metrics need the evaluation examples and features of {context.split!r}: run "
            "with a data module that has span_evaluation(stage, split) (tasks.squad)"
        )
    return source(context.stage, context.split)


def _prediction_folder(context: EvaluationContext) -> Path | None:
    """Where this evaluation's predictions go, or None when nothing should be written."""
    trainer = getattr(context.datamodule, "trainer", None)
    if context.log_dir is None:
        return None
    if trainer is not None and (trainer.sanity_checking or not trainer.is_global_zero):
        return None
    step = trainer.global_step if trainer is not None else 0
    return context.log_dir / f"{context.stage}_{context.split}_step{step}"


TASK_HEADS: dict[str, type[TaskHead]] = {
    "classification": ClassificationHead,
    "regression": RegressionHead,
    "span": SpanHead,
}


def build_task_head(spec: TaskSpec, num_branches: int, hidden_size: int) -> TaskHead:
    if spec.kind not in TASK_HEADS:
        raise ValueError(f"no head for task kind {spec.kind!r}; known: {sorted(TASK_HEADS)}")
    return TASK_HEADS[spec.kind](spec, num_branches, hidden_size)
