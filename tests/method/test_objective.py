"""The model's objective and heads, checked against independent expectations: what the
contrastive features are for every task kind, lambda and the reduction, detached allocation
targets, padding invariance, gathering, and the class prior from the data (issues 9 and 14)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer

from macsc.method.allocation import class_prior, debiased_distribution
from macsc.method.objective import DeviceGroup, gather_batch
from macsc.method.options import ObjectiveOptions
from macsc.training.module import MaCSC

PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 24, "k": 4},
    "audio": {"kind": "gaussian", "dim": 40, "k": 3},
}
KINDS = {
    "classification": {"kind": "classification", "num_labels": 3, "metrics": ["accuracy"]},
    "regression": {
        "kind": "regression",
        "num_labels": 1,
        "metrics": ["spearman"],
        "label_bins": [0, 1, 2, 3, 4, 5],
    },
    "span": {"kind": "span", "num_labels": 2, "metrics": ["exact", "f1"]},
}
SENTENCES = [
    "a red apple on the table near the window",
    "the sky",
    "a loud drum in the hall",
    "green grass",
]


def model_of(backbone: str, kind: str, **options) -> MaCSC:
    torch.manual_seed(0)
    options = {"enhancer": {"heads": 4}, "prototypes": PROTOTYPES, **options}
    return MaCSC(
        backbone=backbone, modalities=["text", "image", "audio"], task=KINDS[kind], **options
    ).eval()


def batch_of(model: MaCSC, backbone: str, kind: str, sentences=SENTENCES) -> dict:
    batch = dict(
        AutoTokenizer.from_pretrained(backbone)(sentences, padding=True, return_tensors="pt")
    )
    size, length = batch["input_ids"].shape
    if kind == "classification":
        batch["labels"] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1][:size])
    elif kind == "regression":
        batch["labels"] = torch.tensor([0.0, 4.6, 2.2, 3.0, 5.0, 1.4, 2.0, 0.5][:size])
    else:
        real = batch["attention_mask"].sum(-1)
        batch["context_mask"] = (torch.arange(length)[None] >= 2) & (
            torch.arange(length)[None] < real[:, None] - 1
        )
        batch["start_positions"] = torch.full((size,), 2)
        batch["end_positions"] = (real - 2).clamp_min(2)
        batch["feature_index"] = torch.arange(size)
    batch["prototypes"] = {}
    for name, extractor in model.extractors.items():
        out = extractor.extract(list(sentences))
        batch["prototypes"][name] = {"features": out.features, "mask": out.mask}
    return batch


@pytest.mark.parametrize("kind", KINDS)
def test_each_branchs_contrastive_feature_pools_what_its_head_reads(tiny_backbone, kind):
    model = model_of(tiny_backbone, kind)
    batch = batch_of(model, tiny_backbone, kind)
    seen = []
    model.head.linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        features = model(batch).features
    (read,) = seen  # (M, B, d) pooled, or (M, B, l, d) tokens for span
    if kind == "span":
        # the text head reads H^t, a modality's reads Ĥ^t_m: the feature is its CLS row
        assert read.dim() == 4
        torch.testing.assert_close(features, read[:, :, 0])
        text = model.network.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        torch.testing.assert_close(features[0], text[:, 0])
    else:
        torch.testing.assert_close(features, read)


@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_reaches_an_allocation_target(tiny_backbone, kind):
    model = model_of(tiny_backbone, kind).train()
    batch = batch_of(model, tiny_backbone, kind)
    outputs = model(batch).outputs
    assert outputs.requires_grad
    distributions = model.head.allocation_distributions(
        outputs, model.objective.class_prior, 1.0, batch
    )
    assert not distributions.requires_grad and distributions.grad_fn is None


def test_regression_targets_are_debiased_soft_bins(tiny_backbone):
    model = model_of(tiny_backbone, "regression")
    outputs = torch.tensor([[0.0, 2.4, 5.0], [1.5, 3.0, 4.9], [2.0, 2.0, 2.0]], requires_grad=True)
    prior = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.2, 0.1])
    got = model.head.allocation_distributions(outputs, prior, 1.0, {})
    for m in range(3):
        for b in range(3):
            soft = torch.softmax(-((outputs[m, b].detach() - torch.arange(6.0)) ** 2) / 1.0, 0)
            expected = torch.softmax(soft.log() - prior.log(), 0)
            torch.testing.assert_close(got[m, b], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lam", [0.1, 0.5, 2.0])
def test_total_is_wa_plus_lambda_times_msb(tiny_backbone, lam):
    model = model_of(tiny_backbone, "classification", objective={"lambda_msb": lam})
    batch = batch_of(model, tiny_backbone, "classification")
    with torch.no_grad():
        losses = model.compute_losses(batch, model(batch))
    reference = model_of(tiny_backbone, "classification", objective={"lambda_msb": 1.0})
    with torch.no_grad():
        unit = reference.compute_losses(batch, reference(batch))
    torch.testing.assert_close(losses["msb"], unit["msb"])  # lambda weighs it, nothing else
    torch.testing.assert_close(losses["total"], losses["wa"] + lam * losses["msb"])


@pytest.mark.parametrize("kind", ["classification", "span"])
def test_reduction_sum_sums_both_terms(tiny_backbone, kind):
    """Eq. 8 and Eq. 12 both sum over the examples: with `sum` the whole objective is B times
    its `mean` value, so lambda keeps its meaning."""
    mean = model_of(tiny_backbone, kind, objective={"reduction": "mean"})
    summed = model_of(tiny_backbone, kind, objective={"reduction": "sum"})
    batch = batch_of(mean, tiny_backbone, kind)
    with torch.no_grad():
        a, b = mean.compute_losses(batch, mean(batch)), summed.compute_losses(batch, summed(batch))
    size = len(SENTENCES)
    for term in ("wa", "msb", "total"):
        torch.testing.assert_close(b[term], size * a[term], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooling", ["first", "last", "mean"])
def test_a_samples_outputs_do_not_depend_on_its_batch(tiny_backbone, kind, pooling):
    """Padding invariance: the key-padding mask, the pooling of right-padded batches and the
    masked means all keep a sample's outputs what they are when it runs alone."""
    model = model_of(tiny_backbone, kind, text_pooling=pooling)
    short = SENTENCES[1]
    with torch.no_grad():
        alone = model(batch_of(model, tiny_backbone, kind, [short]))
        padded = model(batch_of(model, tiny_backbone, kind, [SENTENCES[0], short]))
    length = alone.outputs.shape[2] if kind == "span" else None
    got = padded.outputs[:, 1:2, :length] if kind == "span" else padded.outputs[:, 1:2]
    torch.testing.assert_close(got, alone.outputs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.features[:, 1:2], alone.features, atol=1e-5, rtol=1e-4)


