"""The optimiser and learning-rate schedule a config names (``model.optimizer.name``,
``model.optimizer.schedule``): AdamW with warm-up and linear decay for MaCSC, and for the T5 baseline
Adafactor at T5's constant rate (SPEC 10; Raffel et al. 2020, §3.1.2)."""

import lightning as L
import pytest
import torch

from macsc.errors import ConfigError
from macsc.training.module import MaCSC
from macsc.training.optim import OptimizerOptions

TASK = {"kind": "classification", "num_labels": 2, "metrics": ["accuracy"]}


def configured(backbone: str, **options) -> dict:
    model = MaCSC(
        backbone=backbone,
        modalities=["text"],
        task=TASK,
        objective={"lambda_msb": 0.0},
        optimizer=OptimizerOptions(**options),
    )
    model.trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False)
    return model.configure_optimizers()


def rates(setup: dict) -> list[float]:
    """The learning rate of each of the run's 10 steps, as the scheduler sets it."""
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_the_t5_baseline_trains_with_adafactor_at_a_constant_rate(tiny_backbone):
    setup = configured(
        tiny_backbone,
        name="adafactor",
        schedule="constant",
        learning_rate=1e-3,
        warmup_ratio=0.0,
        weight_decay=0.0,
    )
    assert isinstance(setup["optimizer"], torch.optim.Adafactor)
    assert rates(setup) == [1e-3] * 10


def test_warm_up_then_constant_or_linear_decay(tiny_backbone):
    # 10 steps, warm-up ceil(0.2 x 10) = 2 steps at 1/3 and 2/3 of the rate; then the full rate
    # to the end (constant) or (10 - step) / 8 of it (linear, the default)
    constant = configured(tiny_backbone, schedule="constant", warmup_ratio=0.2, learning_rate=0.3)
    assert rates(constant) == pytest.approx([0.1, 0.2] + [0.3] * 8)
    linear = configured(tiny_backbone, warmup_ratio=0.2, learning_rate=0.3)
    assert isinstance(linear["optimizer"], torch.optim.AdamW)
    assert rates(linear) == pytest.approx([0.1, 0.2] + [0.3 * (10 - s) / 8 for s in range(2, 10)])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"name": "sgd"}, "model.optimizer.name: 'sgd' is not one of adamw, adafactor"),
        (
            {"schedule": "cosine"},
            "model.optimizer.schedule: 'cosine' is not one of linear, constant",
        ),
    ],
)
def test_an_unknown_optimizer_or_schedule_is_named(option, message):
    with pytest.raises(ConfigError, match=message):
        MaCSC(backbone="never-loaded", modalities=["text"], task=TASK, optimizer=option)
