"""`macsc fit` on SQuAD v2 through the CLI with a tiny backbone: trains a few steps, validates,
logs val/exact and val/f1 (fused and per branch), writes predictions.json and null_odds.json."""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

from macsc.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROTOTYPES = json.dumps({"image": {"kind": "gaussian", "dim": 16, "k": 4}})
LONG = " ".join(f"Sentence {i} is about the topic number {i}." for i in range(30))
LONG += " The capital of France is Paris."
QAS = {  # id -> (context, question, answer or None)
    "paris": (LONG, "What is the capital of France?", "Paris"),
    "mars": (LONG, "Who is the king of Mars?", None),
    "broncos": ("Denver Broncos won Super Bowl 50.", "Who won Super Bowl 50?", "Denver Broncos"),
}


def squad_json(path: Path) -> str:
    """An official-format v2.0 file of QAS, one paragraph per question."""
    paragraphs = []
    for qid, (context, question, answer) in QAS.items():
        answers = (
            [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]
        )
        qa = {"id": qid, "question": question, "answers": answers, "is_impossible": not answers}
        paragraphs.append({"context": context, "qas": [qa]})
    path.write_text(
        json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]})
    )
    return str(path)


def event_scalars(root: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in root.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def squad_args(tiny_backbone: str, tmp_path: Path, data: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "lightning_configs" / "squad_v2.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        "--trainer.max_steps=3",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--model.backbone={tiny_backbone}",
        "--model.modalities=[text, image]",
        f"--model.prototypes={PROTOTYPES}",
        "--model.enhancer.heads=4",
        f"--data.init_args.data_files={json.dumps({'train': data, 'validation': data})}",
        "--data.init_args.max_length=48",
        "--data.init_args.doc_stride=12",
        "--data.init_args.max_question_length=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=64",  # one batch: every question is scored
        "--data.init_args.num_workers=0",
    ]


def test_squad_v2_fit_writes_predictions_and_logs_f1(tiny_backbone, tmp_path):
    data = squad_json(tmp_path / "squad.json")
    args = ["fit", *squad_args(tiny_backbone, tmp_path, data)]
    assert main(args) == 0
    folders = sorted((tmp_path / "runs").rglob("val_validation_step*"))
    assert [folder.name for folder in folders] == ["val_validation_step3"]  # not the sanity check
    predictions = json.loads((folders[0] / "predictions.json").read_text())
    null_odds = json.loads((folders[0] / "null_odds.json").read_text())
    assert set(predictions) == set(null_odds) == set(QAS)
    assert all(isinstance(text, str) for text in predictions.values())
    scalars = event_scalars(tmp_path / "runs")
    assert {"val/f1", "val/exact", "val/best_f1_thresh", "val/f1/text", "val/f1/image"} <= scalars
    assert {"loss/wa", "loss/msb", "weights/rho/image"} <= scalars

    # predict writes the official files too (here on the validation split), which squad-eval
    # scores like the official script; and one record per question
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    predict = ["predict", *squad_args(tiny_backbone, tmp_path, data), f"--ckpt_path={checkpoint}"]
    assert main(predict) == 0
    (folder,) = (tmp_path / "runs").rglob("predict_validation_step*")
    predicted = json.loads((folder / "predictions.json").read_text())
    odds = json.loads((folder / "null_odds.json").read_text())
    assert set(predicted) == set(odds) == set(QAS)
    # at data option null_threshold 0.0: no answer exactly where the null odds exceed it
    assert all((text == "") == (odds[qid] > 0.0) for qid, text in predicted.items())
    (records,) = folder.parent.glob("predictions-validation.jsonl")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert {line["id"] for line in lines} == set(QAS)
    assert all(line["prediction"] == predicted[line["id"]] for line in lines)
    assert (
        main(
            [
                "squad-eval",
                data,
                str(folder / "predictions.json"),
                "-n",
                str(folder / "null_odds.json"),
            ]
        )
        == 0
    )


def normalized(text: str) -> str:
    """The official SQuAD answer normalisation, written out: lower case, no punctuation, no
    articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def test_predict_on_a_split_with_answers_fills_gold_and_correct(tiny_backbone, tmp_path, capsys):
    """SQuAD predicts on the validation split by default: its answers are known, so each record
    has its gold answers and verdict (issue 21.4), and `macsc overlap` can compare such runs."""
    data = squad_json(tmp_path / "squad.json")
    args = squad_args(tiny_backbone, tmp_path, data)
    assert main(["fit", *args, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]) == 0
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    assert main(["predict", *args, f"--ckpt_path={checkpoint}"]) == 0
    (records,) = (tmp_path / "runs").rglob("predictions-validation.jsonl")
    lines = {line["id"]: line for line in map(json.loads, records.read_text().splitlines())}
    assert {qid: line["gold"] for qid, line in lines.items()} == {
        "paris": ["Paris"],
        "mars": [],
        "broncos": ["Denver Broncos"],
    }
    for qid, (_, _, answer) in QAS.items():
        right = normalized(lines[qid]["prediction"]) == normalized(answer or "")
        assert lines[qid]["correct"] is right and lines[qid]["exact"] == int(right), lines[qid]
    other = tmp_path / "copy" / "version_0"
    shutil.copytree(records.parent, other)
    capsys.readouterr()
    assert main(["overlap", str(records.parent), str(other)]) == 0
    assert "overlap of correct predictions on validation (3 ids, correct)" in (
        capsys.readouterr().out
    )
