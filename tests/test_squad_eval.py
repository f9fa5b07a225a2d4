"""SQuAD evaluation against hand-computed scores (macsc.squad_eval)."""

import json
import subprocess
import sys

import pytest

from macsc.errors import ConfigError, DataError
from macsc.squad_eval import (
    best_thresholds,
    evaluate_v1,
    evaluate_v2,
    exact_score,
    f1_score,
    main,
    normalize_answer,
)

CONTEXT = "The Eiffel Tower, 1,000 feet tall, stands in Paris, France. A cat sat on the mat."


def squad_json(questions, version="v2.0"):
    """An official-format SQuAD object holding ``questions`` = [(id, [answer texts])]."""
    qas = [
        {
            "id": qid,
            "question": f"question {qid}?",
            "answers": [
                {"text": text, "answer_start": max(CONTEXT.find(text), 0)} for text in golds
            ],
            "is_impossible": not golds,
        }
        for qid, golds in questions
    ]
    paragraph = {"context": CONTEXT, "qas": qas}
    return {"version": version, "data": [{"title": "T", "paragraphs": [paragraph]}]}


V2_DATA = squad_json(
    [
        ("q1", ["the Eiffel Tower", "Eiffel Tower"]),
        ("q2", ["Paris, France"]),
        ("q3", []),
        ("q4", []),
        ("q5", ["1,000 feet"]),
    ]
)
V2_PREDICTIONS = {"q1": "Eiffel tower!", "q2": "in Paris", "q3": "", "q4": "a dog", "q5": ""}
NA_PROBS = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.8, "q5": 0.3}


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("The  Eiffel-Tower, (Paris)!") == "eiffeltower paris"
    assert normalize_answer("An apple a day, theater") == "apple day theater"
    assert normalize_answer("  the  ") == ""


def test_exact_and_f1_per_answer():
    assert exact_score("Eiffel tower!", "the Eiffel Tower") == 1
    assert exact_score("in Paris", "Paris, France") == 0
    # "in paris" vs "paris france": one shared token, precision = recall = 1/2.
    assert f1_score("in Paris", "Paris, France") == pytest.approx(0.5)
    # "cat" vs "cat sat": precision 1, recall 1/2.
    assert f1_score("the cat", "a cat sat") == pytest.approx(2 / 3)
    # Repeated tokens count as often as they occur on both sides.
    assert f1_score("dog dog", "dog") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_empty_answer_rule_differs_between_versions():
    assert f1_score("", "the") == 1.0  # v2.0: both normalise to nothing
    assert f1_score("", "the", empty_matches_empty=False) == 0.0  # v1.1: no shared token
    assert f1_score("a dog", "") == 0.0


def test_evaluate_v2_without_na_probs():
    # EM per question: 1, 0, 1, 0, 0; F1: 1, 0.5, 1, 0, 0.
    scores = evaluate_v2(V2_DATA, V2_PREDICTIONS)
    assert list(scores) == [
        "exact",
        "f1",
        "total",
        "HasAns_exact",
        "HasAns_f1",
        "HasAns_total",
        "NoAns_exact",
        "NoAns_f1",
        "NoAns_total",
    ]
    assert scores["exact"] == pytest.approx(40.0)
    assert scores["f1"] == pytest.approx(50.0)
    assert scores["total"] == 5
    assert scores["HasAns_exact"] == pytest.approx(100 / 3)
    assert scores["HasAns_f1"] == pytest.approx(50.0)
    assert scores["HasAns_total"] == 3
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["NoAns_total"] == 2


def test_evaluate_v2_with_na_probs_and_best_thresholds():
    scores = evaluate_v2(V2_DATA, V2_PREDICTIONS, NA_PROBS, na_prob_thresh=0.5)
    # Above 0.5, q2 (answerable, 0), q3 and q4 (unanswerable, 1 each) are predicted "no answer".
    assert scores["exact"] == scores["f1"] == pytest.approx(60.0)
    assert scores["HasAns_exact"] == scores["HasAns_f1"] == pytest.approx(100 / 3)
    assert scores["NoAns_exact"] == pytest.approx(100.0)
    # Best-threshold walk in na_prob order q1 .1, q5 .3, q2 .6, q4 .8, q3 .9 from 2 (NoAns):
    # EM: 3, 3, 3, 2, 2 -> 3/5 at 0.1. F1: 3, 3, 3.5, 2.5, 2.5 -> 3.5/5 at 0.6.
    assert scores["best_exact"] == pytest.approx(60.0)
    assert scores["best_exact_thresh"] == pytest.approx(0.1)
    assert scores["best_f1"] == pytest.approx(70.0)
    assert scores["best_f1_thresh"] == pytest.approx(0.6)
    assert list(scores)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


