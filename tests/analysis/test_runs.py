"""`macsc overlap`, `report` and `weights` on run folders of tiny real runs (issue 11): each run
is `macsc fit` then `macsc validate` with a tiny BERT and Gaussian prototypes, and every number
the commands print is checked against one computed here from the run's own files."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from macsc.analysis.report import paper_results
from macsc.cli import main
from macsc.training.module import MaCSC
from tests.cli.test_cli import demo_args
from tests.conftest import write_tiny_bert

SHORT = [
    "--trainer.max_steps",
    "3",
    "--trainer.val_check_interval",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--data.init_args.eval_batch_size",
    "32",
]
SST2_WORDS = (
    "a charming and often affecting journey",
    "no wit , only labored gags",
    "the acting is superb and the story moving",
    "a dull , lifeless mess of a film",
    "warm , funny and smart",
    "it never finds its footing",
)


def fit_then_validate(root: Path, backbone: str, name: str, *extra: str) -> dict[str, Path]:
    """`macsc fit` then `macsc validate` of the fitted run's last.ckpt; their run folders
    (one: the validation of a run's checkpoint writes into that run's folder)."""
    args = demo_args(backbone, root, *SHORT, "--trainer.logger.init_args.name", name, *extra)
    assert main(["fit", *args]) == 0
    (fitted,) = (root / name).glob("version_*")
    assert main(["validate", *args, f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}"]) == 0
    assert list((root / name).glob("version_*")) == [fitted]
    assert (fitted / "config-validate.yaml").is_file()
    return {"fit": fitted, "validate": fitted}


def write_sst2(folder: Path) -> dict[str, str]:
    """SST-2's TSV layout (``sentence``, ``label``) with a few made-up sentences."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, count in (("train", 48), ("validation", 24)):
        lines = ["sentence\tlabel"]
        for index in range(count):
            words = SST2_WORDS[index % len(SST2_WORDS)]
            lines.append(f"{words} ({split} {index}) .\t{1 - index % 2}")
        path = folder / f"{split}.tsv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[split] = str(path)
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone) -> dict[str, dict[str, Path]]:
    """Three runs: the demo task T+I+A+V and text only, and SST-2 text only on a tiny BERT saved
    as ``bert-base-uncased`` (so its config names the row ``bert-base/none/T``)."""
    root = tmp_path_factory.mktemp("analysis_runs")
    bert = write_tiny_bert(root / "models" / "bert-base-uncased")
    sst2 = [
        "--data",
        "tasks.glue.GLUEDataModule",
        "--data.init_args.task",
        "sst2",
        "--data.init_args.data_files",
        json.dumps(write_sst2(root / "sst2")),
        "--model.modalities",
        "[text]",
        "--model.objective.lambda_msb",
        "0",
    ]
    return {
        "tiav": fit_then_validate(root / "runs", tiny_backbone, "tiav"),
        "text": fit_then_validate(
            root / "runs", tiny_backbone, "text", "--model.modalities", "[text]"
        ),
        "sst2": fit_then_validate(root / "runs", str(bert), "sst2", *sst2),
    }


