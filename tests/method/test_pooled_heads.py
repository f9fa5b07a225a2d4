"""The pooled heads' evaluation (classification and regression; SPEC 3-4) on crafted outputs:
metrics and per-example records against values computed by hand, without a model."""

from __future__ import annotations

import math

import pytest
import torch

from macsc.method.heads import EvaluationContext, HeadOutput, build_task_head
from macsc.task import TaskSpec
from tasks.base import TextSplit

BRANCHES = ["fused", "text", "image"]
RHO = torch.tensor([0.4, -0.2])  # rho = softmax: [0.6457, 0.3543]


class Examples:
    """What a data module's ``evaluation_split`` gives: the split's ids and texts."""

    def __init__(self, split: TextSplit) -> None:
        self.split = split

    def evaluation_split(self, stage, name):
        assert (stage, name) == ("val", "validation")
        return self.split


def evaluate(head, batches, split=None):
    """make_metrics -> update_metrics per batch -> compute_metrics, as the model does."""
    metrics = head.make_metrics(BRANCHES)
    for outputs, batch in batches:
        head.update_metrics(metrics, HeadOutput(outputs), None, RHO, batch)
    context = EvaluationContext("val", "validation", Examples(split) if split else None)
    return head.compute_metrics(metrics, context)


def mixture(logits: torch.Tensor) -> list[list[float]]:
    """Eq. 11 per example, written out: sum_m rho_m softmax(z_m)."""
    rho = [math.exp(r) / sum(math.exp(x) for x in RHO.tolist()) for r in RHO.tolist()]
    fused = []
    for b in range(logits.shape[1]):
        row = [0.0] * logits.shape[2]
        for m in range(logits.shape[0]):
            exps = [math.exp(v) for v in logits[m, b].tolist()]
            for c, e in enumerate(exps):
                row[c] += rho[m] * e / sum(exps)
        fused.append(row)
    return fused


