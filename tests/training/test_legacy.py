"""Old runs still load (issue 19): checkpoints and ``config.yaml`` files written before the option
groups, with the model's flat options (``model.lambda_msb``), run with the settings they were
written with, through every entry point that reads them.

The files under ``tests/data/legacy/`` were written by macsc itself before the change, from a
working copy of main at 3177cf7 (``git archive main``), in a folder holding a tiny BERT as
``tiny_bert``:

- ``config_flat_options.yaml``: the ``config.yaml`` of ``macsc fit --config
  lightning_configs/demo.yaml`` with the three Gaussian prototype sources of the tests and every
  flat option the groups took over set away from its default (:data:`CLI_OPTIONS`), 2 steps;
- ``hparams_cli.json``: the ``hyper_parameters`` of that run's ``last.ckpt`` (LightningCLI's,
  with its ``_instantiator``);
- ``hparams_python.json``: those of a checkpoint of ``MaCSC(...)`` built in Python with other
  values (:data:`PYTHON_OPTIONS`);
- ``config_before_layout.yaml``: the same kind of run from ad16a0f^, the flat package layout
  (``macsc.checkpoint_files.LastCheckpoint``).

No binary checkpoint is committed: a test builds the old checkpoint from those hyperparameters and
the state of a model with the same settings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from macsc.cli import main
from macsc.errors import ConfigError
from macsc.training.module import MaCSC
from macsc.training.optim import build_optimizer
from tests.cli.test_cli import ROOT

DATA = ROOT / "tests" / "data" / "legacy"

#: what the files written by the old version asked for, in today's names (written out by hand
#: from the command lines and keyword arguments that wrote them)
CLI_OPTIONS = {
    "enhancer": {"enabled": True, "shared": True, "heads": 4, "feed_forward": True},
    "objective": {
        "lambda_msb": 0.3,
        "alpha": 0.5,
        "tau": 0.2,
        "proj_dim": 16,
        "weight_normalization": "positives",
        "reduction": "sum",
        "gather_across_devices": True,
    },
    "optimizer": {
        "name": "adafactor",
        "learning_rate": 3.0e-4,
        "weight_decay": 0.02,
        "warmup_ratio": 0.2,
        "adam_epsilon": 1.0e-7,
        "schedule": "constant",
        "modality_weight_lr_scale": 10.0,
    },
}
PYTHON_OPTIONS = {
    "enhancer": {"enabled": False, "shared": False, "heads": 2, "feed_forward": False},
    "objective": {
        "lambda_msb": None,
        "alpha": 0.0,
        "tau": 0.05,
        "proj_dim": 8,
        "weight_normalization": "batch",
        "reduction": "mean",
        "gather_across_devices": False,
    },
    "optimizer": {
        "name": "adamw",
        "learning_rate": 5.0e-5,
        "weight_decay": 0.1,
        "warmup_ratio": 0.06,
        "adam_epsilon": 1.0e-6,
        "schedule": "linear",
        "modality_weight_lr_scale": 2.0,
    },
}
WRITTEN = {
    "cli": ("hparams_cli.json", CLI_OPTIONS),
    "python": ("hparams_python.json", PYTHON_OPTIONS),
}
GROUPS = ("enhancer", "objective", "optimizer")


def old_hparams(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.fixture
def in_old_folder(tmp_path, tiny_backbone, monkeypatch) -> Path:
    """A working folder where the old files' relative paths resolve (``tiny_bert``, ``runs``)."""
    (tmp_path / "tiny_bert").symlink_to(tiny_backbone)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def old_checkpoint(folder: Path, which: str) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A checkpoint as the old version wrote it: the state of a model built today with the
    settings of ``WRITTEN[which]``, under that version's ``hyper_parameters``; the same state
    as today writes it; and that state."""
    name, groups = WRITTEN[which]
    hparams = old_hparams(name)
    torch.manual_seed(0)
    model = MaCSC(
        backbone=hparams["backbone"],
        modalities=hparams["modalities"],
        prototypes=hparams["prototypes"],
        task=hparams["task"],
        dropout=hparams["dropout"],
        nonfinite=hparams["nonfinite"],
        **groups,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-1, 1)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    today, old = folder / f"today-{which}.ckpt", folder / f"old-{which}.ckpt"
    trainer.save_checkpoint(today)
    content = torch.load(today, weights_only=True)
    content["hyper_parameters"] = hparams
    torch.save(content, old)
    return old, today, model.state_dict()


@pytest.mark.parametrize("which", ["cli", "python"])
def test_an_old_checkpoint_loads_with_the_settings_it_was_trained_with(in_old_folder, which):
    path, _, state = old_checkpoint(in_old_folder, which)
    groups = WRITTEN[which][1]
    model = MaCSC.load_from_checkpoint(path)
    assert {group: model.hparams[group] for group in GROUPS} == groups
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # and they took effect
    enhancer, objective, optimizer = (groups[g] for g in GROUPS)
    block = model.network.enhancers
    assert hasattr(block, "attention") == enhancer["enabled"]
    if enhancer["enabled"]:
        # shared: one attention block for the three modalities, else one each
        blocks = block.attention.in_proj_weight.shape[0]
        assert blocks == (1 if enhancer["shared"] else 3)
        assert (block.feed_forward is not None) == enhancer["feed_forward"]
        assert block.attention.num_heads == enhancer["heads"]
    assert model.objective.lambda_msb == (objective["lambda_msb"] or 0.2)  # null: the kind's
    assert model.objective.alpha == objective["alpha"]
    assert model.objective.reduction == objective["reduction"]
    calibration = model.objective.calibration
    assert (calibration.tau, calibration.weight_normalization) == (
        objective["tau"],
        objective["weight_normalization"],
    )
    assert calibration.proj_weight.shape[1] == objective["proj_dim"]
    built = build_optimizer(model, model.optimizer_options)
    kind = {"adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor}[optimizer["name"]]
    assert type(built) is kind and built.defaults["lr"] == optimizer["learning_rate"]
    assert built.param_groups[2]["lr"] == pytest.approx(
        optimizer["learning_rate"] * optimizer["modality_weight_lr_scale"]
    )


def test_overrides_of_an_old_checkpoint_change_only_the_fields_they_give(in_old_folder):
    path, _, _ = old_checkpoint(in_old_folder, "cli")
    for override in ({"objective": {"tau": 0.3}}, {"tau": 0.3}):  # today's name, the old one
        model = MaCSC.load_from_checkpoint(path, **override)
        assert model.hparams["objective"] == {**CLI_OPTIONS["objective"], "tau": 0.3}
        assert model.hparams["optimizer"] == CLI_OPTIONS["optimizer"]
    with pytest.raises(ConfigError, match="'lamda_msb' is not an option of MaCSC"):
        MaCSC.load_from_checkpoint(path, lamda_msb=0.1)


def test_an_old_checkpoint_elsewhere_than_a_local_file_loads_with_its_settings_too(in_old_folder):
    """A URL or an open file is copied to a local file first, whose options can be read before
    Lightning builds the model."""
    path, _, state = old_checkpoint(in_old_folder, "python")
    with path.open("rb") as handle:
        for source in (f"file://{path}", handle):
            model = MaCSC.load_from_checkpoint(source)
            assert {group: model.hparams[group] for group in GROUPS} == PYTHON_OPTIONS
            assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def fit_args(*extra: str) -> list[str]:
    return [
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def saved_config(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def test_old_config_and_checkpoint_run_with_their_settings(in_old_folder, caplog, capsys):
    """``macsc fit --config`` an old ``config.yaml``; then the old checkpoint of that run:
    ``macsc fit --ckpt_path`` resumes it (its Adafactor state included) with the checkpoint's
    settings over the config's, ``macsc validate --ckpt_path`` and ``macsc weights`` read it."""
    config = DATA / "config_flat_options.yaml"
    with caplog.at_level(logging.INFO):
        assert main(["fit", "--config", str(config), *fit_args()]) == 0
    note = next(r.getMessage() for r in caplog.records if "uses the names of" in r.getMessage())
    assert note.startswith(f"note: {config} uses the names of an earlier macsc: 18 flat model")
    assert "model.enhancement -> model.enhancer.enabled" in note
    first = in_old_folder / "runs" / "legacy" / "version_0"
    assert {g: saved_config(first)["model"][g] for g in GROUPS} == CLI_OPTIONS

    checkpoint = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert {g: checkpoint["hyper_parameters"][g] for g in GROUPS} == CLI_OPTIONS  # plain data
    assert isinstance(checkpoint["optimizer_states"][0]["state"][0].get("row_var"), torch.Tensor)
    checkpoint["hyper_parameters"] = old_hparams("hparams_cli.json")
    old = in_old_folder / "old.ckpt"
    torch.save(checkpoint, old)

    # the demo config asks for AdamW and tau 0.1; the checkpoint's settings win, as for any
    demo = ["--config", str(ROOT / "lightning_configs" / "demo.yaml"), "--model.backbone"]
    demo += [
        "tiny_bert",
        "--model.prototypes",
        json.dumps(old_hparams("hparams_cli.json")["prototypes"]),
    ]
    demo += ["--trainer.logger.init_args.save_dir", "runs", "--data.init_args.batch_size", "16"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = ["fit", *demo, *fit_args("--trainer.max_steps", "3", "--ckpt_path", str(old))]
        assert main(resumed) == 0
    assert any(
        f"note: {old} holds the names of an earlier" in r.getMessage() for r in caplog.records
    )
    second = in_old_folder / "runs" / "demo" / "version_0"
    assert {g: saved_config(second)["model"][g] for g in GROUPS} == CLI_OPTIONS
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

    assert main(["validate", *demo, *fit_args("--ckpt_path", str(old))]) == 0
    assert (
        saved_config(in_old_folder / "runs" / "demo" / "version_1")["model"]["objective"]
        == (CLI_OPTIONS["objective"])
    )
    capsys.readouterr()
    assert main(["weights", str(old)]) == 0
    assert "pi_z (coarse pair weights" in capsys.readouterr().out


def test_a_config_of_the_flat_package_layout_names_classes_where_they_are_now(
    in_old_folder, caplog, capsys
):
    config = DATA / "config_before_layout.yaml"
    assert "macsc.checkpoint_files.LastCheckpoint" in config.read_text()
    with caplog.at_level(logging.INFO):
        assert main(["validate", "--config", str(config), *fit_args()]) == 0
    note = next(r.getMessage() for r in caplog.records if "uses the names of" in r.getMessage())
    assert (
        "1 class path of the flat package layout (macsc.checkpoint_files.LastCheckpoint -> "
        "macsc.training.checkpoints.LastCheckpoint)"
    ) in note


@pytest.mark.parametrize(
    ("option", "value", "group", "expected"),
    [
        ("--model.tau", "0.3", "objective", {"tau": 0.3}),
        ("--model.optimizer", "adafactor", "optimizer", {"name": "adafactor"}),
        ("--model.lr_schedule=constant", None, "optimizer", {"schedule": "constant"}),
        ("--model.optimizer", "{name: adafactor}", "optimizer", {"name": "adafactor"}),  # today's
    ],
)
def test_an_old_option_on_the_command_line_is_read_as_its_new_key(
    tiny_backbone, capsys, caplog, option, value, group, expected
):
    args = ["fit", "--config", str(ROOT / "lightning_configs" / "demo.yaml")]
    args += [option] if value is None else [option, value]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"][group]
    assert {key: printed[key] for key in expected} == expected
    old = option.partition("=")[0]
    renamed = [r.getMessage() for r in caplog.records if "is the old name of" in r.getMessage()]
    assert renamed == (
        []
        if value and value.startswith("{")
        else [
            f"note: {old} is the old name of --model.{group}.{next(iter(expected))}; read as --model.{group}.{next(iter(expected))}"
        ]
    )


def test_an_old_and_a_new_name_set_to_different_values_is_one_line(tmp_path, capsys):
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  tau: 0.2\n  objective:\n    tau: 0.3\n")
    args = ["fit", "--config", str(ROOT / "lightning_configs" / "demo.yaml"), "--config", str(both)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "macsc: error: model.tau (the old name of model.objective.tau) is 0.2 but "
        "model.objective.tau is 0.3; keep only model.objective.tau"
    )