def test_gathering_pads_span_distributions_and_offsets_identity_keys():
    """Two ranks simulated in one process: rank 1's span distributions are shorter; the
    gathered tensors hold both ranks, padded with zeros, and identity keys stay unique."""
    features = [torch.randn(3, 2, 4), torch.randn(3, 2, 4)]
    distributions = [torch.rand(3, 2, 2, 7), torch.rand(3, 2, 2, 5)]
    keys = [torch.arange(2), torch.arange(2)]

    def gathered(rank):
        def all_gather(tensor):
            if tensor.dim() == 0:  # each rank's length
                return torch.tensor([7, 5])
            parts = {3: [features[r].transpose(0, 1) for r in range(2)], 1: keys}
            if tensor.dim() == 4 and tensor.shape[0] == 2:
                parts = [
                    torch.nn.functional.pad(d, (0, 7 - d.shape[-1])).transpose(0, 1)
                    for d in distributions
                ]
                return torch.stack(parts)
            return torch.stack(parts[tensor.dim()])

        return gather_batch(
            features[rank], distributions[rank], keys[rank], DeviceGroup(all_gather, 2, rank), True
        )

    f, d, k = gathered(1)
    assert k.tolist() == [0, 1, 2, 3]
    assert f.shape == (3, 4, 4) and d.shape == (3, 4, 2, 7)
    torch.testing.assert_close(d[:, 2:, :, :5], distributions[1])
    assert (d[:, 2:, :, 5:] == 0).all()
    torch.testing.assert_close(f[:, :2], features[0])


def test_the_class_prior_comes_from_the_skewed_training_split(tiny_backbone, tmp_path):
    from tasks.base import TextSplit
    from tasks.demo import DemoDataModule

    labels = [0] * 9 + [1] * 3  # 3:1, not balanced
    texts = [f"sentence number {i}" for i in range(12)]

    class Skewed(DemoDataModule):
        def load_split(self, name):
            return TextSplit(name, "memory", [texts], labels)

    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image"],
        prototypes={"image": {"kind": "gaussian", "dim": 8, "k": 2}},
        task=DemoDataModule().task_spec.to_dict(),
        enhancer={"heads": 4},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=Skewed(batch_size=4, cache_dir=False))
    expected = torch.tensor([10 / 14, 4 / 14])  # add-one smoothed
    torch.testing.assert_close(model.objective.class_prior, expected)
    torch.testing.assert_close(expected, class_prior(torch.tensor(labels), 2))
    # and it debiases: a branch that says "class 0" with the prior's odds is neutral
    neutral = debiased_distribution(expected.log()[None], model.objective.class_prior, 1.0)
    torch.testing.assert_close(neutral, torch.tensor([[0.5, 0.5]]))


