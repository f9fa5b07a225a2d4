"""Loading SQuAD files into flat examples (tasks.squad_data)."""

import json
import logging

import pytest

from macsc.errors import ConfigError, DataError
from tasks import squad_data
from tasks.squad_data import (
    align_answers,
    find_answer_start,
    load_squad,
    read_squad,
    sample_fraction,
)

CONTEXT = "Denver Broncos won Super Bowl 50, beating the Carolina Panthers 24–10."


def official(qas, context=CONTEXT):
    return {
        "version": "v2.0",
        "data": [{"title": "SB", "paragraphs": [{"context": context, "qas": qas}]}],
    }


def qa(qid, answers, question="Who won?"):
    return {
        "id": qid,
        "question": question,
        "answers": [{"text": t, "answer_start": s} for t, s in answers],
        "is_impossible": not answers,
    }


def write(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def test_official_json_to_flat_examples(tmp_path):
    path = write(
        tmp_path / "dev-v2.0.json",
        official([qa("a", [("Denver Broncos", 0), ("Broncos", 7)]), qa("b", [])]),
    )
    examples = read_squad(path)
    assert examples == [
        {
            "id": "a",
            "title": "SB",
            "context": CONTEXT,
            "question": "Who won?",
            "answers": {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]},
        },
        {
            "id": "b",
            "title": "SB",
            "context": CONTEXT,
            "question": "Who won?",
            "answers": {"text": [], "answer_start": []},
        },
    ]


def test_json_lines_in_both_answer_shapes(tmp_path):
    lines = [
        {
            "id": "a",
            "question": "Q?",
            "context": CONTEXT,
            "answers": {"text": ["Denver"], "answer_start": [0]},
        },
        {
            "id": "b",
            "question": "Q?",
            "context": CONTEXT,
            "answers": [{"text": "50", "answer_start": 30}],
        },
        {"id": "c", "question": "Q?", "context": CONTEXT, "answers": []},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    examples = read_squad(path)
    assert [e["id"] for e in examples] == ["a", "b", "c"]
    assert examples[1]["answers"] == {"text": ["50"], "answer_start": [30]}
    assert examples[2]["answers"] == {"text": [], "answer_start": []}
    assert examples[0]["title"] == ""


def test_not_squad_shaped_json_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"x\.json.*no field 'data'"):
        read_squad(write(tmp_path / "x.json", {"question": "Q?"}))
    broken = official([qa("a", [("Denver", 0)])])
    del broken["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"]
    with pytest.raises(DataError, match=r"id 'a'\)\.answers\[0\] has no field 'answer_start'"):
        read_squad(write(tmp_path / "y.json", broken))
    del broken["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(DataError, match=r"paragraphs\[0\] has no field 'context'"):
        read_squad(write(tmp_path / "y.json", broken))
    path = tmp_path / "z.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "Q?", "answers": []}) + "\n")
    with pytest.raises(DataError, match=r"z\.jsonl:1 has no field 'context'"):
        read_squad(path)
    (tmp_path / "w.json").write_text("{oops")
    with pytest.raises(DataError, match=r"w\.json.*not valid JSON"):
        read_squad(tmp_path / "w.json")


def test_duplicate_ids_and_unknown_sources(tmp_path):
    path = write(tmp_path / "d.json", official([qa("a", []), qa("a", [])]))
    with pytest.raises(DataError, match="'a' appears twice"):
        read_squad(path)
    with pytest.raises(DataError, match="neither"):
        read_squad("data.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_squad(tmp_path / "absent.json")


def test_hub_failure_says_to_pass_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'squad_v2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'squad_v2'.*dev-v2\.0\.json"):
        read_squad("squad_v2", "validation")


def test_hub_rows_become_flat_examples(monkeypatch):
    import datasets

    rows = [
        {
            "id": "x",
            "title": "t",
            "context": CONTEXT,
            "question": "Q?",
            "answers": {"text": ["Denver"], "answer_start": [0]},
        }
    ]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rows)
    assert read_squad("squad", "train") == rows


def test_find_answer_start_prefers_the_nearest_occurrence():
    context = "the cat and the dog and the cat"
    assert find_answer_start(context, "cat", 4) == 4
    assert find_answer_start(context, "cat", 26) == 28
    assert find_answer_start(context, "cat", 22, window=3) is None
    assert find_answer_start(context, "bird", 0) is None


def test_misaligned_answers_are_repaired_dropped_and_reported(tmp_path, caplog):
    examples = [
        {
            "id": "ok",
            "context": CONTEXT,
            "answers": {"text": ["Denver Broncos"], "answer_start": [0]},
        },
        {
            "id": "shifted",
            "context": CONTEXT,
            "answers": {"text": ["Super Bowl 50", "Broncos"], "answer_start": [17, 7]},
        },
        {
            "id": "partly-wrong",
            "context": CONTEXT,
            "answers": {"text": ["Broncos", "Seahawks"], "answer_start": [7, 7]},
        },
        {
            "id": "all-wrong",
            "context": CONTEXT,
            "answers": {"text": ["Seahawks"], "answer_start": [3]},
        },
        {"id": "no-answer", "context": CONTEXT, "answers": {"text": [], "answer_start": []}},
    ]
    aligned, report = align_answers(examples)
    assert [e["id"] for e in aligned] == ["ok", "shifted", "partly-wrong", "no-answer"]
    assert aligned[1]["answers"] == {"text": ["Super Bowl 50", "Broncos"], "answer_start": [19, 7]}
    assert aligned[2]["answers"] == {"text": ["Broncos"], "answer_start": [7]}
    assert examples[1]["answers"]["answer_start"] == [17, 7]  # inputs untouched
    assert report.checked == 6
    assert report.repaired == ["shifted"]
    assert report.dropped == ["partly-wrong", "all-wrong"]
    assert report.removed == ["all-wrong"]

    qas = [qa(e["id"], list(zip(*e["answers"].values(), strict=True))) for e in examples]
    path = write(tmp_path / "train.json", official(qas))
    with caplog.at_level(logging.WARNING, logger=squad_data.__name__):
        loaded = load_squad(path)
    assert len(loaded) == 4
    message = caplog.text
    assert "1 questions had answer_start repaired ('shifted')" in message
    assert "2 questions lost an answer" in message and "'partly-wrong', 'all-wrong'" in message
    assert "removed ('all-wrong')" in message


def test_sample_fraction_is_seeded_and_keeps_whole_questions():
    examples = [{"id": str(i)} for i in range(200)]
    five = sample_fraction(examples, 0.05, seed=1)
    assert len(five) == 10
    assert five == sample_fraction(examples, 0.05, seed=1)
    assert five != sample_fraction(examples, 0.05, seed=2)
    assert [int(e["id"]) for e in five] == sorted(int(e["id"]) for e in five)
    assert sample_fraction(examples, 1.0, seed=3) == examples
    assert len(sample_fraction(examples[:3], 0.05, seed=0)) == 1
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="data_fraction"):
            sample_fraction(examples, bad)


def test_load_squad_with_fraction(tmp_path):
    qas = [qa(f"q{i}", [("Denver", 0)] if i % 2 else []) for i in range(40)]
    path = write(tmp_path / "train-v2.0.json", official(qas))
    sampled = load_squad(path, data_fraction=0.25, seed=7)
    assert len(sampled) == 10
    assert sampled == load_squad(path, data_fraction=0.25, seed=7)
    assert {e["id"] for e in sampled} <= {f"q{i}" for i in range(40)}