def test_best_threshold_keeps_all_null_when_answering_only_hurts():
    has_answer = {"a": False, "b": False}
    best = best_thresholds(
        {"a": "x", "b": "y"},
        {"a": 0, "b": 0},
        {"a": 0.0, "b": 0.0},
        {"a": 0.2, "b": 0.4},
        has_answer,
    )
    assert best == {
        "best_exact": 100.0,
        "best_exact_thresh": 0.0,
        "best_f1": 100.0,
        "best_f1_thresh": 0.0,
    }


def test_evaluate_v2_accepts_flat_examples():
    flat = [
        {"id": qid, "answers": {"text": golds, "answer_start": [0] * len(golds)}}
        for qid, golds in [("q1", ["the Eiffel Tower"]), ("q3", [])]
    ]
    scores = evaluate_v2(flat, {"q1": "Eiffel Tower", "q3": "x"})
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["HasAns_total"] == scores["NoAns_total"] == 1


def test_evaluate_v1_percentages():
    data = squad_json(
        [
            ("q1", ["the Eiffel Tower", "Eiffel Tower"]),
            ("q2", ["Paris, France"]),
            ("q5", ["1,000 feet"]),
            ("q6", ["the cat", "A cat sat"]),
        ],
        version="1.1",
    )
    predictions = {"q1": "Eiffel tower!", "q2": "in Paris", "q5": "", "q6": "cat sat"}
    # EM 1, 0, 0, 1; F1 1, 0.5, 0, 1 (max over the gold answers).
    assert evaluate_v1(data, predictions) == pytest.approx({"exact_match": 50.0, "f1": 62.5})


def test_missing_prediction_names_the_ids():
    predictions = {k: v for k, v in V2_PREDICTIONS.items() if k not in ("q2", "q4")}
    with pytest.raises(DataError, match=r"miss 2 of 5 question ids \('q2', 'q4'\)"):
        evaluate_v2(V2_DATA, predictions)
    with pytest.raises(DataError, match="'q3'"):
        evaluate_v2(V2_DATA, V2_PREDICTIONS, {k: 0.0 for k in ("q1", "q2", "q4", "q5")})
    with pytest.raises(DataError, match="q2"):
        evaluate_v1(squad_json([("q2", ["Paris"])], "1.1"), {})


def test_not_squad_shaped_names_the_field():
    with pytest.raises(DataError, match="no field 'data'"):
        evaluate_v2({"questions": []}, {})
    broken = squad_json([("q1", ["Paris"])])
    del broken["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    with pytest.raises(DataError, match=r"qas\[0\] \(id 'q1'\) has no field 'answers'"):
        evaluate_v2(broken, {"q1": ""})
    with pytest.raises(DataError, match="no gold answer"):
        evaluate_v1(V2_DATA, V2_PREDICTIONS)


def write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


def test_cli_prints_official_json(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    na = write_json(tmp_path / "na.json", NA_PROBS)
    assert main([data, preds, "--na-prob-file", na, "--na-prob-thresh", "0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx(evaluate_v2(V2_DATA, V2_PREDICTIONS, NA_PROBS, 0.5))

    v1 = write_json(tmp_path / "dev1.json", squad_json([("q1", ["Eiffel Tower"])], "1.1"))
    assert main([v1, preds]) == 0  # version 1.1 read from the file
    assert json.loads(capsys.readouterr().out) == {"exact_match": 100.0, "f1": 100.0}
    with pytest.raises(ConfigError, match="--na-prob-file"):
        main([v1, preds, "--na-prob-file", na])


def test_cli_bad_input_messages(tmp_path):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", {"q1": "x"})
    with pytest.raises(DataError, match=r"pred\.json.*miss 4 of 5"):
        main([data, preds])
    with pytest.raises(DataError, match="does not exist"):
        main([str(tmp_path / "absent.json"), preds])
    bad = write_json(tmp_path / "bad.json", {"q1": 3})
    with pytest.raises(DataError, match="'q1'"):
        main([data, bad])


def test_python_dash_m_entry_point(tmp_path):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    good = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    done = subprocess.run(
        [sys.executable, "-m", "macsc.squad_eval", data, good], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exact"] == pytest.approx(40.0)
    partial = write_json(tmp_path / "partial.json", {"q1": "x"})
    done = subprocess.run(
        [sys.executable, "-m", "macsc.squad_eval", data, partial], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "'q2'" in done.stderr and "Traceback" not in done.stderr