def test_training_without_the_labels_warns_that_the_prior_stays_uniform(tiny_backbone):
    model = model_of(tiny_backbone, "classification")
    batch = batch_of(model, tiny_backbone, "classification")
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="class prior pi_e of Eq. 4 stays uniform"):
        trainer.fit(model.train(), train_dataloaders=loader)
    torch.testing.assert_close(model.objective.class_prior, torch.full((3,), 1 / 3))


def test_gathering_over_three_ranks_pads_this_ranks_distributions_and_scales_its_gradient():
    """Rank 1 of 3 with the shortest span distributions (5 of 7 positions): what it contributes
    to the all-gather is its own distributions zero-padded to 7, and the gradient reaching its
    features is scaled by the world size (DDP then averages it back, SPEC 6)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 2, 4, generator=generator, requires_grad=True)  # (M, B, D)
    distributions = torch.rand(3, 2, 2, 5, generator=generator)  # (M, B, 2, C=5)
    # what ranks 0 and 2 contribute, by the dim of the gathered tensor
    others = {
        3: [torch.randn(2, 3, 4), torch.randn(2, 3, 4)],  # features (B, M, D)
        4: [torch.rand(2, 3, 2, 7), torch.rand(2, 3, 2, 7)],  # distributions (B, M, 2, 7)
    }

    def all_gather(tensor):
        if tensor.dim() == 0:  # each rank's length
            assert tensor.item() == 5
            return torch.tensor([7, 5, 6])
        if tensor.dim() == 1:  # the keys
            return torch.stack([tensor] * 3)
        before, after = others[tensor.dim()]
        return torch.stack([before, tensor, after])  # fails unless the shapes agree

    f, d, k = gather_batch(
        features, distributions, torch.arange(2), DeviceGroup(all_gather, 3, 1), True
    )
    assert k.tolist() == [0, 1, 2, 3, 4, 5]
    padded = torch.cat([distributions, torch.zeros(3, 2, 2, 2)], dim=-1)
    assert d.shape == (3, 6, 2, 7) and torch.equal(d[:, 2:4], padded)
    torch.testing.assert_close(f[:, 2:4], features.detach())
    f[:, 2:4].sum().backward()
    assert torch.equal(features.grad, torch.full_like(features, 3.0))


def test_the_calibration_exists_for_two_or_more_modalities_with_msb_on():
    from macsc.method.heads import build_task_head
    from macsc.method.objective import MaCSCObjective
    from macsc.task import TaskSpec

    head = build_task_head(TaskSpec("classification", 3, ["accuracy"]), 2, hidden_size=4)
    assert MaCSCObjective(["text", "image"], 4, head).calibration is not None
    assert (
        MaCSCObjective(["text", "image"], 4, head, ObjectiveOptions(lambda_msb=0)).calibration
        is None
    )
    solo = build_task_head(TaskSpec("classification", 3, ["accuracy"]), 1, hidden_size=4)
    assert MaCSCObjective(["text"], 4, solo).calibration is None


def test_the_objective_gathers_only_when_asked_and_there_are_other_ranks():
    from macsc.method.heads import HeadOutput, build_task_head
    from macsc.method.objective import MaCSCObjective
    from macsc.task import TaskSpec

    head = build_task_head(TaskSpec("classification", 3, ["accuracy"]), 2, hidden_size=4)
    output = HeadOutput(torch.randn(2, 3, 3), torch.randn(2, 3, 4))
    batch = {"labels": torch.tensor([0, 1, 2]), "input_ids": torch.zeros(3, 5, dtype=torch.long)}

    def no_gather(tensor):
        raise AssertionError("gathered")

    by_default = MaCSCObjective(["text", "image"], 4, head)  # gather_across_devices off
    assert torch.isfinite(by_default(head, output, batch, DeviceGroup(no_gather, 2, 0))["total"])
    alone = MaCSCObjective(["text", "image"], 4, head, ObjectiveOptions(gather_across_devices=True))
    assert torch.isfinite(alone(head, output, batch, DeviceGroup(no_gather, 1, 0))["total"])
