"""Per-modality prediction heads, one class per task kind (SPEC 3-4, 6).

A task declares its kind in :class:`macsc.task.TaskSpec`; :func:`build_task_head` returns the
head registered for that kind. Importing this package registers the built-in kinds.
"""

from macsc.method.heads.base import (
    EvaluationContext,
    EvaluationResult,
    HeadOutput,
    TaskHead,
    build_task_head,
    head_class,
    register_head,
)
from macsc.method.heads.classification import ClassificationHead, PooledHead, RegressionHead
from macsc.method.heads.generation import GenerationHead
from macsc.method.heads.records import ExampleOutputs
from macsc.method.heads.span import (
    SpanEvaluationData,
    SpanHead,
    SpanLogits,
    SpanScores,
    mixture_log_probabilities,
    score_spans,
    span_logits,
)
from macsc.method.stacked import StackedLinear

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
