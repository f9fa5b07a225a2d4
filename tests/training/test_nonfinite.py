"""NaN and Inf: a non-finite loss term stops training with a message naming the term and the
step (and no checkpoint is written after it), or, with ``nonfinite: skip``, that batch is
skipped; and the objective stays finite on the inputs that tempt a division by zero."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from macsc.errors import MacscError, NonFiniteLossError
from macsc.method.calibration import SelfBalancingCalibration
from macsc.method.heads import SpanHead
from macsc.task import TaskSpec
from macsc.training.module import MaCSC
from tasks.demo import DemoDataModule

PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 16, "k": 4},
    "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
}
AUDIO_TERMS = [
    "msb",
    "pair text->audio",
    "pair image->audio",
    "pair audio->text",
    "pair audio->image",
]


def make_model(backbone: str, **options) -> MaCSC:
    L.seed_everything(0, verbose=False)
    return MaCSC(
        backbone=backbone,
        modalities=["text", "image", "audio"],
        prototypes=PROTOTYPES,
        task={"kind": "classification", "num_labels": 2},
        enhancer={"heads": 4},
        **options,
    )


def fit(model: MaCSC, *callbacks, steps: int = 6, log_every: int = 4, root=None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        log_every_n_steps=log_every,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
    )
    data = DemoDataModule(batch_size=8, max_length=32, data_fraction=0.06)
    trainer.fit(model, datamodule=data)
    return trainer


class NaNInAudioProjector(L.Callback):
    """Makes the audio projector NaN before step ``step``: only the pairs with audio (and
    L_msb, their sum) become non-finite there; L_wa does not read the projector."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.objective.calibration.proj_weight[2].fill_(float("nan"))


class NaNInBatch(L.Callback):
    """Puts a NaN into one example's audio prototypes in the batch of step ``step``, and checks
    that the skipped batch leaves every weight as it was."""

    def __init__(self, step: int) -> None:
        self.step, self.before = step, None
        self.unchanged: bool | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["prototypes"]["audio"]["features"][0, 0, 0] = float("nan")
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None and self.unchanged is None:
            after = pl_module.state_dict()
            self.unchanged = all(
                torch.equal(after[k], v)
                for k, v in self.before.items()
                if k != "guard.skipped_batches"
            )


@pytest.mark.parametrize("checkpoint_every", [None, 3])
def test_raise_names_the_term_and_the_step_and_writes_no_checkpoint_after_it(
    tiny_backbone, tmp_path, checkpoint_every
):
    callbacks = [NaNInAudioProjector(step=1)]
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=checkpoint_every, save_last=True)
        )
    with pytest.raises(NonFiniteLossError) as error:
        fit(make_model(tiny_backbone), *callbacks, root=tmp_path)
    message = str(error.value)
    assert f"{AUDIO_TERMS}" in message and "at global step 1 " in message, message
    # found without a host sync per step: at the next checkpoint or log interval (4)
    assert f"found at step {checkpoint_every or 4}" in message, message
    assert "model.nonfinite: skip" in message and isinstance(error.value, MacscError)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing corrupted was saved


def test_skip_leaves_the_weights_alone_and_training_goes_on(tiny_backbone):
    model = make_model(tiny_backbone, nonfinite="skip")
    watch = NaNInBatch(step=2)
    with pytest.warns(UserWarning, match=r"skipped the batch of global step 2: non-finite"):
        fit(model, watch, steps=5)
    assert watch.unchanged is True
    assert int(model.guard.skipped_batches) == 1
    assert all(
        torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
    )


def test_objective_is_finite_on_degenerate_batches(tiny_backbone):
    """Batch size 1, one class only, fully padded prototype rows, zero vectors: no NaN in the
    loss or in any gradient."""
    from transformers import AutoTokenizer

    model = make_model(tiny_backbone).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)

    def batch(texts, labels, padded=()):
        out = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        out["labels"] = torch.tensor(labels)
        out["prototypes"] = {}
        for name, extractor in model.extractors.items():
            protos = extractor.extract(texts)
            features, mask = protos.features.clone(), protos.mask.clone()
            for row in padded:  # no real prototype: mask all False, features zero
                features[row], mask[row] = 0.0, False
            out["prototypes"][name] = {"features": features, "mask": mask}
        return out

    cases = {
        "batch of one": batch(["a red apple"], [1]),
        "one class only": batch(["red", "blue sky", "snow"], [0, 0, 0]),
        "a fully padded row": batch(["red", "blue sky", "snow"], [0, 1, 0], padded=[1]),
        "every row padded": batch(["red", "blue"], [0, 1], padded=[0, 1]),
    }
    for name, inputs in cases.items():
        model.zero_grad()
        losses = model.compute_losses(inputs, model(inputs))
        assert torch.isfinite(model.objective.terms(losses)).all(), name
        losses["total"].backward()
        for key, parameter in model.named_parameters():
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), (name, key)


def test_calibration_and_span_allocation_are_finite_on_zero_vectors():
    calibration = SelfBalancingCalibration(["text", "image", "audio"], 8, proj_dim=4)
    pooled = torch.zeros(3, 2, 8, requires_grad=True)
    features = calibration.project(pooled)
    positives = torch.ones(2, 2, dtype=torch.bool)
    for distributions in (torch.zeros(3, 2, 5), torch.full((3, 2, 5), 0.2)):
        out = calibration(features, distributions, positives)
        assert torch.isfinite(out.loss) and torch.isfinite(out.pair_losses).all()
        (grad,) = torch.autograd.grad(out.loss, pooled, retain_graph=True)
        assert torch.isfinite(grad).all()

    # a SQuAD feature without any answer position gets a zero distribution, not NaN
    head = SpanHead(TaskSpec(kind="span", num_labels=2, metrics=["exact", "f1"]), 2, 8)
    context = torch.tensor([[False] * 5, [False, True, True, False, False]])
    batch = {"attention_mask": torch.ones(2, 5, dtype=torch.long), "context_mask": context}
    distributions = head.allocation_distributions(torch.randn(2, 2, 5, 2), None, 0.0, batch)
    assert torch.isfinite(distributions).all() and distributions[:, 0].abs().sum() == 0
    out = calibration(features, torch.cat([distributions, distributions[:1]]).flatten(2), positives)
    assert torch.isfinite(out.loss)
