"""The objective's wiring (Eq. 4, 13, 14; SPEC 3-5) on crafted head outputs, without a backbone:
the positive mask it builds from the labels, what it reports, the terms it checks, its defaults,
and gathering across two simulated DDP ranks, which must give the single-process loss on the
concatenated batch and, once DDP averages them, its gradients. Found by mutation testing."""

from __future__ import annotations

import math

import pytest
import torch

from macsc.errors import ConfigError
from macsc.method.heads import HeadOutput, build_task_head
from macsc.method.objective import DeviceGroup, MaCSCObjective
from macsc.method.options import ObjectiveOptions
from macsc.task import TaskSpec
from tests.method.test_calibration_reference import reference_msb

MODALITIES = ["text", "image", "audio"]
HIDDEN = 6


def classification():
    return build_task_head(TaskSpec("classification", 3), len(MODALITIES), HIDDEN)


def span():
    return build_task_head(TaskSpec("span", 2, ["exact", "f1"]), len(MODALITIES), HIDDEN)


def objective_of(head, **options):
    torch.manual_seed(0)
    options = ObjectiveOptions(proj_dim=4, **options)
    objective = MaCSCObjective(MODALITIES, HIDDEN, head, options).double()
    with torch.no_grad():
        objective.calibration.z.copy_(torch.randn(3, 3))
        objective.rho_logits.copy_(torch.tensor([0.2, -0.1, 0.4]))
    return objective


def classification_batch(size, seed):
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(3, size, 3, generator=generator, dtype=torch.double)
    pooled = torch.randn(3, size, HIDDEN, generator=generator, dtype=torch.double)
    labels = torch.randint(0, 3, (size,), generator=generator)
    batch = {"labels": labels, "input_ids": torch.zeros(size, 4, dtype=torch.long)}
    return outputs, pooled, batch


def projected(objective, pooled):
    """``normalize(W_m x + b_m)`` written out."""
    calibration = objective.calibration
    rows = (
        torch.einsum("mbd,mpd->mbp", pooled, calibration.proj_weight)
        + calibration.proj_bias[:, None]
    )
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_msb_uses_the_positives_of_equal_labels_and_the_debiased_predictions(alpha):
    head = classification()
    objective = objective_of(head, lambda_msb=0.7, alpha=alpha)
    prior = torch.tensor([0.5, 0.3, 0.2])
    objective.set_class_prior(head, torch.tensor([0] * 4 + [1] * 2 + [2]))  # add-one: 5:3:2
    torch.testing.assert_close(objective.class_prior, prior.double(), rtol=1e-6, atol=0)
    outputs, pooled, batch = classification_batch(6, 1)
    batch["labels"] = torch.tensor([0, 1, 0, 2, 1, 0])
    result = objective(head, HeadOutput(outputs, pooled), batch)

    labels = batch["labels"].tolist()
    positive = [[labels[i] == labels[j] for j in range(6)] for i in range(6)]
    debiased = [
        [
            [math.exp(v - alpha * math.log(p)) for v, p in zip(row, prior.tolist(), strict=True)]
            for row in branch
        ]
        for branch in outputs.tolist()
    ]
    debiased = [[[v / sum(row) for v in row] for row in branch] for branch in debiased]
    want = reference_msb(
        projected(objective, pooled).tolist(),
        debiased,
        positive,
        0.1,
        "balanced",
        objective.calibration.z.tolist(),
    )
    assert result["msb"].item() == pytest.approx(want, rel=1e-6)
    assert result["total"].item() == pytest.approx(result["wa"].item() + 0.7 * want, rel=1e-6)
    z = objective.calibration.z.detach()
    off = ~torch.eye(3, dtype=torch.bool)
    want_pi = torch.softmax(z.masked_fill(~off, -math.inf), -1).masked_fill(~off, 0)
    torch.testing.assert_close(result["pi_z"], want_pi)
    assert result["agreement"].shape == (6,) and result["pairs"].shape == (6,)


def test_the_checked_terms_are_wa_msb_and_every_pair():
    head = classification()
    objective = objective_of(head)
    outputs, pooled, batch = classification_batch(4, 2)
    result = objective(head, HeadOutput(outputs, pooled), batch)
    pairs = [f"pair {m}->{k}" for m in MODALITIES for k in MODALITIES if m != k]
    assert objective.term_names == ["wa", "msb", *pairs]
    want = torch.cat([result["wa"].reshape(1), result["msb"].reshape(1), result["pairs"]])
    torch.testing.assert_close(objective.terms(result), want.float())
    alone = MaCSCObjective(MODALITIES, HIDDEN, head, ObjectiveOptions(lambda_msb=0.0))
    assert alone.term_names == ["wa"] and alone.calibration is None
    torch.testing.assert_close(alone.terms({"wa": torch.tensor(2.5)}), torch.tensor([2.5]))