# branch logits (M=2, B=5, C=3); the text branch predicts 0 1 2 0 2, the image branch 2 2 2 0 1
LOGITS = torch.tensor(
    [
        [[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [1, 0, 0], [0, 0.5, 1]],
        [[0, 0, 0.5], [0, 0, 3], [0, 0, 4], [4, 0, 0], [0, 2, 0]],
    ]
)
LABELS = torch.tensor([0, 1, 2, 2, 1])
NAMES = ["entailment", "neutral", "contradiction"]


def classification_head(num_labels=3, metrics=("accuracy", "f1"), names=NAMES):
    spec = TaskSpec("classification", num_labels, list(metrics), label_names=names)
    return build_task_head(spec, num_branches=2, hidden_size=4)


def macro_f1(predicted: list[int], gold: list[int], classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / classes


def test_classification_metrics_and_records_by_hand():
    texts = [f"sentence {i}" for i in range(5)]
    split = TextSplit("validation", "crafted", [texts], LABELS.tolist(), ids=list("abcde"))
    # two batches out of order, the second repeating example 1 (the distributed sampler's pad)
    first = (LOGITS[:, [3, 4]], {"labels": LABELS[[3, 4]], "example_index": torch.tensor([3, 4])})
    second_rows = [0, 1, 2, 1]
    second = (
        LOGITS[:, second_rows],
        {"labels": LABELS[second_rows], "example_index": torch.tensor(second_rows)},
    )
    result = evaluate(classification_head(), [first, second], split)

    fused = mixture(LOGITS)
    predicted = [max(range(3), key=row.__getitem__) for row in fused]
    gold = LABELS.tolist()
    # the duplicate of example 1 is scored twice by the metric objects, as torchmetrics does
    scored_predicted = [predicted[i] for i in (3, 4, 0, 1, 2, 1)]
    scored_gold = [gold[i] for i in (3, 4, 0, 1, 2, 1)]
    accuracy = sum(p == g for p, g in zip(scored_predicted, scored_gold, strict=True)) / 6
    assert result.metrics["accuracy"] == pytest.approx(accuracy)
    assert result.metrics["f1"] == pytest.approx(macro_f1(scored_predicted, scored_gold, 3))
    for m, branch in enumerate(["text", "image"]):
        branch_predicted = [int(LOGITS[m, i].argmax()) for i in (3, 4, 0, 1, 2, 1)]
        right = sum(p == g for p, g in zip(branch_predicted, scored_gold, strict=True))
        assert result.metrics[f"accuracy/{branch}"] == pytest.approx(right / 6)
        assert result.metrics[f"f1/{branch}"] == pytest.approx(
            macro_f1(branch_predicted, scored_gold, 3)
        )
    assert set(result.metrics) == {"accuracy", "f1", "accuracy/text", "f1/text"} | {
        "accuracy/image",
        "f1/image",
    }

    assert [record["id"] for record in result.records] == list("abcde")  # in split order, once
    for i, record in enumerate(result.records):
        assert record == {
            "id": "abcde"[i],
            "text": f"sentence {i}",
            "gold": NAMES[gold[i]],
            "prediction": NAMES[predicted[i]],
            "probability": pytest.approx(fused[i][predicted[i]], abs=1e-6),
            "correct": predicted[i] == gold[i],
            "branches": {
                "text": NAMES[int(LOGITS[0, i].argmax())],
                "image": NAMES[int(LOGITS[1, i].argmax())],
            },
        }
    assert round(result.records[0]["probability"], 6) == result.records[0]["probability"]


def test_the_state_is_reset_after_each_evaluation():
    head = classification_head()
    metrics = head.make_metrics(BRANCHES)
    batch = {"labels": LABELS, "example_index": torch.arange(5)}
    head.update_metrics(metrics, HeadOutput(LOGITS), None, RHO, batch)
    head.compute_metrics(metrics, EvaluationContext("val", "validation"))
    first_two = {"labels": LABELS[:2], "example_index": torch.arange(2)}
    head.update_metrics(metrics, HeadOutput(LOGITS[:, :2]), None, RHO, first_two)
    again = head.compute_metrics(metrics, EvaluationContext("val", "validation"))
    assert [record["id"] for record in again.records] == [0, 1]  # positions: no split known
    fused = mixture(LOGITS[:, :2])
    right = sum(
        max(range(3), key=row.__getitem__) == g for row, g in zip(fused, [0, 1], strict=True)
    )
    assert again.metrics["accuracy"] == pytest.approx(right / 2)


def test_binary_f1_is_the_positive_class_f1():
    logits = torch.tensor([[[0.0, 2], [2, 0], [0, 2], [0, 2]], [[0.0, 2], [2, 0], [2, 0], [0, 2]]])
    labels = torch.tensor([1, 1, 0, 1])
    head = classification_head(2, ("f1",), names=None)
    result = evaluate(head, [(logits, {"labels": labels, "example_index": torch.arange(4)})])
    predicted = [max(range(2), key=row.__getitem__) for row in mixture(logits)]
    tp = sum(p == 1 and g == 1 for p, g in zip(predicted, labels.tolist(), strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(predicted, labels.tolist(), strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(predicted, labels.tolist(), strict=True))
    assert result.metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result.records[0]["gold"] == 1 and result.records[0]["branches"]["text"] == 1


def test_unlabelled_batches_add_records_without_gold_and_no_metrics():
    head = classification_head()
    unlabelled = {"labels": torch.full((5,), -1), "example_index": torch.arange(5)}
    result = evaluate(head, [(LOGITS, unlabelled)])
    assert result.metrics == {}
    assert [record["gold"] for record in result.records] == [None] * 5
    assert [record["correct"] for record in result.records] == [None] * 5
    predicted = [max(range(3), key=row.__getitem__) for row in mixture(LOGITS)]
    assert [record["prediction"] for record in result.records] == [NAMES[p] for p in predicted]


BINS = [0.0, 1.0, 2.0, 3.0]
PREDICTIONS = torch.tensor([[0.2, 1.4, 2.6, 2.9, 0.8], [0.6, 0.9, 3.3, 1.2, 0.1]])
SCORES = torch.tensor([0.0, 1.5, 3.0, 2.2, 0.4])


def regression_head(metrics=("spearman", "pearson", "mse")):
    spec = TaskSpec("regression", 1, list(metrics), label_bins=BINS)
    return build_task_head(spec, num_branches=2, hidden_size=4)


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    return [float(order.index(i)) for i in range(len(values))]


def test_regression_metrics_and_records_by_hand():
    rho = torch.softmax(RHO, 0).tolist()
    fused = [rho[0] * a + rho[1] * b for a, b in zip(*PREDICTIONS.tolist(), strict=True)]
    gold = SCORES.tolist()
    batch = {"labels": SCORES, "example_index": torch.arange(5)}
    result = evaluate(regression_head(), [(PREDICTIONS, batch)])
    assert result.metrics["pearson"] == pytest.approx(pearson(fused, gold), abs=1e-5)
    assert result.metrics["spearman"] == pytest.approx(pearson(ranks(fused), ranks(gold)), abs=1e-5)
    mse = sum((f - g) ** 2 for f, g in zip(fused, gold, strict=True)) / 5
    assert result.metrics["mse"] == pytest.approx(mse, abs=1e-6)
    assert result.metrics["pearson/image"] == pytest.approx(
        pearson(PREDICTIONS[1].tolist(), gold), abs=1e-5
    )

    def nearest(value: float) -> int:
        return min(range(len(BINS)), key=lambda i: (abs(value - BINS[i]), i))

    for i, record in enumerate(result.records):
        assert record == {
            "id": i,
            "gold": pytest.approx(gold[i]),
            "prediction": pytest.approx(fused[i], abs=1e-6),
            "correct": nearest(fused[i]) == nearest(gold[i]),
            "branches": {
                "text": pytest.approx(PREDICTIONS[0, i].item(), abs=1e-6),
                "image": pytest.approx(PREDICTIONS[1, i].item(), abs=1e-6),
            },
        }
    assert any(record["correct"] for record in result.records)
    assert not all(record["correct"] for record in result.records)


def test_unlabelled_regression_records():
    result = evaluate(regression_head(), [(PREDICTIONS, {"example_index": torch.arange(5)})])
    assert result.metrics == {}
    assert [(r["gold"], r["correct"]) for r in result.records] == [(None, None)] * 5


def test_regression_loss_keys_and_prior_classes():
    head = regression_head()
    assert "bins" not in head.state_dict()  # not in checkpoints: the task spec holds them
    rho = torch.softmax(RHO, 0)
    loss = head.aggregation_loss(PREDICTIONS, RHO, {"labels": SCORES})
    fused = rho[0] * PREDICTIONS[0] + rho[1] * PREDICTIONS[1]
    assert loss.item() == pytest.approx(((fused - SCORES) ** 2).mean().item(), rel=1e-6)
    # nearest bin centre, a tie (1.5) going to the lower one
    assert head.positive_keys({"labels": SCORES}).tolist() == [0, 1, 3, 2, 0]
    assert head.prior_classes(SCORES).tolist() == [0, 1, 3, 2, 0]


def test_stacked_linear_is_m_linear_maps_with_the_default_uniform_init():
    from macsc.method.stacked import StackedLinear

    torch.manual_seed(0)
    layer = StackedLinear(branches=3, in_features=16, out_features=200)
    bound = 1 / math.sqrt(16)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.weight.shape == (3, 200, 16) and layer.bias.shape == (3, 200)
    for values in (layer.weight, layer.bias):
        assert values.abs().max() <= bound
        assert values.min() < -0.9 * bound and values.max() > 0.9 * bound
    x = torch.randn(3, 2, 5, 16)  # (M, B, L, d)
    expected = torch.stack(
        [x[m] @ layer.weight[m].T + layer.bias[m] for m in range(3)]
    )  # branch m's own nn.Linear
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_example_outputs_before_any_update_and_with_repeated_examples():
    from macsc.method.heads.records import ExampleOutputs

    empty = ExampleOutputs("score").compute()
    assert list(empty) == ["index"] and empty["index"].shape == (0,)
    assert empty["index"].dtype == torch.long
    outputs = ExampleOutputs("score")
    # the distributed sampler repeats examples: the first values seen of each index are kept
    index = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(0))
    outputs.update(index, score=torch.arange(len(index), dtype=torch.float))
    first_seen: dict[int, float] = {}
    for position, example in enumerate(index.tolist()):
        first_seen.setdefault(example, float(position))
    result = outputs.compute()
    assert result["index"].tolist() == sorted(first_seen)
    assert result["score"].tolist() == [first_seen[i] for i in sorted(first_seen)]


def test_stacked_linear_computes_in_the_input_dtype():
    from macsc.method.stacked import StackedLinear

    layer = StackedLinear(branches=2, in_features=8, out_features=3)  # float32 parameters
    x = torch.randn(2, 4, 8)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), layer(x), atol=5e-2)


def test_example_identity_and_class_names():
    from types import SimpleNamespace

    from macsc.method.heads.records import example_identity, named

    single = SimpleNamespace(segments=[["a", "b"]])  # no ids: the position is the id
    assert example_identity(single, 1) == {"id": 1, "text": "b"}
    no_ids = SimpleNamespace(segments=[["a", "b"]], ids=None)
    assert example_identity(no_ids, 0) == {"id": 0, "text": "a"}
    pairs = SimpleNamespace(segments=[["p0", "p1"], ["h0", "h1"]], ids=[7, 9])
    assert example_identity(pairs, 1) == {"id": 9, "text": ["p1", "h1"]}
    assert named(2, ["x", "y", "z"]) == "z" and named(3, ["x", "y", "z"]) == 3
    assert named(1, None) == 1


def test_unknown_head_kind_and_unknown_head_option_are_config_errors():
    from macsc.errors import ConfigError
    from macsc.method.heads.base import head_class

    with pytest.raises(ConfigError, match=r"no head for task kind 'poetry'; known kinds: \["):
        head_class("poetry")
    spec = TaskSpec("classification", 3, ["accuracy"])
    with pytest.raises(ConfigError, match="model.head_options for a classification task"):
        build_task_head(spec, num_branches=2, hidden_size=4, beam_size=3)


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec("classification", 3, ["accuracy"]),
        TaskSpec("regression", 1, ["pearson"], label_bins=BINS),
        TaskSpec("span", 2, ["exact", "f1"]),
    ],
    ids=lambda spec: spec.kind,
)
def test_head_dropout_is_off_by_default_and_reaches_the_head(spec):
    from macsc.method.heads.base import head_class

    assert build_task_head(spec, num_branches=2, hidden_size=4).dropout.p == 0.0
    assert head_class(spec.kind)(spec, 2, 4).dropout.p == 0.0
    assert head_class(spec.kind)(spec, 2, 4, 0.3).dropout.p == 0.3


