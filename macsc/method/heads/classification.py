"""Heads of the pooled task kinds: classification (Eq. 10) and regression (STS-B; SPEC 3-4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from macsc.method.allocation import debiased_distribution, nearest_bin, soft_bin_distribution
from macsc.method.heads.base import (
    EvaluationContext,
    EvaluationResult,
    HeadOutput,
    TaskHead,
    register_head,
)
from macsc.method.heads.records import ExampleOutputs, example_identity, named
from macsc.method.losses import (
    fused_regression,
    mixture_probabilities,
    weighted_aggregation_loss,
    weighted_regression_loss,
)
from macsc.method.network import BranchRepresentations
from macsc.method.stacked import StackedLinear, as_dtype
from macsc.task import TaskSpec


class PooledHead(TaskHead):
    """A head per branch on its pooled representation: the text branch at the backbone's
    sentence position, a prototype modality by the masked mean of ``Ĥ^m`` (SPEC 3). The pooled
    vectors the heads read are also the contrastive features."""

    out_features: int = 1

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int, dropout: float = 0.0):
        super().__init__(spec, num_branches, hidden_size, dropout)
        self.linear = StackedLinear(num_branches, hidden_size, self.out_features)

    def forward(self, representations: BranchRepresentations, batch: dict) -> HeadOutput:
        pooled = representations.pooled()  # (M, B, d)
        return HeadOutput(self.linear(self.dropout(pooled)), pooled)

    def make_metrics(self, branches: list[str]) -> nn.Module:
        state = nn.Module()
        state.scores = nn.ModuleDict({branch: self._collection() for branch in branches})
        state.examples = ExampleOutputs("fused", "branches", "labels")
        return state

    def update_metrics(self, metrics, output, representations, rho_logits, batch):
        fused = self.fused_prediction(output.outputs, rho_logits)
        branches = self.branch_predictions(output.outputs)  # (M, B)
        scored = self.has_targets(batch)
        if scored:
            targets = self.targets(batch)
            names = list(metrics.scores.keys())
            metrics.scores["fused"].update(self.decision(fused), targets)
            for index, name in enumerate(names[1:]):
                metrics.scores[name].update(branches[index], targets)
        labels = self.targets(batch) if scored else None
        if labels is None:  # unlabelled: records without gold
            labels = torch.full(
                batch["example_index"].shape, self.missing_label, device=fused.device
            )
        metrics.examples.update(
            batch["example_index"], fused=fused, branches=branches.transpose(0, 1), labels=labels
        )

    def compute_metrics(self, metrics, context: EvaluationContext) -> EvaluationResult:
        values: dict[str, float] = {}
        for branch, collection in metrics.scores.items():
            if any(metric.update_called for metric in collection.values()):
                suffix = "" if branch == "fused" else f"/{branch}"
                values.update(
                    {f"{name}{suffix}": float(v) for name, v in collection.compute().items()}
                )
            collection.reset()
        examples = metrics.examples.compute()
        metrics.examples.reset()
        split = context.examples()
        names = list(metrics.scores.keys())[1:]
        records = [
            self._record(
                example_identity(split, int(position)),
                examples["labels"][row],
                examples["fused"][row],
                dict(zip(names, examples["branches"][row].tolist(), strict=True)),
            )
            for row, position in enumerate(examples["index"].tolist())
        ]
        return EvaluationResult(values, records)

    #: the stored label of an unlabelled example
    missing_label: float = -1

    def targets(self, batch: dict) -> Tensor:
        return batch["labels"]

    def _collection(self) -> MetricCollection:
        raise NotImplementedError

    def fused_prediction(self, outputs: Tensor, rho_logits: Tensor) -> Tensor:
        raise NotImplementedError

    def branch_predictions(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def decision(self, fused: Tensor) -> Tensor:
        """What the metrics compare with the targets, from :meth:`fused_prediction`."""
        return fused

    def _record(self, identity: dict, label: Tensor, fused: Tensor, branches: dict) -> dict:
        raise NotImplementedError


@register_head("classification")
class ClassificationHead(PooledHead):
    """``softmax(W^m pool + b^m)`` per branch (Eq. 10); positives share the label."""

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int, dropout: float = 0.0):
        self.out_features = spec.num_labels
        super().__init__(spec, num_branches, hidden_size, dropout)
        self.prior_size = spec.num_labels

    def aggregation_loss(self, outputs, rho_logits, batch):
        return weighted_aggregation_loss(outputs.float(), rho_logits, batch["labels"])

    def allocation_distributions(self, outputs, prior, alpha, batch):
        return debiased_distribution(as_dtype(outputs.detach(), torch.float32), prior, alpha)

    def positive_keys(self, batch):
        return as_dtype(batch["labels"], torch.long)

    def has_targets(self, batch):
        # GLUE test splits carry -1 for "no label"; one host sync per evaluation batch
        labels = batch.get("labels")
        return labels is not None and bool((labels >= 0).all())

    def fused_prediction(self, outputs, rho_logits):
        """``(B, C)`` the mixture probabilities (Eq. 11)."""
        return mixture_probabilities(outputs.float(), rho_logits)

    def branch_predictions(self, outputs):
        return outputs.argmax(-1)

    def class_probabilities(self, outputs, rho_logits):
        return self.fused_prediction(outputs, rho_logits), torch.softmax(outputs.float(), dim=-1)

    def decision(self, fused):
        return fused.argmax(-1)

    def _collection(self) -> MetricCollection:
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

    def _record(self, identity, label, fused, branches):
        names = self.spec.label_names
        predicted = int(fused.argmax())
        gold = int(label)
        return {
            **identity,
            "gold": named(gold, names) if gold >= 0 else None,
            "prediction": named(predicted, names),
            "probability": round(float(fused[predicted]), 6),
            "correct": predicted == gold if gold >= 0 else None,
            "branches": {branch: named(value, names) for branch, value in branches.items()},
        }


@register_head("regression")
class RegressionHead(PooledHead):
    """A scalar per branch; for the allocation estimate each scalar becomes a soft assignment
    to the label bins, and positives share a bin (SPEC 4)."""

    missing_label = float("nan")

    def __init__(self, spec: TaskSpec, num_branches: int, hidden_size: int, dropout: float = 0.0):
        super().__init__(spec, num_branches, hidden_size, dropout)
        self.register_buffer(
            "bins", torch.tensor(spec.label_bins, dtype=torch.float), persistent=False
        )
        self.prior_size = len(spec.label_bins)

    def forward(self, representations, batch):
        output = super().forward(representations, batch)
        return HeadOutput(output.outputs.squeeze(-1), output.features)  # (M, B)

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

    def branch_predictions(self, outputs):
        return outputs.float()

    def targets(self, batch):
        return batch["labels"].float()

    def _collection(self) -> MetricCollection:
        from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

        available: dict[str, Metric] = {
            "spearman": SpearmanCorrCoef(),
            "pearson": PearsonCorrCoef(),
            "mse": MeanSquaredError(),
        }
        return MetricCollection({name: available[name] for name in self.spec.metrics})

    def _record(self, identity: dict, label: Tensor, fused: Tensor, branches: dict) -> dict:
        """``correct``: the prediction falls in the gold label's bin (SPEC 4's bins)."""
        labelled = not bool(torch.isnan(label))
        return {
            **identity,
            "gold": float(label) if labelled else None,
            "prediction": round(float(fused), 6),
            "correct": bool(nearest_bin(fused, self.bins) == nearest_bin(label, self.bins))
            if labelled
            else None,
            "branches": {branch: round(value, 6) for branch, value in branches.items()},
        }
