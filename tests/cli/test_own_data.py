"""The README's "Your own data" with the CPU overlay (issue 21.1): a small table is used whole,
its run folder follows its name, and a cut that leaves a few batches says which option did it."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from macsc.cli import main
from tests.cli.test_cli import SMALL_PROTOTYPES

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "lightning_configs"
POSITIVE = ["great film", "loved it", "wonderful acting", "a joy", "brilliant story"]
NEGATIVE = ["terrible film", "hated it", "awful acting", "a bore", "dull story"]


def write_table(path: Path, rows: int, positives: int) -> Path:
    """A CSV of ``rows`` reviews, the first ``positives`` of them positive."""
    lines = ["text,sentiment"]
    for i in range(rows):
        words = (POSITIVE if i < positives else NEGATIVE)[i % 5]
        lines.append(f"{words} number {i},{'pos' if i < positives else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def own_data(tmp_path: Path, label_column: str = "sentiment") -> list[str]:
    """glue_sst2.yaml + cpu.yaml + an own.yaml as the README writes it, a tiny model."""
    train = write_table(tmp_path / "train.csv", 40, positives=22)
    dev = write_table(tmp_path / "dev.csv", 10, positives=5)
    own = tmp_path / "own.yaml"
    own.write_text(
        "data:\n  class_path: tasks.glue.TableDataModule\n  init_args:\n"
        "    table_format:\n      name: mysent\n      segments: [[text]]\n"
        f"      label_columns: [{label_column}]\n      label_names: [neg, pos]\n"
        f"    data_files: {{train: {train}, validation: {dev}}}\n"
    )
    return [
        "--config",
        str(CONFIGS / "glue_sst2.yaml"),
        "--config",
        str(CONFIGS / "cpu.yaml"),
        "--config",
        str(own),
        "--model.prototypes",
        SMALL_PROTOTYPES,
        "--model.enhancer.heads",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.enable_progress_bar",
        "false",
    ]


def fit_recording_warnings(args: list[str]) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main(["fit", *args])
    return status, [str(w.message) for w in caught]


def test_the_cpu_overlay_trains_on_all_of_a_small_table_in_a_folder_of_its_name(
    tiny_backbone, tmp_path, capsys
):
    args = [*own_data(tmp_path), "--model.backbone", tiny_backbone]
    status, caught = fit_recording_warnings(args)
    assert status == 0
    assert not [message for message in caught if "training examples" in message], caught
    runs = tmp_path / "runs"
    assert [p.relative_to(runs).as_posix() for p in runs.glob("*/version_*")] == [
        "mysent/version_0"
    ]
    last = torch.load(
        runs / "mysent/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    # every row trained: pi_e is the add-one smoothed class share of all 40 (18 neg, 22 pos),
    # and glue_sst2's 3 epochs of 2 batches (32 + 8) made 6 steps
    prior = last["state_dict"]["objective.class_prior"]
    assert torch.allclose(prior, torch.tensor([19 / 42, 23 / 42])), prior
    assert last["global_step"] == 6
    config = (runs / "mysent/version_0/config.yaml").read_text()
    assert "name: mysent" in config and "max_train_examples: 640" in config
    assert main(["report", str(runs)]) == 0
    assert (
        "runs/mysent/version_0: task mysent on at most 640 training examples "
        "(max_train_examples) is in none of the paper's tables"
    ) in capsys.readouterr().out.replace(str(tmp_path) + "/", "")


@pytest.mark.parametrize(
    "option, cut",
    [
        (["--data.init_args.data_fraction", "0.02"], "data_fraction=0.02 leaves 1"),
        (["--data.init_args.max_train_examples", "70"], None),  # more than 40: no cut
        (["--data.init_args.max_train_examples", "30"], "max_train_examples=30 leaves 30"),
    ],
)
def test_a_cut_that_leaves_a_few_batches_warns_naming_the_option(
    tiny_backbone, tmp_path, option, cut
):
    args = [*own_data(tmp_path), "--model.backbone", tiny_backbone, *option]
    status, caught = fit_recording_warnings([*args, "--trainer.max_steps", "1"])
    assert status == 0
    said = [message for message in caught if "training examples" in message]
    expected = [
        f"data option {cut} of the 40 training examples: 1 batch of 32 an epoch; raise it "
        "(--data.init_args.data_fraction 1.0 and --data.init_args.max_train_examples null use "
        "every example)"
    ]
    assert said == (expected if cut else [])


def test_own_columns_that_do_not_match_the_table_format_name_the_option(
    tiny_backbone, tmp_path, capsys
):
    args = [*own_data(tmp_path, label_column="stars"), "--model.backbone", tiny_backbone]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("macsc: error: ") and "has columns ['text', 'sentiment']" in err
    assert err.endswith(
        "needs the columns ['text', 'stars (absent in test files)']; rename the file's "
        "columns, or name yours in data option table_format (segments, label_columns)"
    ), err
    assert "GLUE" not in err


def test_predict_without_a_test_split_names_predict_on(tiny_backbone, tmp_path, capsys):
    args = [*own_data(tmp_path), "--model.backbone", tiny_backbone]
    assert main(["predict", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "macsc: error: no 'test' split: data_files has only ['train', 'validation']; add "
        "data_files.test=PATH, or use the validation split: --data.init_args.predict_on "
        "validation"
    )
    assert main(["predict", *args, "--data.init_args.predict_on", "validation"]) == 0
    (records,) = (tmp_path / "runs" / "mysent").rglob("predictions-validation.jsonl")
    assert len(records.read_text().splitlines()) == 10
    assert json.loads(records.read_text().splitlines()[0])["gold"] == "pos"