def test_small_head_helpers(monkeypatch, tmp_path):
    from macsc.method.heads import base

    # share: rank 0's value through the broadcast, the value itself in one process
    assert EvaluationContext("val", "validation").share(5) == 5
    doubled = EvaluationContext("val", "validation", broadcast=lambda v: 2 * v)
    assert doubled.share(5) == 10
    assert base.prediction_folder(tmp_path, "test", "matched", 7) == tmp_path / "test_matched_step7"
    # a registered head is the head of its kind
    monkeypatch.setattr(base, "_HEADS", dict(base._HEADS))

    @base.register_head("poetry")
    class PoetryHead(base.TaskHead):
        pass

    assert base.head_class("poetry") is PoetryHead


def test_evaluation_loss_is_the_aggregation_loss_and_span_targets_need_both_ends():
    from macsc.method.heads.base import head_class

    spec = TaskSpec("classification", 3, ["accuracy"])
    head = build_task_head(spec, num_branches=2, hidden_size=4)
    outputs, rho = torch.randn(2, 4, 3), torch.tensor([0.5, -0.5])
    batch = {"labels": torch.tensor([0, 1, 2, 1])}
    log_rho = torch.log_softmax(rho, 0).view(2, 1, 1)
    # -mean log sum_m rho_m softmax(z_m)[y] (Eq. 12)
    fused = torch.logsumexp(log_rho + torch.log_softmax(outputs, -1), dim=0)
    expected = -fused[torch.arange(4), batch["labels"]].mean()
    torch.testing.assert_close(head.evaluation_loss(outputs, rho, batch), expected)
    span = head_class("span")(TaskSpec("span", 2, ["exact", "f1"]), 2, 4)
    both = {"start_positions": torch.zeros(1), "end_positions": torch.zeros(1)}
    assert span.has_targets(both)
    assert not span.has_targets({"start_positions": torch.zeros(1)})
    assert not span.has_targets({"end_positions": torch.zeros(1)})
    assert not span.has_targets({})


