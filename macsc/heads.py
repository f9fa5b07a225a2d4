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

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from .allocation import debiased_distribution, soft_bin_distribution
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
        # GLUE test splits carry -1 for "no label"
        return super().has_targets(batch) and bool((batch["labels"] >= 0).all())

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
        available: dict[str, Metric] = {
            "accuracy": MulticlassAccuracy(classes, average="micro"),
            # GLUE's F1 (MRPC, QQP) is the F1 of the positive class
            "f1": BinaryF1Score() if classes == 2 else MulticlassF1Score(classes, average="macro"),
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
        return (labels.float().unsqueeze(-1) - self.bins.to(labels.device)).abs().argmin(-1)

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


TASK_HEADS: dict[str, type[TaskHead]] = {
    "classification": ClassificationHead,
    "regression": RegressionHead,
}


def build_task_head(spec: TaskSpec, num_branches: int, hidden_size: int) -> TaskHead:
    if spec.kind not in TASK_HEADS:
        raise ValueError(f"no head for task kind {spec.kind!r}; known: {sorted(TASK_HEADS)}")
    return TASK_HEADS[spec.kind](spec, num_branches, hidden_size)
