"""The classes of the training labels, from which the model's class prior ``pi_e`` comes (SPEC 4:
add-one smoothed class frequencies of the training split actually used)."""

from __future__ import annotations

import torch
from torch import Tensor

from macsc.method.allocation import nearest_bin
from macsc.task import TaskSpec


def has_classes(spec: TaskSpec) -> bool:
    """Whether a task's labels fall in classes: classification, and regression through its
    label bins; span and generation have none (their alpha is 0)."""
    return spec.kind in ("classification", "regression")


def label_classes(labels: list[int] | list[float], spec: TaskSpec) -> Tensor:
    """``(N,)`` long: the class of each label; for regression the index of the nearest of
    ``spec.label_bins`` (STS-B's 0..5)."""
    values = torch.tensor(labels)
    if spec.kind == "regression":
        return nearest_bin(values, spec.label_bins)
    return values.long()
