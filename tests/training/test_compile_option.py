"""``model.compile_after_backbone`` (issue 20): what runs after the backbone, compiled in one graph
(a graph break is an error) and, on a GPU, captured in CUDA graphs; training with it follows the
eager run."""

import functools

import lightning as L
import pytest
import torch

from macsc.errors import ConfigError
from macsc.training import compiled
from macsc.training.module import MaCSC
from tests.training.test_performance_paths import RecordingLogger, make_batch
from tests.training.test_step_operators import PROTOTYPES, TASK

MODALITIES = ["text", "image", "audio", "video"]


class LossLogger(RecordingLogger):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step)
        self.losses.append(float(metrics["loss/total"]))


def train(backbone: str, device: str = "cpu", steps: int = 4, **options) -> list[float]:
    """The logged ``loss/total`` of ``steps`` training steps (dropout on) from one seed."""
    torch.manual_seed(0)
    model = MaCSC(
        backbone=backbone,
        modalities=MODALITIES,
        prototypes=PROTOTYPES,
        task=TASK,
        enhancer={"heads": 4},
        **options,
    )
    batch = make_batch(model, backbone)
    logger = LossLogger()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps,
        log_every_n_steps=1,
        logger=logger,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)
    L.seed_everything(1)
    trainer.fit(model, train_dataloaders=loader)
    return logger.losses


def test_training_with_the_part_after_the_backbone_compiled_follows_the_eager_run(
    tiny_backbone, monkeypatch
):
    """Traced by dynamo in one graph (``fullgraph``) and run by its eager backend, which runs
    the captured operators as they are: the same losses step by step. (Inductor's kernels, and
    CUDA graphs, need a compiler and a GPU: ``benchmarks/gpu.sh``.)"""
    torch._dynamo.reset()
    real = torch.compile
    calls = []

    def eager_backend(function, mode=None, **options):
        calls.append(mode)
        return real(function, backend="eager", **options)

    monkeypatch.setattr(compiled.torch, "compile", eager_backend)
    eager = train(tiny_backbone)
    with_graph = train(tiny_backbone, compile_after_backbone="reduce-overhead")
    assert calls == ["reduce-overhead"]  # compiled once, with the mode asked for
    assert len(eager) == 4
    torch.testing.assert_close(with_graph, eager, rtol=1e-5, atol=1e-6)


def test_a_bad_mode_and_the_gathered_objective_are_refused(tiny_backbone):
    build = functools.partial(
        MaCSC, backbone=tiny_backbone, modalities=["text"], task=TASK, objective={"lambda_msb": 0}
    )
    with pytest.raises(ConfigError, match="model.compile_after_backbone: 'fast' is not one of"):
        build(compile_after_backbone="fast")
    with pytest.raises(ConfigError, match="gather_across_devices"):
        build(
            compile_after_backbone="default",
            objective={"lambda_msb": 0, "gather_across_devices": True},
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_of_the_part_after_the_backbone_train_through_lightning(tiny_backbone):
    """On a GPU: the captured graphs replay step after step (their outputs, logged, are
    copies), and the losses follow the eager run's."""
    torch._dynamo.reset()
    eager = train(tiny_backbone, device="cuda", steps=6)
    graphed = train(tiny_backbone, device="cuda", steps=6, compile_after_backbone="reduce-overhead")
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-3)