def test_a_split_of_one_example_gets_its_record():
    """One input given to a trained model (`macsc infer DIR --text ...`) is a split of one
    example: torchmetrics squeezes one-element results to scalars, which lost the batch dim."""
    context = EvaluationContext("predict", "validation")
    head = classification_head()
    metrics = head.make_metrics(BRANCHES)
    batch = {"example_index": torch.tensor([0])}
    head.update_metrics(metrics, HeadOutput(LOGITS[:, 1:2]), None, RHO, batch)
    (record,) = head.compute_metrics(metrics, context).records
    fused = mixture(LOGITS[:, 1:2])[0]
    assert record["prediction"] == NAMES[max(range(3), key=fused.__getitem__)]
    assert record["probability"] == pytest.approx(max(fused), abs=1e-6)
    assert record["branches"] == {"text": NAMES[1], "image": NAMES[2]}

    head = regression_head()
    metrics = head.make_metrics(BRANCHES)
    head.update_metrics(metrics, HeadOutput(torch.tensor([[2.0], [4.0]])), None, RHO, batch)
    (record,) = head.compute_metrics(metrics, context).records
    rho = torch.softmax(RHO, 0).tolist()
    assert record["prediction"] == pytest.approx(2.0 * rho[0] + 4.0 * rho[1], abs=1e-6)
    assert record["branches"] == {"text": 2.0, "image": 4.0} and record["gold"] is None