def predictions(folder: Path, split: str = "validation") -> list[dict]:
    path = folder / f"predictions-{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_overlap_of_two_real_runs_matches_their_predictions(runs, tmp_path, capsys):
    folders = [runs["tiav"]["validate"], runs["text"]["validate"]]
    right = []
    for folder in folders:
        records = predictions(folder)
        assert len({r["id"] for r in records}) == len(records) == 64  # 2 batches of 32
        right.append({str(r["id"]) for r in records if r["correct"]})
    table = tmp_path / "overlap.csv"
    assert main(["overlap", *map(str, folders), "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "overlap of correct predictions on validation (64 ids, correct)" in printed
    rows = list(csv.reader(table.open(encoding="utf-8")))
    for i, first in enumerate(right):
        for j, second in enumerate(right):
            cell = rows[1 + i][1 + j]
            if not first:  # a run that gets nothing right has an undefined row
                assert cell == ""
                continue
            assert float(cell) == pytest.approx(len(first & second) / len(first), abs=1e-6)
    labels = [row[0] for row in rows[1:]]
    assert f"|S|: {labels[0]} {len(right[0])}, {labels[1]} {len(right[1])}" in printed


def test_report_lists_demo_runs_as_unmatched_and_fills_sst2_in_table_1(runs, capsys):
    demo = [runs["tiav"]["validate"], runs["text"]["fit"]]
    sst2 = runs["sst2"]["validate"]
    assert main(["report", *map(str, demo), str(sst2), "--table", "1"]) == 0
    text = capsys.readouterr().out
    for folder in demo:
        assert f"- {folder}: task demo is in none of the paper's tables" in text
    records = predictions(sst2)
    accuracy = 100 * sum(bool(r["correct"]) for r in records) / len(records)
    metrics = json.loads((sst2 / "metrics-validation.json").read_text())
    assert metrics["stage"] == "validate" and metrics["task"] == "sst2"
    assert metrics["metrics"]["accuracy"] * 100 == pytest.approx(accuracy)
    (table_1,) = [t for t in paper_results()["tables"] if t["table"] == 1]
    row = next(r for r in table_1["rows"] if r["id"] == "bert-base/none/T")
    paper = row["values"]["sst2"]
    section = text.split("## Table 1.")[1].split("\n## ")[0]
    start = "| " + " | ".join(row["cells"]) + " |"
    line = next(line for line in section.splitlines() if line.startswith(start))
    cells = [cell.strip() for cell in line[len(start) :].strip(" |").split(" | ")]
    column = [c["id"] for c in table_1["columns"]].index("sst2")
    assert cells[column] == f"{accuracy:.1f} / {paper:.1f} ({accuracy - paper:+.1f})"
    assert all(cell.startswith("– /") for i, cell in enumerate(cells) if i != column)
    assert f"| {sst2} | bert-base/none/T | Table 1 SST-2 |" in text
    assert "3 runs read: 1 matched, 2 not matched." in text


def softmax(values: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in values)
    return [math.exp(v) / total for v in values]


def test_weights_of_a_real_run_are_the_softmax_of_its_last_checkpoint(runs, tmp_path, capsys):
    folder = runs["tiav"]["fit"]
    last = folder / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    rho = softmax(state["objective.rho_logits"].double().tolist())
    assert max(rho) - min(rho) > 1e-3  # three steps moved them: not the uniform start
    z = state["objective.calibration.z"].double().tolist()
    assert main(["weights", str(folder), "--out", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {last} (the run's last.ckpt; step 3" in printed
    lines = printed.split("rho (late-fusion weights, Eq. 11):\n")[1].splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["text", "image", "audio", "video"]
    for line, expected in zip(lines[:4], rho, strict=True):
        assert float(line.split()[1]) == pytest.approx(expected, abs=5e-5)
    # pi_z, Eq. 6: each row a softmax over the other modalities; "–" on the diagonal
    for m, line in enumerate(lines[6:10]):
        others = softmax([z[m][k] for k in range(4) if k != m])
        cells = line.split()[1:]
        assert cells[m] == "–"
        shown = [float(cell) for k, cell in enumerate(cells) if k != m]
        assert shown == pytest.approx(others, abs=5e-5)
    assert (tmp_path / "figures" / "rho-last.png").stat().st_size > 0
    assert (tmp_path / "figures" / "pi_z-last.png").stat().st_size > 0


def test_weights_of_a_text_only_run_is_rho_1_and_no_pi_z(runs, tmp_path, capsys):
    assert main(["weights", str(runs["text"]["fit"]), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rho (late-fusion weights, Eq. 11):\n  text  1.0000\n" in printed
    assert "pi_z: none" in printed


def test_weights_of_a_generation_checkpoint_say_it_has_none(tiny_t5, tmp_path, capsys):
    """A CommonGen model has one decoder and no late fusion: no rho to show, and the error
    says why instead of doubting that the file is a MaCSC checkpoint."""
    model = MaCSC(
        backbone=tiny_t5,
        modalities=["text", "image"],
        prototypes={"image": {"kind": "gaussian", "dim": 16, "k": 4}},
        task={"kind": "generation", "num_labels": 1, "metrics": ["bleu_4"]},
        enhancer={"heads": 4},
    )
    path = tmp_path / "commongen.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    capsys.readouterr()  # the backbone's loading progress
    assert main(["weights", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("macsc: error:") and "generation run" in error
    assert len(error.splitlines()) == 1


def test_the_config_of_a_run_of_an_earlier_macsc_reads_in_todays_names(tmp_path):
    """A run folder written before the option groups (``config_flat_options.yaml``, see
    tests/training/test_legacy.py): ``macsc report`` and ``macsc overlap`` read its settings."""
    from macsc.analysis.runs import display_name, read_config, row_id, training_settings
    from tests.training.test_legacy import CLI_OPTIONS, DATA

    folder = tmp_path / "version_0"
    folder.mkdir()
    shutil.copy(DATA / "config_flat_options.yaml", folder / "config.yaml")
    config = read_config(folder)
    assert {group: config["model"][group] for group in CLI_OPTIONS} == CLI_OPTIONS
    assert not {"lambda_msb", "learning_rate", "enhancement"} & set(config["model"])
    assert row_id(config) == "tiny_bert/ours/T+I+A+V/prototypes=gaussian"
    assert display_name(config) == "tiny_bert T+I+A+V prototypes=gaussian"
    assert dict(training_settings(config)) == {
        "lr": 3.0e-4,
        "batch": 16,
        "devices": 1,
        "nodes": 1,
        "accumulate": 1,
        "epochs": 2,
        "steps": 2,
        "weight decay": 0.02,
        "warm-up": 0.2,
        "adam epsilon": 1.0e-7,
        "optimizer": "adafactor",
        "schedule": "constant",
    }
