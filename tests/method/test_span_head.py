"""SpanHead: the QA mixture loss, identity positives, context-restricted allocation
distributions, and SQuAD metrics on crafted logits (hand-checked EM / F1)."""

from __future__ import annotations

import math

import pytest
import torch

from macsc.method.heads import (
    EvaluationContext,
    HeadOutput,
    SpanEvaluationData,
    SpanLogits,
    build_task_head,
    score_spans,
)
from macsc.method.network import BranchRepresentations
from macsc.task import TaskSpec

SPEC = TaskSpec(kind="span", num_labels=2, metrics=["exact", "f1"])
CONTEXT = "Denver Broncos won Super Bowl 50."
# [CLS] q q [SEP] Denver Broncos won Super Bowl 50 . [SEP] (+ one padding column in batches)
OFFSETS = [None] * 4 + [(0, 6), (7, 14), (15, 18), (19, 24), (25, 29), (30, 32), (32, 33), None]
LENGTH = len(OFFSETS)


def head(branches=2, hidden=8):
    return build_task_head(SPEC, branches, hidden)


def test_forward_gives_start_and_end_per_branch():
    text, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    enhanced = torch.randn(2, 2, 5, 8)  # (M', B, l, d)
    prototypes = torch.randn(2, 2, 4, 8)
    masks = torch.ones(2, 2, 4, dtype=torch.bool)
    representations = BranchRepresentations(text, mask, enhanced, prototypes, masks, None, "first")
    output = head(3)(representations, {})
    assert output.outputs.shape == (3, 2, 5, 2) and output.features.shape == (3, 2, 8)


def test_loss_is_the_mean_of_start_and_end_mixture_cross_entropies():
    torch.manual_seed(0)
    M, B, L = 3, 4, 6
    outputs = torch.randn(M, B, L, 2)
    rho_logits = torch.randn(M)
    attention = torch.ones(B, L, dtype=torch.long)
    attention[1, 4:] = 0
    attention[3, 3:] = 0
    batch = {
        "attention_mask": attention,
        "start_positions": torch.tensor([0, 2, 5, 1]),
        "end_positions": torch.tensor([3, 3, 5, 2]),
    }
    loss = head(M).aggregation_loss(outputs, rho_logits, batch)

    rho = torch.softmax(rho_logits, 0)
    expected = 0.0
    for b in range(B):
        real = int(attention[b].sum())
        for side, targets in enumerate((batch["start_positions"], batch["end_positions"])):
            probability = sum(
                rho[m] * torch.softmax(outputs[m, b, :real, side], 0)[targets[b]] for m in range(M)
            )
            expected += -math.log(probability) / (2 * B)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_positives_are_the_same_example_only():
    batch = {"input_ids": torch.zeros(5, 7, dtype=torch.long)}
    keys = head().positive_keys(batch)
    assert torch.equal(keys.unsqueeze(0) == keys.unsqueeze(1), torch.eye(5, dtype=torch.bool))
    assert head().identity_positives and not head().uses_prior


def test_allocation_distributions_live_on_the_answer_positions():
    torch.manual_seed(1)
    outputs = torch.randn(2, 2, 6, 2, requires_grad=True)
    context = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    batch = {"context_mask": context, "attention_mask": attention}
    distributions = head().allocation_distributions(outputs, torch.ones(1), 0.0, batch)
    assert distributions.shape == (2, 2, 2, 6) and not distributions.requires_grad
    start, end = distributions[:, :, 0], distributions[:, :, 1]
    for half, side in ((start, 0), (end, 1)):
        assert torch.allclose(half.sum(-1), torch.ones(2, 2))
        assert (half[:, ~context] == 0).all()
        expected = torch.softmax(outputs[1, 0, [0, 3, 4], side].detach(), 0)
        assert torch.allclose(half[1, 0, [0, 3, 4]], expected)


def crafted_logits(spans, cls_scores, branches=2):
    """Head outputs (M, B, LENGTH + 1, 2): zero everywhere but the given (start, end) scores at
    the given positions and at CLS; the last column is batch padding with a huge score."""
    outputs = torch.zeros(branches, len(spans), LENGTH + 1, 2)
    for row, ((start, end, score), cls) in enumerate(zip(spans, cls_scores, strict=True)):
        outputs[:, row, start, 0] = score
        outputs[:, row, end, 1] = score
        outputs[:, row, 0, :] = cls
    outputs[:, :, LENGTH, :] = 100.0  # padding must be ignored
    return outputs


class FakeData:
    """Stands in for the data module: what SpanHead.compute_metrics reads."""

    def __init__(self, examples, version_2):
        features = {
            "example_id": [e["id"] for e in examples],
            "offset_mapping": [OFFSETS] * len(examples),
            "null_index": [0] * len(examples),
        }
        self.data = SpanEvaluationData(examples, features, version_2)

    def span_evaluation(self, stage, split):
        assert (stage, split) == ("val", "validation")
        return self.data


