"""Run folders as a user meets them (issue 21.5): a resume and the evaluations of a run's
checkpoint stay in its folder, fit says where the run is, best.ckpt holds the weights only,
and Lightning's messages that say nothing to a macsc user are not shown."""

import warnings
from pathlib import Path

import pytest
import torch

from macsc.cli import main
from tests.cli.test_cli import demo_args, scalar_steps


def folders(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/version_*"))


def run(subcommand: str, args: list[str]) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main([subcommand, *args])
    return status, [str(w.message) for w in caught]


@pytest.fixture
def trained(tiny_backbone, tmp_path) -> Path:
    """The demo fitted 4 steps (validation every 2) into ``tmp_path/runs/demo/version_0``."""
    assert main(["fit", *demo_args(tiny_backbone, tmp_path / "runs")]) == 0
    assert folders(tmp_path / "runs") == ["demo/version_0"]
    return tmp_path / "runs" / "demo" / "version_0"


def test_a_resume_continues_in_its_run_folder(trained, tiny_backbone, caplog):
    root = trained.parents[1]
    args = demo_args(tiny_backbone, root, "--trainer.max_steps", "6", "--ckpt_path", "last")
    caplog.clear()
    with caplog.at_level("INFO"):
        status, caught = run("fit", args)
    assert status == 0
    assert folders(root) == ["demo/version_0"]  # no version_1
    # TensorBoard reads one run: steps 0-3, then 4-5 from the resumed fit
    assert sorted(set(scalar_steps(trained, "loss/total"))) == list(range(6))
    assert len(list(trained.glob("events.out.tfevents.*"))) == 2
    said = caplog.messages
    assert f"macsc: run folder {trained}, checkpoints in {trained / 'checkpoints'}" in said
    (end,) = [message for message in said if message.startswith("macsc: finished")]
    best, last = trained / "checkpoints" / "best.ckpt", trained / "checkpoints" / "last.ckpt"
    assert end.startswith(f"macsc: finished; run folder {trained}; checkpoints {best} (val/")
    assert end.endswith(f", {last}")
    # the monitored best score came back with the run (Lightning restores it in the same folder)
    assert not [m for m in caught if "dirpath has changed" in m]


def test_evaluating_a_runs_checkpoint_writes_into_its_folder(trained, tiny_backbone, caplog):
    root = trained.parents[1]
    best = trained / "checkpoints" / "best.ckpt"
    fit_config = (trained / "config.yaml").read_text()
    for subcommand in ("validate", "test", "predict"):
        with caplog.at_level("INFO"):
            status, caught = run(
                subcommand, demo_args(tiny_backbone, root, "--ckpt_path", str(best))
            )
        assert status == 0
        assert f"macsc: {subcommand} results in {trained}" in caplog.messages
        assert (trained / f"config-{subcommand}.yaml").is_file()
    assert folders(root) == ["demo/version_0"]
    assert (trained / "config.yaml").read_text() == fit_config  # the training run's settings
    assert '"stage": "test"' in (trained / "metrics-validation.json").read_text()
    # predict_step returns None on purpose (predictions go to files): Lightning's warning is not shown
    assert not [m for m in caught if "predict returned None" in m], caught
    # a checkpoint from elsewhere opens a folder of its own
    elsewhere = root.parent / "copied.ckpt"
    elsewhere.write_bytes(best.read_bytes())
    assert main(["validate", *demo_args(tiny_backbone, root, "--ckpt_path", str(elsewhere))]) == 0
    assert folders(root) == ["demo/version_0", "demo/version_1"]


def test_best_ckpt_holds_the_weights_only_and_cannot_be_resumed(trained, tiny_backbone, capsys):
    best, last = trained / "checkpoints" / "best.ckpt", trained / "checkpoints" / "last.ckpt"
    best_state = torch.load(best, map_location="cpu", weights_only=True)
    last_state = torch.load(last, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best_state and "optimizer_states" in last_state
    assert best_state["state_dict"].keys() == last_state["state_dict"].keys()
    # AdamW keeps two moments per weight: last.ckpt is about three times best.ckpt
    assert 2.5 < last.stat().st_size / best.stat().st_size < 3.5
    capsys.readouterr()
    assert main(["fit", *demo_args(tiny_backbone, trained.parents[1], "--ckpt_path", str(best))])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"macsc: error: checkpoint {str(best)!r} holds the model's weights only (best.ckpt is "
        "saved so), not the optimiser and loop state a fit resumes from: resume from the run's "
        "last.ckpt (--ckpt_path last), and validate, test or predict with this one"
    ]


def test_lightnings_advertisement_is_not_shown(tiny_backbone, tmp_path, caplog):
    with caplog.at_level("INFO"):
        assert main(["fit", *demo_args(tiny_backbone, tmp_path, "--trainer.max_steps", "1")]) == 0
    assert not [message for message in caplog.messages if "litlogger" in message]
    assert any(
        m.startswith(f"macsc: run folder {tmp_path}/demo/version_0") for m in caplog.messages
    )
