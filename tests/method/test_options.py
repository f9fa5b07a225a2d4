"""The option groups (``model.enhancer``, ``model.objective``, ``model.optimizer``): each field
documented on itself and shown by ``macsc fit --help``, a bad value refused in one line naming
its YAML key, a group given as a mapping field by field, and a checkpoint keeping plain data."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import re
import textwrap

import pytest
import torch

from macsc.cli import main
from macsc.errors import ConfigError
from macsc.method.network import MaCSCNetwork
from macsc.method.objective import MaCSCObjective
from macsc.method.options import EnhancerOptions, ObjectiveOptions
from macsc.training.module import MaCSC
from macsc.training.optim import OptimizerOptions

GROUPS = {"enhancer": EnhancerOptions, "objective": ObjectiveOptions, "optimizer": OptimizerOptions}
TASK = {"kind": "classification", "num_labels": 2}


def field_docstrings(cls: type) -> dict[str, str]:
    """Each field's attribute docstring, read from the class's source (the string statement
    right after the field's annotated assignment)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    found = {}
    for statement, following in zip(body, body[1:], strict=False):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr):
            found[statement.target.id] = " ".join(following.value.value.split())
    return found


@pytest.fixture(scope="module")
def fit_help() -> str:
    """``macsc fit --help`` without its whitespace (argparse rewraps, and hyphenates)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        main(["fit", "--help"])
    return re.sub(r"\s+", "", printed.getvalue())


@pytest.mark.parametrize("group", GROUPS)
def test_every_field_is_documented_once_on_itself_and_fit_help_shows_it(group, fit_help):
    cls = GROUPS[group]
    docs = field_docstrings(cls)
    assert sorted(docs) == sorted(f.name for f in dataclasses.fields(cls))
    bare = fit_help
    for name, doc in docs.items():
        # the option and its metavar, then its docstring word for word
        option = rf"--model\.{group}\.{name}(\{{true,false\}}|[A-Z_]+)"
        assert re.search(option + re.escape(re.sub(r"\s+", "", doc)), bare), name
    # the classes that take the group point to it instead of listing its fields again
    for user in (MaCSC, MaCSCNetwork, MaCSCObjective):
        listed = [n for n in docs if re.search(rf"^\s+{n}(, .*)?:", user.__doc__, re.M)]
        assert not listed, (user.__name__, listed)


@pytest.mark.parametrize(
    ("group", "value", "message"),
    [
        ("enhancer", {"heads": 0}, "model.enhancer.heads must be at least 1, got 0"),
        (
            "objective",
            {"weight_normalization": "rows"},
            "model.objective.weight_normalization: 'rows' is not one of balanced, batch, positives",
        ),
        (
            "objective",
            {"reduction": "max"},
            "model.objective.reduction: 'max' is not one of mean, sum",
        ),
        ("objective", {"tau": 0.0}, "model.objective.tau must be > 0, got 0.0"),
        ("objective", {"proj_dim": 0}, "model.objective.proj_dim must be at least 1, got 0"),
        (
            "objective",
            {"lamda_msb": 0.1},
            "model.objective: unknown option 'lamda_msb'; the options are lambda_msb, alpha, tau,",
        ),
        ("optimizer", "adamw", "model.optimizer should be a mapping of its options (name, "),
    ],
)
def test_a_bad_value_is_refused_before_the_backbone_loads_naming_its_key(group, value, message):
    with pytest.raises(ConfigError) as error:
        MaCSC(backbone="never-loaded", modalities=["text"], task=TASK, **{group: value})
    assert str(error.value).startswith(message)


def test_a_checked_value_is_checked_even_where_the_run_does_not_use_it():
    """``weight_normalization`` matters only with ``L_msb`` on; a typo is still a typo."""
    with pytest.raises(ConfigError, match="model.objective.weight_normalization: 'batchh'"):
        ObjectiveOptions(lambda_msb=0.0, weight_normalization="batchh")


def test_a_group_as_a_mapping_sets_the_fields_it_names_and_keeps_the_defaults(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image"],
        prototypes={"image": {"kind": "gaussian", "dim": 16, "k": 4}},
        task=TASK,
        enhancer={"heads": 2},
        objective=ObjectiveOptions(tau=0.5),
    )
    assert model.network.enhancers.attention.num_heads == 2
    assert model.objective.calibration.tau == 0.5 and model.objective.alpha == 1.0
    assert model.optimizer_options == OptimizerOptions()
    # the hyperparameters hold plain data: a checkpoint reads with weights_only=True
    assert model.hparams["enhancer"] == {**dataclasses.asdict(EnhancerOptions()), "heads": 2}
    assert model.hparams["objective"] == {**dataclasses.asdict(ObjectiveOptions()), "tau": 0.5}
    assert all(type(model.hparams[group]) is dict for group in GROUPS)


def test_a_checkpoint_of_today_rebuilds_its_groups(tiny_backbone, tmp_path):
    import lightning as L

    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text"],
        task=TASK,
        objective=ObjectiveOptions(lambda_msb=0.0, alpha=0.25),
        optimizer=OptimizerOptions(name="adafactor", learning_rate=1e-3),
    )
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "today.ckpt")
    saved = torch.load(tmp_path / "today.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["optimizer"]["name"] == "adafactor"
    loaded = MaCSC.load_from_checkpoint(tmp_path / "today.ckpt")
    assert loaded.optimizer_options == OptimizerOptions(name="adafactor", learning_rate=1e-3)
    assert loaded.objective.alpha == 0.25 and loaded.objective.calibration is None


def test_the_defaults_are_shared_safely_because_the_groups_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EnhancerOptions().heads = 4
