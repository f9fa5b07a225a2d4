"""`macsc weights` on a checkpoint of a real (tiny) MaCSC whose rho and Z are set by hand."""

import math
import os

import pytest
import torch

from macsc.cli import main
from tests.training.test_safe_loading import Payload

# rho = softmax(r): these logits give exactly 0.2, 0.3, 0.5
RHO = [0.2, 0.3, 0.5]
# pi_z = row softmax of Z over the off-diagonal: text -> (image 0.25, audio 0.75),
# image -> (text 0.8, audio 0.2), audio -> (text 0.5, image 0.5); the diagonal takes no part
Z = [
    [9.0, 0.0, math.log(3.0)],
    [math.log(4.0), -7.0, 0.0],
    [2.0, 2.0, 5.0],
]
EXPECTED_PI = [["–", "0.2500", "0.7500"], ["0.8000", "–", "0.2000"], ["0.5000", "0.5000", "–"]]


@pytest.fixture(scope="module")
def saved(tiny_backbone, tmp_path_factory):
    """(state dict, hyperparameters) of a tiny MaCSC with rho and Z set to the values above."""
    from macsc.training.module import MaCSC
    from tasks.demo import DemoDataModule

    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio"],
        prototypes={
            "image": {"kind": "gaussian", "dim": 16, "k": 4},
            "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
        },
        task=DemoDataModule().task_spec.to_dict(),
        enhancer={"heads": 4},
    )
    with torch.no_grad():
        model.objective.rho_logits.copy_(torch.tensor(RHO).log())
        model.objective.calibration.z.copy_(torch.tensor(Z))
    return model.state_dict(), dict(model.hparams)


def legacy(state: dict) -> dict:
    """The key layout of macsc 0.1 (before the objective owned rho and the calibration)."""
    moved = ("objective.rho_logits", "objective.calibration.")
    return {(k[len("objective.") :] if k.startswith(moved) else k): v for k, v in state.items()}


def printed_weights(out: str) -> tuple[dict[str, str], list[list[str]]]:
    lines = out.splitlines()
    start = lines.index("rho (late-fusion weights, Eq. 11):")
    rho = dict(line.split() for line in lines[start + 1 : start + 4])
    pi_start = next(i for i, line in enumerate(lines) if line.startswith("pi_z (coarse"))
    assert lines[pi_start + 1].split() == ["text", "image", "audio"]
    pi = [line.split()[1:] for line in lines[pi_start + 2 : pi_start + 5]]
    return rho, pi


@pytest.mark.parametrize("layout", ["today", "legacy"])
def test_prints_rho_and_pi_z_and_writes_the_heatmaps(saved, tmp_path, capsys, layout):
    state, hparams = saved
    state = legacy(state) if layout == "legacy" else state
    assert ("objective.rho_logits" in state) == (layout == "today")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": 12}, path)
    out_dir = tmp_path / "figures"
    assert main(["weights", str(path), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"checkpoint: {path} (the file given; step 12)"
    rho, pi = printed_weights(out)
    assert rho == {"text": "0.2000", "image": "0.3000", "audio": "0.5000"}
    assert pi == EXPECTED_PI
    assert sorted(p.name for p in out_dir.iterdir()) == ["pi_z-model.png", "rho-model.png"]
    assert all(p.stat().st_size > 5000 for p in out_dir.iterdir())


def test_a_run_folder_means_its_last_checkpoint_else_the_newest(saved, tmp_path, capsys):
    state, hparams = saved
    run = tmp_path / "runs" / "demo" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    older, newer = (
        run / "checkpoints" / "epoch=0-step=5.ckpt",
        run / "checkpoints" / "epoch=1-step=9.ckpt",
    )
    torch.save({"state_dict": state, "hyper_parameters": hparams}, older)
    torch.save({"state_dict": state, "hyper_parameters": hparams}, newer)
    os.utime(older, (1, 1))
    assert main(["weights", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {newer} (the run's newest .ckpt (it has no checkpoints/last.ckpt))" in out
    assert (run / "weights" / "pi_z-epoch=1-step=9.png").is_file()
    torch.save(
        {"state_dict": state, "hyper_parameters": hparams}, run / "checkpoints" / "last.ckpt"
    )
    assert main(["weights", str(run)]) == 0
    assert (
        f"checkpoint: {run / 'checkpoints' / 'last.ckpt'} (the run's last.ckpt)"
        in capsys.readouterr().out
    )


def test_without_calibration_there_is_no_pi_z(saved, tmp_path, capsys):
    state, hparams = saved
    state = {k: v for k, v in state.items() if not k.startswith("objective.calibration.")}
    path = tmp_path / "no_msb.ckpt"
    torch.save(
        {"state_dict": state, "hyper_parameters": {**hparams, "objective": {"lambda_msb": 0.0}}},
        path,
    )
    assert main(["weights", str(path), "--out", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert "  audio  0.5000" in out and "pi_z: none (no calibration module" in out
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["rho-no_msb.png"]


def test_a_checkpoint_that_would_run_code_is_refused(saved, tmp_path, capsys):
    state, hparams = saved
    marker = tmp_path / "code-ran"
    path = tmp_path / "trap.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "extra": Payload(marker)}, path)
    assert main(["weights", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("macsc: error: checkpoint") and "would run code" in err
    assert err.endswith("pass --trust-checkpoint") and "\n" not in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {"backbone.x": torch.zeros(2)}}, "has no modality weights"),
        (None, "does not exist"),
    ],
)
def test_bad_checkpoints_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.ckpt"
    if content is not None:
        torch.save(content, path)
    assert main(["weights", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
