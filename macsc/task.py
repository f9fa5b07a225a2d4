"""What a task produces, declared by its data module and read by the model.

A data module exposes ``task_spec`` (a :class:`TaskSpec`); the CLI links ``task_spec.to_dict()``
into the model's ``task`` argument, so the user never repeats the number of labels or the task
kind, and the values are saved with the model's hyperparameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskSpec:
    """kind: the task kind, which selects the model's head (:mod:`macsc.method.heads`):
        ``classification`` | ``regression`` | ``span`` | ``generation`` (a sentence from a
        decoder; ``labels`` are target token ids), or a kind a new head registers.
    num_labels: classes (classification), 1 (regression), 2 (span: start and end), 1
        (generation: one output sequence).
    metrics: names the model computes, e.g. ``["accuracy", "f1"]``, ``["spearman", "pearson"]``,
        ``["bleu_4", "meteor", "rouge_l", "cider", "coverage"]``.
    label_bins: regression only, the bin centres used for the class prior and the label mask
        (STS-B: ``[0, 1, 2, 3, 4, 5]``).
    val_names: one name per validation dataloader (MNLI: ``["matched", "mismatched"]``).
    label_names: classification, the class names in label order (written in predictions).
    """

    kind: str = "classification"
    num_labels: int = 2
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    label_bins: list[float] | None = None
    val_names: list[str] = field(default_factory=lambda: ["validation"])
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind == "regression" and not self.label_bins:
            raise ValueError("a regression task needs label_bins (the bin centres of SPEC 4)")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any] | TaskSpec | None) -> TaskSpec:
        if value is None:
            return cls()
        if isinstance(value, TaskSpec):
            return value
        return cls(**value)
