"""Checkpoints are not trusted: published AudioCLIP / CLIP-ViP / open_clip files and our own
Lightning checkpoints load with ``weights_only=True``; one whose unpickling would run code is
refused with a message naming the trust option; a checkpoint of another architecture is one
line naming the mismatched keys."""

from __future__ import annotations

import os

import pytest
import torch

from macsc.cli import main
from macsc.errors import CheckpointError
from macsc.prototypes import build_extractor
from macsc.training.module import MaCSC
from tests.cli.test_cli import demo_args
from tests.prototypes.test_clip import audioclip_state, clip_vip_state


class Payload:
    """Unpickling this creates a folder: the stand-in for code an attacker would run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_backbone):
    """A real ``macsc fit`` checkpoint (LightningCLI hyperparameters, optimizer and loop state)."""
    root = tmp_path_factory.mktemp("run")
    args = demo_args(tiny_backbone, root, "--trainer.max_steps", "2")
    assert main(["fit", *args, "--data.init_args.data_fraction", "0.05"]) == 0
    return next(root.rglob("last.ckpt"))


def booby_trapped(source, target, marker):
    content = torch.load(source, map_location="cpu", weights_only=True)
    content["extra"] = Payload(marker)
    torch.save(content, target)
    return target


@pytest.mark.parametrize(
    "kind,name,state",
    [
        ("audioclip", "AudioCLIP-Full-Training.pt", audioclip_state),
        ("clip_vip", "pretrain_clipvip_base_32.pt", clip_vip_state),
    ],
)
def test_published_checkpoint_that_would_run_code_is_refused(tmp_path, kind, name, state):
    marker = tmp_path / "code-ran"
    path = tmp_path / name
    torch.save({**state(), "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"would run code.*trust_checkpoint=True"):
        build_extractor(kind, checkpoint=str(path))
    assert not marker.exists()


def test_own_checkpoint_loads_safely_and_a_trapped_one_is_refused(checkpoint, tmp_path):
    model = MaCSC.load_from_checkpoint(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())

    marker = tmp_path / "code-ran"
    trapped = booby_trapped(checkpoint, tmp_path / "trapped.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"would run code.*pass trust_checkpoint=True"):
        MaCSC.load_from_checkpoint(trapped)
    assert not marker.exists()
    MaCSC.load_from_checkpoint(trapped, trust_checkpoint=True)
    assert marker.exists()  # the explicit trust option really unpickles everything


def test_ckpt_path_that_would_run_code_is_refused_by_the_cli(
    checkpoint, tiny_backbone, tmp_path, capsys
):
    marker = tmp_path / "code-ran"
    trapped = booby_trapped(checkpoint, tmp_path / "trapped.ckpt", marker)
    args = demo_args(tiny_backbone, tmp_path, "--ckpt_path", str(trapped))
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("macsc: error: checkpoint") and "--weights_only false" in err[-1]
    assert not marker.exists()


def test_checkpoint_of_another_architecture_names_the_keys(
    checkpoint, tiny_backbone, tmp_path, capsys
):
    from tests.conftest import write_tiny_bert

    wider = str(write_tiny_bert(tmp_path / "wider", hidden=48))
    # other modalities than the checkpoint's, through load_from_checkpoint
    with pytest.raises(CheckpointError) as error:
        MaCSC.load_from_checkpoint(checkpoint, modalities=["text", "image"])
    message = str(error.value)
    assert message.startswith("the checkpoint does not fit this model")
    # one enhancer per modality, stacked: three in the checkpoint, one in this model; one head
    # per branch: four and two
    assert "'network.enhancers.attention.in_proj_weight (3, 96, 32) (expected (1, 96, 32))'" in (
        message
    )
    assert "'head.linear.weight (4, 2, 32) (expected (2, 2, 32))'" in message
    # another backbone width
    with pytest.raises(CheckpointError, match=r"wrong shapes \[.*'network\.backbone\.") as error:
        MaCSC.load_from_checkpoint(checkpoint, backbone=wider)
    assert "\n" not in str(error.value) and len(str(error.value)) < 2500

    # `macsc fit --ckpt_path`: LightningCLI builds the model from the checkpoint's own settings,
    # so here the backbone it names has been replaced by a wider one since
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["hyper_parameters"]["backbone"] = wider
    moved = tmp_path / "moved.ckpt"
    torch.save(content, moved)
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, "--ckpt_path", str(moved))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("macsc: error: the checkpoint does not fit this model")
    assert "wrong shapes ['head.linear.weight" in err and "It was saved with {'backbone'" in err


def test_missing_or_damaged_checkpoint_is_one_line(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MaCSC.load_from_checkpoint(tmp_path / "nope.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(checkpoint.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="cannot be read"):
        MaCSC.load_from_checkpoint(damaged)
