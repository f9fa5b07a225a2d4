"""SQuAD evaluation against hand-computed scores (macsc.squad.metric)."""

import json
import subprocess
import sys

import pytest

from macsc.cli import main as macsc_main
from macsc.cli.squad_eval import main
from macsc.errors import ConfigError, DataError
from macsc.squad.metric import (
    best_thresholds,
    evaluate_v1,
    evaluate_v2,
    exact_score,
    f1_score,
    normalize_answer,
    precision_recall_curve,
    precision_recall_curves,
    score_v1,
    score_v2,
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
    bad = write_json(tmp_path / "bad.json", {"q1": 3, "q2": "x"})
    with pytest.raises(DataError, match="'q1'"):
        main([data, bad])


def test_python_dash_m_entry_point(tmp_path):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    good = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    done = subprocess.run(
        [sys.executable, "-m", "macsc.cli.squad_eval", data, good], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exact"] == pytest.approx(40.0)
    partial = write_json(tmp_path / "partial.json", {"q1": "x"})
    done = subprocess.run(
        [sys.executable, "-m", "macsc.cli.squad_eval", data, partial],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "'q2'" in done.stderr and "Traceback" not in done.stderr


# --- the official v2.0 flags, precision-recall, missing predictions, swapped files ------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def squad_eval_cli(capsys, *args):
    """Run ``macsc squad-eval ARGS``; return (exit code, stdout, stderr)."""
    code = macsc_main(["squad-eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_precision_recall_ap_and_images_through_the_command(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    na = write_json(tmp_path / "na.json", NA_PROBS)
    images = tmp_path / "plots" / "v2"  # created, parents too
    code, out, _ = squad_eval_cli(capsys, data, preds, "-n", na, "-p", images)
    assert code == 0
    scores = json.loads(out)
    # Answer in na_prob order q1 .1, q5 .3, q2 .6, q4 .8, q3 .9; 3 answerable (q1, q2, q5).
    # Each point: precision = credit / answered, recall = credit / 3; AP = sum p * (r - r_prev).
    # EM credit (q1 1, q5 0, q2 0): points (1/3, 1), (1/3, 1/2), (1/3, 1/3), (1/3, 1/4),
    #   (1/3, 1/5) -> AP = 1 * 1/3 = 1/3.
    assert scores["pr_exact_ap"] == pytest.approx(100 / 3)
    # F1 credit (q1 1, q5 0, q2 0.5): (1/3, 1), (1/3, 1/2), (1/2, 1/2), ... ->
    #   AP = 1 * 1/3 + 1/2 * (1/2 - 1/3) = 5/12.
    assert scores["pr_f1_ap"] == pytest.approx(500 / 12)
    # Oracle credits every answerable question 1; q1, q5, q2 come first: recall 1/3, 2/3, 1 at
    #   precision 1 -> AP = 1.
    assert scores["pr_oracle_ap"] == pytest.approx(100.0)
    assert list(scores)[-3:] == ["pr_exact_ap", "pr_f1_ap", "pr_oracle_ap"]
    # the official scores are unchanged by -p
    assert {k: v for k, v in scores.items() if not k.startswith("pr_")} == pytest.approx(
        evaluate_v2(V2_DATA, V2_PREDICTIONS, NA_PROBS)
    )
    names = ["na_prob_hist_hasAns", "na_prob_hist_noAns", "pr_exact", "pr_f1", "pr_oracle"]
    assert sorted(path.stem for path in images.iterdir()) == names
    assert all(path.read_bytes().startswith(PNG_MAGIC) for path in images.iterdir())


def test_precision_recall_points_fall_only_between_distinct_na_probs():
    # a (answerable, credit 1) and b (unanswerable) share na_prob 0.2, so no threshold splits
    # them: the first point comes after both, precision 1/2 at recall 1/2; then c (answerable,
    # credit 1): precision 2/3 at recall 1. AP = 1/2 * 1/2 + 2/3 * 1/2 = 7/12.
    # (Splitting the tie would give 1 * 1/2 + 2/3 * 1/2 = 5/6 instead.)
    curve = precision_recall_curve(
        {"a": 1.0, "b": 0.0, "c": 1.0},
        {"c": 0.5, "b": 0.2, "a": 0.2, "not in the data": 0.0},
        {"a": True, "b": False, "c": True},
    )
    assert curve.recalls == pytest.approx([0.0, 0.5, 1.0])
    assert curve.precisions == pytest.approx([1.0, 0.5, 2 / 3])
    assert curve.average_precision == pytest.approx(700 / 12)


def test_short_flags_and_out_file_through_python_dash_m(tmp_path):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    na = write_json(tmp_path / "na.json", NA_PROBS)
    out_file = tmp_path / "eval.json"

    def run(*args):
        done = subprocess.run(
            [sys.executable, "-m", "macsc.cli.squad_eval", data, preds, *args],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    short = run("-n", na, "-t", "0.5", "-o", str(out_file))
    long = run("--na-prob-file", na, "--na-prob-thresh", "0.5")
    assert short == long  # the same single JSON object on stdout
    assert json.loads(out_file.read_text()) == json.loads(short)
    # -t 0.5 changes the thresholded scores as hand-computed above (60% rather than 40%)
    assert json.loads(short)["exact"] == pytest.approx(60.0)


def test_out_file_for_v1(tmp_path, capsys):
    data = write_json(tmp_path / "dev1.json", squad_json([("q1", ["Eiffel Tower"])], "1.1"))
    preds = write_json(tmp_path / "pred.json", {"q1": "the eiffel tower"})
    code, out, _ = squad_eval_cli(capsys, data, preds, "--out-file", tmp_path / "eval.json")
    assert code == 0
    assert json.loads(out) == json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(out) == {"exact_match": 100.0, "f1": 100.0}


V1_DATA = squad_json(
    [("q1", ["the Eiffel Tower"]), ("q2", ["Paris, France"]), ("q5", ["1,000 feet"])], "1.1"
)


def test_missing_as_wrong_v1_scores_zero_with_a_warning(tmp_path, capsys):
    data = write_json(tmp_path / "dev1.json", V1_DATA)
    preds = write_json(tmp_path / "pred.json", {"q1": "Eiffel Tower", "q2": "in Paris"})
    code, _, err = squad_eval_cli(capsys, data, preds)
    assert code == 2
    assert "miss 1 of 3 question ids ('q5')" in err and "--missing-as-wrong" in err
    code, out, err = squad_eval_cli(capsys, data, preds, "--missing-as-wrong")
    assert code == 0
    # q1 EM 1 / F1 1, q2 EM 0 / F1 1/2 ("in paris" vs "paris france"), q5 missing: 0 / 0;
    # the total still counts q5: EM 1/3, F1 1.5/3.
    assert json.loads(out) == pytest.approx({"exact_match": 100 / 3, "f1": 50.0})
    assert "warning" in err and "miss 1 of 3" in err and "'q5'" in err


def test_missing_as_wrong_v2_is_wrong_at_every_threshold(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    # q3 (unanswerable) and q5 (answerable) have neither a prediction nor a na_prob.
    preds = write_json(
        tmp_path / "pred.json", {"q1": "Eiffel tower!", "q2": "in Paris", "q4": "a dog"}
    )
    na = write_json(tmp_path / "na.json", {"q1": 0.1, "q2": 0.6, "q4": 0.8})
    args = (data, preds, "-n", na, "-t", "0.5", "-p", tmp_path / "img", "--missing-as-wrong")
    code, out, err = squad_eval_cli(capsys, *args)
    assert code == 0
    assert "miss 2 of 5 question ids ('q3', 'q5')" in err
    scores = json.loads(out)
    # At 0.5: q1 answered (1), q2 null but answerable (0), q4 null and unanswerable (1),
    # q3 and q5 missing (0; q3 would be 1 as an empty answer): 2/5 on EM and F1.
    assert scores["exact"] == scores["f1"] == pytest.approx(40.0)
    assert scores["HasAns_exact"] == pytest.approx(100 / 3)  # q1 of q1, q2, q5
    assert scores["NoAns_exact"] == pytest.approx(50.0)  # q4 of q3, q4
    # Best threshold: start with the answered unanswerable ones null (q4: 1), then q1 .1 (+1),
    # q2 .6 (EM +0, F1 +0.5), q4 .8 (-1, "a dog"); q3/q5 never count. EM 2/5 at 0.1, F1 2.5/5
    # at 0.6.
    assert scores["best_exact"] == pytest.approx(40.0)
    assert scores["best_exact_thresh"] == pytest.approx(0.1)
    assert scores["best_f1"] == pytest.approx(50.0)
    assert scores["best_f1_thresh"] == pytest.approx(0.6)
    # PR: order q1 .1, q2 .6, q4 .8, then q3 and q5 last (no na_prob; answered wrong), 3
    # answerable. EM: (1/3, 1), (1/3, 1/2), (1/3, 1/3), (1/3, 1/5) -> AP 1/3.
    # F1: (1/3, 1), (1/2, 3/4), ... -> AP 1/3 + 3/4 * 1/6 = 11/24.
    # Oracle (q5 credited 1): (1/3, 1), (2/3, 1), (2/3, 2/3), (1, 3/5) -> 2/3 + 3/5 * 1/3 = 13/15.
    assert scores["pr_exact_ap"] == pytest.approx(100 / 3)
    assert scores["pr_f1_ap"] == pytest.approx(1100 / 24)
    assert scores["pr_oracle_ap"] == pytest.approx(1300 / 15)


def test_missing_ids_in_messages_are_cut_short():
    long_ids = [("x" * 60 + str(n), ["Paris"]) for n in range(6)]
    with pytest.raises(DataError) as error:
        evaluate_v2(squad_json(long_ids), {})
    message = str(error.value)
    assert "miss 6 of 6" in message
    shown = message[message.index("(") + 1 : message.index(")")]
    assert len(shown) <= 80 + len(", ...")


def big_squad(tmp_path, megabytes=2):
    """A SQuAD v2.0 file of about ``megabytes`` MB (long contexts) and its predictions."""
    questions = [(f"q{n}", ["Paris, France"] if n % 2 else []) for n in range(200)]
    data = squad_json(questions)
    paragraph = data["data"][0]["paragraphs"][0]
    paragraph["context"] = CONTEXT * (megabytes * 1_000_000 // len(CONTEXT))
    predictions = {qid: "Paris" for qid, _ in questions}
    return write_json(tmp_path / "dev-v2.0.json", data), predictions


def test_swapped_data_and_predictions_give_a_short_clear_error(tmp_path, capsys):
    data, predictions = big_squad(tmp_path)
    assert len(open(data).read()) > 2_000_000
    preds = write_json(tmp_path / "predictions.json", predictions)
    code, out, err = squad_eval_cli(capsys, preds, data)
    assert code == 2 and out == ""
    assert err == (
        f"macsc: error: DATA_JSON {preds!r} looks like a predictions file ({{question id: "
        f"answer}}) and PRED_JSON {data!r} like a SQuAD dataset; the order is: macsc squad-eval "
        f"DATA_JSON PRED_JSON [-n NA_PROB_JSON]\n"
    )
    # the same file twice: the data is fine, the predictions are not predictions
    code, _, err = squad_eval_cli(capsys, data, data)
    assert code == 2 and "PRED_JSON" in err and "like a SQuAD dataset" in err
    assert len(err) < 400 and "Eiffel" not in err


def test_null_odds_in_the_wrong_place_give_a_short_clear_error(tmp_path, capsys):
    data, predictions = big_squad(tmp_path)
    preds = write_json(tmp_path / "pred.json", predictions)
    na = write_json(tmp_path / "na.json", dict.fromkeys(predictions, 0.5))
    code, _, err = squad_eval_cli(capsys, data, na, "-n", preds)
    assert code == 2
    assert f"PRED_JSON {na!r} looks like a no-answer probability file" in err
    assert f"NA_PROB_JSON {preds!r} like a predictions file" in err
    code, _, err = squad_eval_cli(capsys, na, preds, "-n", data)
    assert code == 2 and f"DATA_JSON {na!r} looks like a no-answer probability" in err
    assert f"NA_PROB_JSON {data!r} like a SQuAD dataset" in err and len(err) < 400


def test_a_bad_value_is_quoted_in_at_most_80_characters(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", {"q1": "x", "q2": ["Paris"] * 100_000})
    code, _, err = squad_eval_cli(capsys, data, preds)
    assert code == 2 and "the value for question 'q2' is ['Paris', " in err
    assert len(err) < 250


def test_images_need_na_probs_and_v2_flags_need_v2(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    code, out, err = squad_eval_cli(capsys, data, preds, "-p", tmp_path / "img")
    assert code == 0 and "needs -n/--na-prob-file" in err
    assert json.loads(out) == pytest.approx(evaluate_v2(V2_DATA, V2_PREDICTIONS))  # no pr_*
    assert not (tmp_path / "img").exists()
    v1 = write_json(tmp_path / "dev1.json", V1_DATA)
    for flag in ("-t", "-p"):
        code, _, err = squad_eval_cli(capsys, v1, preds, flag, "0.5")
        assert code == 2 and f"{flag}/--" in err and "v2.0 only" in err


def test_verbose_goes_to_stderr(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V2_DATA)
    preds = write_json(tmp_path / "pred.json", {**V2_PREDICTIONS, "other": "x"})
    code, out, err = squad_eval_cli(capsys, data, preds, "-v")
    assert code == 0
    assert json.loads(out)["total"] == 5  # stdout holds only the JSON
    assert "5 questions (3 answerable, 2 unanswerable)" in err
    assert "6 predictions" in err and "1 not in the data" in err


def test_json_lines_data_scores_like_the_json_file(tmp_path, capsys):
    lines = [
        json.dumps({"id": question["id"], "answers": question["answers"]})
        for question in V2_DATA["data"][0]["paragraphs"][0]["qas"]
    ]
    data = tmp_path / "dev.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    preds = write_json(tmp_path / "pred.json", V2_PREDICTIONS)
    code, out, _ = squad_eval_cli(capsys, data, preds)
    assert code == 0
    assert json.loads(out) == pytest.approx(evaluate_v2(V2_DATA, V2_PREDICTIONS))


def test_scores_refuse_a_missing_prediction_by_default():
    # the official scripts' default: every question needs a prediction
    golds = {"q1": ["Paris"], "q2": ["France"]}
    for score in (score_v1, score_v2):
        with pytest.raises(DataError, match="q2"):
            score(golds, {"q1": "Paris"})
    with pytest.raises(DataError, match="q2"):
        precision_recall_curves(golds, {"q1": "Paris"}, {"q1": 0.0})


def test_default_no_answer_threshold_is_one_and_without_na_probs_nothing_is_withheld():
    golds = {"q1": ["Paris"], "q2": []}
    predictions = {"q1": "Paris", "q2": ""}
    # official v2.0: an answer is withheld when its na_prob exceeds the threshold (1.0)
    withheld = score_v2(golds, predictions, {"q1": 1.5, "q2": 0.0})
    assert withheld["HasAns_exact"] == 0.0 and withheld["exact"] == 50.0
    kept = score_v2(golds, predictions, {"q1": 1.0, "q2": 0.0})
    assert kept["HasAns_exact"] == 100.0
    # without na_probs every na_prob is 0, so a threshold of 0.5 withholds nothing
    assert score_v2(golds, {"q1": "Paris", "q2": "x"}, None, 0.5)["HasAns_exact"] == 100.0


def test_errors_name_the_source_of_the_data():
    broken = squad_json([("q1", ["Paris"])])
    del broken["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    with pytest.raises(DataError, match="dev-v2.0.json"):
        evaluate_v2(broken, {"q1": ""}, source="dev-v2.0.json")
    with pytest.raises(DataError, match="dev-v1.1.json"):
        evaluate_v1(broken, {"q1": ""}, source="dev-v1.1.json")