def example(qid, answer):
    answers = {
        "text": [answer] if answer else [],
        "answer_start": [CONTEXT.find(answer)] if answer else [],
    }
    return {"id": qid, "context": CONTEXT, "question": "?", "answers": answers}


def evaluate(span_head, examples, outputs, version_2):
    metrics = span_head.make_metrics(["fused", "text", "image"])
    batch = {
        "attention_mask": torch.cat(
            [torch.ones(len(examples), LENGTH), torch.zeros(len(examples), 1)], 1
        ),
        "feature_index": torch.arange(len(examples)),
    }
    span_head.update_metrics(metrics, HeadOutput(outputs), None, torch.tensor([0.3, -0.2]), batch)
    context = EvaluationContext("val", "validation", FakeData(examples, version_2))
    return span_head.compute_metrics(metrics, context)


def test_v2_metrics_at_the_best_null_threshold_and_the_files():
    examples = [example("a", "Denver Broncos"), example("b", None), example("c", "Super Bowl 50")]
    # a: "Denver Broncos" (right); b: "Super Bowl" but CLS scores higher; c: "Super Bowl" (F1 0.8)
    outputs = crafted_logits([(4, 5, 10.0), (7, 8, 5.0), (7, 8, 10.0)], [0.0, 8.0, 0.0])
    result = evaluate(head(), examples, outputs, True)
    values = result.metrics
    # null odds: a -20, b 16 - 10 = +6, c -20; the best F1 threshold (-20) answers a and c only
    expected = {
        "exact": 200 / 3,
        "f1": 280 / 3,
        "HasAns_exact": 50.0,
        "HasAns_f1": 90.0,
        "NoAns_exact": 100.0,
        "NoAns_f1": 100.0,
        "best_f1": 280 / 3,
        "best_f1_thresh": -20.0,
    }
    for name, value in expected.items():
        for key in (name, f"{name}/text", f"{name}/image"):
            assert values[key] == pytest.approx(value, abs=1e-3), key
    assert result.files["predictions.json"] == {"a": "Denver Broncos", "b": "", "c": "Super Bowl"}
    assert result.files["null_odds.json"]["b"] == pytest.approx(6.0, abs=1e-3)
    # one record per question: its answer, EM and F1 (c: "Super Bowl" vs "Super Bowl 50")
    records = {record["id"]: record for record in result.records}
    assert records["a"]["correct"] and records["a"]["f1"] == 1.0
    assert records["b"]["prediction"] == "" and records["b"]["gold"] == []
    assert records["b"]["exact"] == 1 and records["b"]["correct"]
    assert records["c"]["exact"] == 0 and records["c"]["f1"] == pytest.approx(0.8)
    assert not records["c"]["correct"] and records["c"]["branches"]["image"] == "Super Bowl"


def test_v1_metrics_and_no_null_odds_file():
    examples = [example("a", "Denver Broncos"), example("c", "Super Bowl 50")]
    outputs = crafted_logits([(4, 5, 10.0), (7, 8, 10.0)], [0.0, 30.0])  # CLS is no answer in v1
    result = evaluate(head(), examples, outputs, False)
    values = result.metrics
    assert values["exact"] == pytest.approx(50.0) and values["f1"] == pytest.approx(90.0)
    assert values["f1/image"] == pytest.approx(90.0)
    assert not any(name.startswith("NoAns") for name in values)
    assert set(result.files) == {"predictions.json"}


def test_span_logits_keep_real_tokens_and_the_first_copy_of_a_feature():
    metric = SpanLogits()
    start = torch.arange(8.0).view(2, 4)
    metric.update(start, -start, torch.tensor([4, 2]), torch.tensor([7, 3]))
    metric.update(start + 1, start, torch.tensor([4, 4]), torch.tensor([3, 9]))  # 3 again
    result = metric.compute()
    assert sorted(result) == [3, 7, 9]
    assert result[3][0].tolist() == [4.0, 5.0] and result[3][1].tolist() == [-4.0, -5.0]
    assert result[9][0].tolist() == [5.0, 6.0, 7.0, 8.0]


def test_a_partial_pass_scores_the_questions_it_saw():
    examples = [example("a", "Denver Broncos"), example("b", None), example("c", "Super Bowl 50")]
    data = FakeData(examples, True).data
    start = torch.zeros(LENGTH).index_fill(0, torch.tensor([4]), 10.0).numpy()
    end = torch.zeros(LENGTH).index_fill(0, torch.tensor([5]), 10.0).numpy()
    scores = score_spans(data, {0: (start, end)})  # only the feature of "a" was evaluated
    assert scores.predictions == {"a": "Denver Broncos"}
    assert scores.metrics["exact"] == 100.0 and "NoAns_exact" not in scores.metrics
