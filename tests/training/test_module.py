"""The MaCSC module's forward/backward for each task kind and modality set, and its options."""

import pytest
import torch
from transformers import AutoTokenizer

from macsc.errors import ConfigError
from macsc.method.allocation import balanced_weights, coarse_weights, debiased_distribution
from macsc.method.calibration import SelfBalancingCalibration
from macsc.method.losses import multiscale_self_balancing_loss, self_balancing_contrastive_loss
from macsc.training.module import MaCSC

GAUSSIAN = {
    "image": {"kind": "gaussian", "dim": 24, "k": 4},
    "audio": {"kind": "gaussian", "dim": 40, "k": 4, "seed": 1},
    "video": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 2},
}
CLASSIFICATION = {"kind": "classification", "num_labels": 3, "metrics": ["accuracy", "f1"]}
REGRESSION = {
    "kind": "regression",
    "num_labels": 1,
    "metrics": ["spearman", "pearson"],
    "label_bins": [0, 1, 2, 3, 4, 5],
}
SENTENCES = [
    "a red apple on the table",
    "the sky is blue",
    "a loud drum",
    "green grass",
    "a dog barks",
    "snow is white",
]


def make_batch(model: MaCSC, tokenizer_path: str, labels: torch.Tensor) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    batch["labels"] = labels
    batch["prototypes"] = {}
    for name, extractor in model.extractors.items():
        out = extractor.extract(SENTENCES)
        batch["prototypes"][name] = {"features": out.features, "mask": out.mask}
    return batch


@pytest.mark.parametrize(
    "modalities",
    [["text"], ["text", "image"], ["text", "image", "audio"], ["text", "image", "audio", "video"]],
)
@pytest.mark.parametrize(
    "task,labels",
    [
        (CLASSIFICATION, torch.tensor([0, 1, 2, 0, 1, 1])),
        (REGRESSION, torch.tensor([0.0, 4.6, 2.2, 3.0, 5.0, 1.4])),
    ],
)
def test_forward_backward_every_modality_set_and_kind(tiny_backbone, modalities, task, labels):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=modalities,
        prototypes=GAUSSIAN,
        task=task,
        enhancer={"heads": 4},
    )
    batch = make_batch(model, tiny_backbone, labels)
    forward = model(batch)
    M = len(modalities)
    expected = (M, 6, 3) if task["kind"] == "classification" else (M, 6)
    assert forward.outputs.shape == expected
    losses = model.compute_losses(batch, forward)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.network.backbone.parameters()
    )
    if M > 1:
        assert model.objective.rho_logits.grad.abs().sum() > 0
        assert losses["pairs"].shape == (M * (M - 1),)
        # with two modalities each row of pi_z has a single entry, fixed at one
        assert (model.objective.calibration.z.grad.abs().sum() > 0) == (M > 2)
        projection = model.network.enhancers.project
        for index in range(M - 1):  # each modality's own block of the projection
            assert projection.weight.grad[:, projection.block(index)].abs().sum() > 0
    else:
        assert "msb" not in losses


def test_lambda_zero_gives_the_aggregation_loss_alone(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image"],
        prototypes=GAUSSIAN,
        task=CLASSIFICATION,
        objective={"lambda_msb": 0.0},
        enhancer={"heads": 4},
    )
    batch = make_batch(model, tiny_backbone, torch.tensor([0, 1, 2, 0, 1, 1]))
    losses = model.compute_losses(batch, model(batch))
    assert torch.equal(losses["total"], losses["wa"])


def test_enhancement_false_skips_attention(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image"],
        prototypes=GAUSSIAN,
        task=CLASSIFICATION,
        enhancer={"enabled": False},
    )
    assert not hasattr(model.network.enhancers, "attention")
    model.eval()
    batch = make_batch(model, tiny_backbone, torch.tensor([0, 1, 2, 0, 1, 1]))
    with torch.no_grad():
        text_only = model.network.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        pooled = model(batch).features
    # the text branch reads H^t unchanged; the image branch is the masked mean of P_m
    assert torch.allclose(pooled[0], text_only[:, 0], atol=1e-6)
    features = batch["prototypes"]["image"]["features"]
    image = model.network.enhancers.parameters_of("image")
    projected = features @ image["project.weight"].T + image["project.bias"]
    projected = projected + image["type_embedding"]
    assert torch.allclose(pooled[1], projected.mean(1), atol=1e-5)


def test_text_branch_is_mean_of_enhanced_text(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio"],
        prototypes=GAUSSIAN,
        task=CLASSIFICATION,
        enhancer={"heads": 4},
    ).eval()
    batch = make_batch(model, tiny_backbone, torch.tensor([0, 1, 2, 0, 1, 1]))
    with torch.no_grad():
        text = model.network.backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).last_hidden_state
        sources = [batch["prototypes"][name] for name in ("image", "audio")]
        enhanced = model.network.enhancers(
            text,
            batch["attention_mask"],
            [p["features"] for p in sources],
            [p["mask"] for p in sources],
        )[0]  # Ĥ^t_m of each modality: (M', B, l, d)
        expected = enhanced.mean(0)[:, 0]
        assert torch.allclose(model(batch).features[0], expected, atol=1e-5)


def test_calibration_module_equals_functional_eq13():
    torch.manual_seed(0)
    modalities = ["text", "image", "audio"]
    calibration = SelfBalancingCalibration(modalities, hidden_size=8, proj_dim=5, tau=0.2)
    with torch.no_grad():
        calibration.z.copy_(torch.randn(3, 3))
    pooled = torch.randn(3, 6, 8)
    dists = torch.softmax(torch.randn(3, 6, 4), -1)
    labels = torch.tensor([0, 1, 0, 1, 3, 3])
    mask = labels[:, None] == labels[None, :]
    out = calibration(calibration.project(pooled), dists, mask)
    feats = calibration.project(pooled)
    pair_losses = {}
    for a, m in enumerate(modalities):
        for b, k in enumerate(modalities):
            if a != b:
                w = balanced_weights(dists[a], dists[b], mask)  # the default (SPEC 5)
                pair_losses[(m, k)] = self_balancing_contrastive_loss(
                    feats[a], feats[b], w, mask, 0.2
                )
    expected = multiscale_self_balancing_loss(
        pair_losses, coarse_weights(calibration.z), modalities
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_prior_debiasing_changes_allocation(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image"],
        prototypes=GAUSSIAN,
        task=CLASSIFICATION,
        enhancer={"heads": 4},
    )
    logits = torch.randn(2, 4, 3)
    prior = torch.tensor([0.7, 0.2, 0.1])
    got = model.head.allocation_distributions(logits, prior, 1.0, {})
    assert torch.allclose(got, debiased_distribution(logits, prior, 1.0))
    assert not got.requires_grad


@pytest.mark.parametrize(
    "modalities,message",
    [
        (["image", "text"], "must start with 'text'"),
        (["text", "smell"], "unknown modality 'smell'"),
        ([], "must start with 'text'"),
    ],
)
def test_bad_modalities_are_clear(tiny_backbone, modalities, message):
    with pytest.raises(ConfigError, match=message):
        MaCSC(
            backbone=tiny_backbone, modalities=modalities, prototypes=GAUSSIAN, task=CLASSIFICATION
        )


def test_missing_backbone_is_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"model.backbone: the folder .*nope' does not exist"):
        MaCSC(backbone=str(tmp_path / "nope"), modalities=["text"], task=CLASSIFICATION)
