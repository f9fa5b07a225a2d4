"""Per-modality prediction heads, one class per task kind (SPEC 3-4, 6).

A task declares its kind in :class:`macsc.task.TaskSpec`; :func:`build_task_head` returns the
head registered for that kind. Importing this package registers the built-in kinds.
"""

from .base import (
    EvaluationContext,
    EvaluationResult,
    HeadOutput,
    StackedLinear,
    TaskHead,
    build_task_head,
    head_class,
    register_head,
)
from .classification import ClassificationHead, PooledHead, RegressionHead
from .generation import GenerationHead
from .records import ExampleOutputs
from .span import (
    SpanEvaluationData,
    SpanHead,
    SpanLogits,
    SpanScores,
    mixture_log_probabilities,
    score_spans,
    span_logits,
)

__all__ = [
    "ClassificationHead",
    "EvaluationContext",
    "EvaluationResult",
    "ExampleOutputs",
    "GenerationHead",
    "HeadOutput",
    "PooledHead",
    "RegressionHead",
    "SpanEvaluationData",
    "SpanHead",
    "SpanLogits",
    "SpanScores",
    "StackedLinear",
    "TaskHead",
    "build_task_head",
    "head_class",
    "mixture_log_probabilities",
    "register_head",
    "score_spans",
    "span_logits",
]