def test_defaults_and_what_a_kind_without_late_fusion_refuses():
    head = classification()
    objective = MaCSCObjective(MODALITIES, HIDDEN, head)
    assert objective.lambda_msb == 0.2 and objective.alpha == 1.0  # paper A.3, SPEC 4
    assert objective.calibration.tau == 0.1 and objective.calibration.proj_weight.shape[1] == 128
    assert objective.rho_logits.tolist() == [0.0, 0.0, 0.0]
    assert objective.class_prior.tolist() == pytest.approx([1 / 3] * 3)
    assert MaCSCObjective(MODALITIES, HIDDEN, span()).alpha == 0.0  # spans have no prior
    generation = build_task_head(TaskSpec("generation", 1, ["bleu_4"]), 3, HIDDEN)
    with pytest.raises(ConfigError, match="model.objective.lambda_msb=0.2: a generation task"):
        MaCSCObjective(MODALITIES, HIDDEN, generation, ObjectiveOptions(lambda_msb=0.2))
    assert MaCSCObjective(["text"], HIDDEN, head).calibration is None


def two_ranks(make_batch, head, reduction):
    """Each rank's loss with gathering (the other rank's tensors served by a recorded pass),
    and the single-process loss on the concatenated batch, with the gradients of both."""
    parts = [make_batch(3, seed) for seed in (10, 11)]

    def run(rank, devices, objective):
        outputs, pooled, batch = parts[rank]
        leaves = outputs.clone().requires_grad_(), pooled.clone().requires_grad_()
        result = objective(head, HeadOutput(*leaves), batch, devices)
        return result, leaves

    records = [[], []]

    def recording(rank):
        def all_gather(tensor):
            records[rank].append(tensor.detach().clone())
            return torch.stack([tensor, tensor])

        return DeviceGroup(all_gather, 2, rank)

    def serving(rank):
        calls = iter(range(100))

        def all_gather(tensor):
            i = next(calls)
            return torch.stack([records[0][i], records[1][i]])

        return DeviceGroup(all_gather, 2, rank)

    for rank in (0, 1):
        objective = objective_of(head, gather_across_devices=True, reduction=reduction)
        run(rank, recording(rank), objective)
    ranks = []
    for rank in (0, 1):
        objective = objective_of(head, gather_across_devices=True, reduction=reduction)
        result, leaves = run(rank, serving(rank), objective)
        result["total"].backward()
        ranks.append((result, leaves, objective))

    whole = [torch.cat([p[i] for p in parts], dim=1) for i in range(2)]
    batch = {
        key: torch.cat([p[2][key] for p in parts]) for key in parts[0][2] if key != "input_ids"
    }
    batch["input_ids"] = torch.zeros(6, 4, dtype=torch.long)
    single = objective_of(head, reduction=reduction)
    leaves = whole[0].clone().requires_grad_(), whole[1].clone().requires_grad_()
    result = single(head, HeadOutput(*leaves), batch, DeviceGroup(None, 1, 0))
    result["total"].backward()
    return ranks, (result, leaves, single)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_gathering_ranks_give_the_single_process_loss_and_gradients(reduction):
    head = classification()
    ranks, (single, leaves, objective) = two_ranks(classification_batch, head, reduction)
    for result, _, _ in ranks:  # every rank computes L_msb over the global batch
        assert result["msb"].item() == pytest.approx(single["msb"].item(), rel=1e-5)
    # DDP averages over the ranks: L_wa, and every parameter's gradient
    mean_wa = (ranks[0][0]["wa"] + ranks[1][0]["wa"]) / 2
    assert mean_wa.item() == pytest.approx(single["wa"].item(), rel=1e-5)
    for name, parameter in objective.named_parameters():
        averaged = sum(dict(o.named_parameters())[name].grad for _, _, o in ranks) / 2
        torch.testing.assert_close(averaged, parameter.grad, rtol=1e-5, atol=1e-7)
    # each rank's features get twice their single-process gradient, so the average is exact
    for rank, (_, (_, pooled), _) in enumerate(ranks):
        part = slice(3 * rank, 3 * rank + 3)
        torch.testing.assert_close(pooled.grad / 2, leaves[1].grad[:, part], rtol=1e-5, atol=1e-7)


def span_batch(size, seed):
    generator = torch.Generator().manual_seed(seed)
    length = 5
    outputs = torch.randn(3, size, length, 2, generator=generator, dtype=torch.double)
    pooled = torch.randn(3, size, HIDDEN, generator=generator, dtype=torch.double)
    batch = {
        "input_ids": torch.zeros(size, length, dtype=torch.long),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "context_mask": torch.tensor([[False, True, True, True, False]] * size),
        "start_positions": torch.randint(1, 4, (size,), generator=generator),
        "end_positions": torch.randint(1, 4, (size,), generator=generator),
    }
    return outputs, pooled, batch


def test_gathered_identity_positives_stay_one_example_each():
    head = span()
    ranks, (single, _, _) = two_ranks(span_batch, head, "mean")
    for result, _, _ in ranks:
        assert result["msb"].item() == pytest.approx(single["msb"].item(), rel=1e-5)
