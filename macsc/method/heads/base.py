"""What every task head provides: per-branch outputs, the allocation inputs, metrics and records.

A task declares its kind in :class:`macsc.task.TaskSpec`; :func:`build_task_head` builds the head
registered for that kind (:func:`register_head`). The LightningModule only composes heads and
never branches on the kind, so a new kind is a head class, a data module and a config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from macsc.errors import ConfigError
from macsc.method.network import BranchRepresentations
from macsc.task import TaskSpec


@dataclass
class HeadOutput:
    """outputs: every branch's raw output, leading dim ``M`` (a kind without late fusion has one
    output and no leading branch dim). features: ``(M, B, d)``, each branch's pooled
    representation of the very tensor its head read (the contrastive features, SPEC 3 and 5);
    None for a kind without per-branch heads."""

    outputs: Tensor
    features: Tensor | None = None


@dataclass
class EvaluationContext:
    """What a head may need to turn accumulated outputs into metrics and records.

    stage: ``val``, ``test`` or ``predict``; split: the dataloader's name (``validation``,
    ``matched``); datamodule: the running data module (it knows the split's examples).
    sanity_check: Lightning's sanity check (a head may skip costly scoring then).
    is_global_zero: this process is global rank 0. broadcast: rank 0's object to every rank
    (identity in one process), for values that only rank 0 computes.
    """

    stage: str
    split: str
    datamodule: Any = None
    sanity_check: bool = False
    is_global_zero: bool = True
    broadcast: Callable[[Any], Any] | None = None

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return self.broadcast(value) if self.broadcast is not None else value

    def examples(self) -> Any:
        """The evaluated split's examples (a :class:`tasks.base.TextSplit`), or None when the
        data module cannot say (then records carry positions instead of ids)."""
        source = getattr(self.datamodule, "evaluation_split", None)
        return source(self.stage, self.split) if source is not None else None


@dataclass
class EvaluationResult:
    """metrics: ``{name: value}`` for the fused prediction and ``{name/branch: value}`` for each
    branch alone (empty for unlabelled data). records: one JSON-ready dict per example (the
    ``predictions-<split>.jsonl`` format of docs/results.md). files: official-format files of the
    task, ``{file name: JSON-ready object}`` (SQuAD's ``predictions.json``). samples: a few
    outputs as text, shown in TensorBoard (generated sentences)."""

    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)


class TaskHead(nn.Module):
    """The per-branch heads of one task kind.

    ``forward(representations, batch) -> HeadOutput``; the other methods interpret the outputs
    for the objective (Eq. 4 distributions, positives, ``L_wa``) and for evaluation.
    """

    #: how many entries the class prior has (classes, or bins for regression)
    prior_size: int = 1
    #: whether the head reads every token of the text branches (else only the sentence position)
    needs_tokens: bool = False
    #: whether Eq. 4 debiases with the class prior (span and generation: no classes)
    uses_prior: bool = True
    #: positives are "the same example", so keys must stay unique across DDP ranks
    identity_positives: bool = False
    #: per-branch outputs fused by rho (Eq. 11); False: one output, no rho and no L_msb
    late_fusion: bool = True
    #: the transformers auto class that loads the backbone this kind needs
    auto_class: str = "AutoModel"
    #: lambda of Eq. 14 when the config leaves it out (paper A.3: 0.2; generation: 0)
    default_lambda_msb: float = 0.2

    def __init__(
        self, spec: TaskSpec, num_branches: int, hidden_size: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_branches = num_branches
        self.dropout = nn.Dropout(dropout)

    def forward(self, representations: BranchRepresentations, batch: dict) -> HeadOutput:
        raise NotImplementedError

    def attach(self, backbone: nn.Module) -> None:
        """Called with the network's backbone once both are built (a head that drives part of
        the backbone, such as a decoder, keeps a reference)."""

    def recorded_options(self) -> dict[str, Any]:
        """Head options a checkpoint records as they took effect, so that loading it rebuilds
        the head its weights were trained with, whatever the default is by then."""
        return {}

    def restore_options(self, saved: dict[str, Any]) -> str | None:
        """Called with what :meth:`recorded_options` gave when the checkpoint being loaded into
        this head was written (empty for a checkpoint written before). Returns a line for the
        user when an option was taken from the checkpoint, None otherwise."""
        return None

    def aggregation_loss(self, outputs: Tensor, rho_logits: Tensor | None, batch: dict) -> Tensor:
        """The task loss ``L_wa`` (Eq. 12), averaged over the batch."""
        raise NotImplementedError

    def evaluation_loss(
        self, outputs: Tensor, rho_logits: Tensor | None, batch: dict
    ) -> Tensor | None:
        """The loss logged for a labelled evaluation batch (``<stage>/loss``), or None."""
        return self.aggregation_loss(outputs, rho_logits, batch)

    def allocation_distributions(
        self, outputs: Tensor, prior: Tensor, alpha: float, batch: dict
    ) -> Tensor:
        """``(M, B, ..., C)`` debiased branch distributions ``p_i^m`` (Eq. 4), detached; the
        trailing dims are flattened into one vector per sample (they may be padded at the end,
        with zeros, when batches are gathered across devices)."""
        raise NotImplementedError

    def class_probabilities(
        self, outputs: Tensor, rho_logits: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """For a head that predicts classes: ``(B, C)`` the fused probabilities (Eq. 11) and
        ``(M, B, C)`` each branch's alone; None for the other kinds."""
        return None

    def positive_keys(self, batch: dict) -> Tensor:
        """``(B,)`` keys; samples ``i, j`` are positives when their keys are equal."""
        raise NotImplementedError

    def prior_classes(self, labels: Tensor) -> Tensor:
        """Class index of each label for the class prior."""
        return labels.long()

    def has_targets(self, batch: dict) -> bool:
        """False for unlabelled batches (GLUE test splits, predict), which are not scored."""
        return batch.get("labels") is not None

    def make_metrics(self, branches: list[str]) -> nn.Module:
        """The evaluation state of one split: metrics of ``fused`` and each branch, and what
        the per-example records need."""
        raise NotImplementedError

    def update_metrics(
        self,
        metrics: nn.Module,
        output: HeadOutput,
        representations: BranchRepresentations,
        rho_logits: Tensor | None,
        batch: dict,
    ) -> None:
        """Accumulate one batch (labelled or not: unlabelled batches only add records)."""
        raise NotImplementedError

    def compute_metrics(self, metrics: nn.Module, context: EvaluationContext) -> EvaluationResult:
        """Metrics, records and files of the accumulated split; resets the state."""
        raise NotImplementedError


_HEADS: dict[str, type[TaskHead]] = {}


def register_head(kind: str) -> Callable[[type[TaskHead]], type[TaskHead]]:
    """Class decorator: the head of task kind ``kind``."""

    def wrap(cls: type[TaskHead]) -> type[TaskHead]:
        _HEADS[kind] = cls
        return cls

    return wrap


def head_class(kind: str) -> type[TaskHead]:
    if kind not in _HEADS:
        raise ConfigError(f"no head for task kind {kind!r}; known kinds: {sorted(_HEADS)}")
    return _HEADS[kind]


def build_task_head(
    spec: TaskSpec, num_branches: int, hidden_size: int, dropout: float = 0.0, **options: Any
) -> TaskHead:
    """The head of ``spec.kind`` for ``num_branches`` branches of width ``hidden_size``;
    ``options`` are the head's own (``model.head_options``)."""
    cls = head_class(spec.kind)
    try:
        return cls(spec, num_branches, hidden_size, dropout=dropout, **options)
    except TypeError as error:
        raise ConfigError(f"model.head_options for a {spec.kind} task: {error}") from error


def prediction_folder(log_dir: Path, stage: str, split: str, step: int) -> Path:
    """Where a task's official-format files of one evaluation go."""
    return log_dir / f"{stage}_{split}_step{step}"
