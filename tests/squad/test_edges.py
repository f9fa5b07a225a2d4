"""SQuAD features, post-processing, scoring and the span head at their edges, against values
worked out by hand or a brute-force search: boundaries, the defaults of the reference scripts
(n-best 20, answers of at most 30 tokens, windows of 384 with a stride of 128, thresholds 0 and
1), ties, float32 logits, and prediction without labels. Found by mutation testing."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from macsc.errors import ConfigError, DataError
from macsc.method.heads import EvaluationContext, HeadOutput, score_spans
from macsc.method.heads.span import question_scores
from macsc.squad.features import answer_token_span, prepare_squad_features, truncate_questions
from macsc.squad.metric import best_threshold, evaluate_v1, evaluate_v2
from macsc.squad.postprocess import (
    postprocess_qa_predictions,
    span_candidates,
    write_squad_predictions,
)
from tests.method.test_span_head import FakeData, crafted_logits, example, head
from tests.squad.test_features import bert_tokenizer, roberta_like_tokenizer
from tests.squad.test_postprocess import CONTEXT, EXAMPLES, features, logits

# --- features ---------------------------------------------------------------------------------

# "Paris is the capital": tokens (0, 5) (6, 8) (9, 12) (13, 20), after two non-context tokens
TOKENS = [None, None, (0, 5), (6, 8), (9, 12), (13, 20)]


def test_answer_token_span_boundaries():
    assert answer_token_span(TOKENS, 0, 5) == (2, 2)  # starts exactly on the first context token
    assert answer_token_span(TOKENS, 2, 5) == (2, 2)  # "ris": inside the first token
    assert answer_token_span(TOKENS, 7, 7) is None  # empty answer
    assert answer_token_span(TOKENS, 5, 6) is None  # only the space between two tokens
    window = [None, (6, 8), (9, 12)]  # a window that starts after the answer
    assert answer_token_span(window, 5, 8) is None


def test_a_question_of_exactly_max_question_length_tokens_is_kept(caplog):
    tokenizer = bert_tokenizer()
    questions = ["one two three", "one two three four five", "a b c d e"]
    with caplog.at_level(logging.WARNING, logger="macsc.squad.features"):
        kept = truncate_questions(questions, ["x", "y", "z"], tokenizer, 3)
    assert kept == ["one two three", "one two three", "a b c"]
    assert "2 questions longer than max_question_length=3 tokens were cut ('y', 'z')" in (
        caplog.text
    )


def test_default_windows_are_384_tokens_with_a_stride_of_128_and_unpadded():
    tokenizer = bert_tokenizer()
    long_context = " ".join(f"w{i}" for i in range(900))  # "w12" is two word pieces
    examples = [
        {"id": "long", "question": "what?", "context": long_context, "answers": {"text": []}},
        {"id": "short", "question": "what?", "context": "a short one", "answers": {"text": []}},
    ]
    out = prepare_squad_features(examples, tokenizer)
    lengths = [len(ids) for ids in out["input_ids"]]
    assert max(lengths) == 384 and lengths[-1] < 20  # the short example is not padded
    assert all(all(mask) for mask in out["attention_mask"])
    first, second = (
        [o for o in out["offset_mapping"][f] if o is not None] for f in (0, 1)
    )  # context tokens of the first two windows of "long"
    shared = [o for o in first if o in set(second)]
    assert len(shared) == 128 and second[: len(shared)] == shared


def test_room_for_the_context_must_exceed_the_stride():
    tokenizer = bert_tokenizer()  # three special tokens around a pair
    example = {"id": "q", "question": "why?", "context": "because.", "answers": {"text": []}}
    with pytest.raises(ConfigError, match="doc_stride=77 leaves no step"):
        prepare_squad_features([example], tokenizer, 100, 77, max_question_length=20)
    prepare_squad_features([example], tokenizer, 100, 76, max_question_length=20)


def test_leading_spaces_of_a_question_take_no_tokens():
    tokenizer = roberta_like_tokenizer()  # byte-level: a leading space would be a token
    plain = {"id": "q", "question": "Where is it?", "context": "In Paris.", "answers": {"text": []}}
    spaced = dict(plain, question="   Where is it?")
    assert (
        prepare_squad_features([spaced], tokenizer)["input_ids"]
        == prepare_squad_features([plain], tokenizer)["input_ids"]
    )


def test_a_tokenizer_without_fast_offsets_is_named():
    class Slow:
        pass

    with pytest.raises(ConfigError, match="Slow is not one"):
        prepare_squad_features(EXAMPLES, Slow())


def word_level_tokenizer(**special):
    """Words only; with ``eos_token``: pairs become ``a </s> b </s>`` and padding repeats ``</s>``
    (CLIP's layout: no CLS, the end-of-text token closes the window and pads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "where", "is", "it", "in", "paris", "?", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if special.get("eos_token"):
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", 2)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


UNANSWERABLE = {
    "id": "q",
    "question": "where is it ?",
    "context": "in paris .",
    "answers": {"text": [], "answer_start": []},
}


def test_without_cls_or_eos_tokens_the_first_position_stands_for_no_answer():
    tokenizer = word_level_tokenizer(pad_token="<pad>")
    assert tokenizer.cls_token_id is None and tokenizer.eos_token_id is None
    out = prepare_squad_features([UNANSWERABLE], tokenizer, 32, 8, max_question_length=8)
    assert out["null_index"] == [0] and out["start_positions"] == [0]


@pytest.mark.parametrize("pad", [False, True])
def test_without_a_cls_token_no_answer_is_the_end_token_that_closes_the_window(pad):
    """SPEC 13: CLIP's tokenizer has no CLS and its towers are causal; the null position is the
    window's own last end-of-text token, never the padding that repeats it."""
    tokenizer = word_level_tokenizer(eos_token="</s>", pad_token="</s>")
    out = prepare_squad_features(
        [UNANSWERABLE], tokenizer, 16, 4, max_question_length=8, pad_to_max_length=pad
    )
    # where is it ? </s> in paris . </s> [</s> padding]
    assert out["input_ids"][0] == [3, 4, 5, 8, 2, 6, 7, 9, 2] + [2] * (7 if pad else 0)
    assert out["attention_mask"][0] == [1] * 9 + [0] * (7 if pad else 0)
    assert out["null_index"] == [8] and out["start_positions"] == out["end_positions"] == [8]
    assert out["offset_mapping"][0][8] is None  # never an answer token


# --- post-processing ----------------------------------------------------------------------------


def run_offsets(count):
    """``count`` one-character context tokens after a [CLS]-like position."""
    return [None] + [(i, i + 1) for i in range(count)]


def test_default_answers_are_at_most_30_tokens_and_20_best_positions():
    flat = np.zeros(41)
    candidates = span_candidates(flat, flat, run_offsets(40), n_best=40)
    assert len(candidates) == sum(1 for s in range(40) for e in range(s, min(s + 30, 40)))
    assert len(span_candidates(flat, flat, run_offsets(25))) == 20 * 21 // 2  # starts/ends 0..19
    # the 30-token span wins by default; 31 tokens is too long
    starts, ends = np.full(41, -5.0), np.full(41, -5.0)
    starts[1], ends[31], ends[30] = 5.0, 5.0, 4.0
    context = "x" * 40
    examples = [{"id": "q", "context": context}]
    feats = {"example_id": ["q"], "offset_mapping": [run_offsets(40)], "null_index": [0]}
    answer = postprocess_qa_predictions(examples, feats, [starts], [ends])[0]["q"]
    assert len(answer) == 30
    ends[30], ends[29] = -5.0, 3.0
    assert postprocess_qa_predictions(examples, feats, [starts], [ends])[0]["q"] == "x" * 29


def test_ties_among_start_positions_keep_text_order():
    alternating = -np.tile([1.0, 0.0], 21)  # ties at every other position, 42 positions
    offsets = [(i, i + 1) for i in range(42)]
    candidates = span_candidates(alternating, alternating, offsets, n_best=5, max_answer_length=1)
    assert sorted({c[1] for c in candidates}) == [1, 3, 5, 7, 9]


def test_equal_scores_go_to_the_first_start_by_start_score():
    # "Paris is" (4-5) and "capital of" (7-8) both score 3; the start ranked first wins, as the
    # reference loop over starts then ends does. Spans across them are longer than 3 tokens.
    starts, ends = [logits(p4=2.0, p7=1.0)], [logits(p5=1.0, p8=2.0)]
    predictions, _ = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, max_answer_length=3
    )
    assert predictions == {"q": "Paris is"}


def test_one_context_token_is_a_candidate():
    assert span_candidates(np.array([0.0, 1.0]), np.array([0.0, 2.0]), [None, (3, 7)]) == [
        (3.0, 3, 7)
    ]


def test_defaults_answer_in_v1_and_use_threshold_zero_in_v2():
    starts = [logits(p0=4.5, p9=3.0)]
    ends = [logits(p0=2.0, p10=3.0)]  # null 6.5, span 6: odds 0.5
    assert postprocess_qa_predictions(EXAMPLES, features(), starts, ends)[0] == {"q": "France."}
    v2, odds = postprocess_qa_predictions(EXAMPLES, features(), starts, ends, version_2=True)
    assert odds == {"q": 0.5} and v2 == {"q": ""}


def test_null_odds_are_computed_in_double_precision_from_float32_logits():
    starts = [logits(p0=0.1, p9=0.7).astype(np.float32)]
    ends = [logits(p0=0.2, p10=0.3).astype(np.float32)]
    _, odds = postprocess_qa_predictions(EXAMPLES, features(), starts, ends, version_2=True)
    s, e = starts[0].astype(np.float64), ends[0].astype(np.float64)
    assert odds["q"] == (s[0] + e[0]) - (s[9] + e[10])


def test_an_example_without_a_feature_before_others():
    examples = [{"id": "missing", "context": CONTEXT}, *EXAMPLES]
    predictions, _ = postprocess_qa_predictions(
        examples, features(), [logits(p4=3.0)], [logits(p4=3.0)]
    )
    assert predictions == {"q": "Paris"}


def test_prediction_files_are_written_into_a_new_nested_folder_again_and_again(tmp_path):
    folder = tmp_path / "val" / "step1"
    for _ in range(2):
        written = write_squad_predictions(folder, {"q": "Zürich"}, {"q": 0.25})
    assert json.loads(written[0].read_text(encoding="utf-8")) == {"q": "Zürich"}
    assert json.loads(written[1].read_text(encoding="utf-8")) == {"q": 0.25}


# --- scoring ------------------------------------------------------------------------------------


def brute_force_best(scores, na_probs, has_answer, predictions):
    """The best thresholded score over every threshold (the smallest threshold on ties)."""
    thresholds = [0.0, *sorted(set(na_probs.values()))]
    best = None
    for t in thresholds:
        total = 0.0
        for qid, score in scores.items():
            answered = na_probs[qid] <= t
            if not has_answer[qid]:
                total += 0.0 if answered and predictions[qid] else 1.0
            else:
                total += score if answered else 0.0
        if best is None or total > best[0]:
            best = (total, t)
    return 100.0 * best[0] / len(scores), best[1]


def test_best_threshold_is_the_brute_force_best():
    rng = random.Random(0)
    for _ in range(20):
        qids = [f"q{i}" for i in range(8)]
        has_answer = {q: rng.random() < 0.5 for q in qids}
        predictions = {q: rng.choice(["", "x"]) if not has_answer[q] else "x" for q in qids}
        scores = {q: rng.choice([0.0, 0.5, 1.0]) if has_answer[q] else 0.0 for q in qids}
        na_probs = {q: rng.random() for q in qids}
        na_probs["not-scored"] = -1.0  # an id without a score comes first and is skipped
        want = brute_force_best(scores, na_probs, has_answer, predictions)
        got = best_threshold(predictions, scores, na_probs, {**has_answer, "not-scored": True})
        assert got == pytest.approx(want)


V2 = [
    {"id": "a", "answers": {"text": ["Paris"]}},
    {"id": "b", "answers": {"text": []}},
]


def test_v2_defaults_thresholds_and_missing_probabilities():
    predictions = {"a": "Paris", "b": "x"}
    # no na_probs: every question is answered, whatever the threshold
    assert evaluate_v2(V2, predictions, na_prob_thresh=0.5)["exact"] == 50.0
    # default threshold 1.0: a na_prob of 1.5 predicts "no answer"
    assert evaluate_v2(V2, predictions, {"a": 1.5, "b": 1.5})["exact"] == 50.0
    assert evaluate_v2(V2, predictions, {"a": 0.9, "b": 1.5})["exact"] == 100.0
    with pytest.raises(DataError, match="the no-answer probabilities miss 1 of 2"):
        evaluate_v2(V2, predictions, {"a": 0.1})
    with pytest.raises(DataError, match="the predictions miss 1 of 2"):
        evaluate_v2(V2, {"a": "Paris"})
    scores = evaluate_v2(V2, {"a": "Paris"}, missing_as_wrong=True)
    assert scores["exact"] == 0.0 + 50.0  # a right, b missing: wrong
    with pytest.raises(DataError, match="^data holds no questions"):
        evaluate_v2([], predictions)


def test_v1_rules_missing_answers_and_empty_predictions():
    data = [
        {"id": "m", "answers": {"text": ["Lyon"]}},
        {"id": "a", "answers": {"text": ["the"]}},
        {"id": "b", "answers": {"text": ["Paris"]}},
    ]
    with pytest.raises(DataError, match="the predictions miss 1 of 3"):
        evaluate_v1(data, {"a": "", "b": "Paris"})
    scores = evaluate_v1(data, {"a": "", "b": "Paris"}, missing_as_wrong=True)
    # v1.1: "" against "the" (nothing left once normalised) shares no token: F1 0, EM 1
    assert scores == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(100 / 3)}
    with pytest.raises(DataError, match="question 'n' has no gold answer"):
        evaluate_v1([{"id": "n", "answers": {"text": []}}], {"n": ""})
    with pytest.raises(DataError, match="^data holds no questions"):
        evaluate_v1([], {})


# --- the span head ------------------------------------------------------------------------------


def test_question_scores_follow_each_versions_empty_answer_rule():
    examples = [
        {"id": "skipped", "answers": {"text": ["x"]}},
        {"id": "e", "answers": {"text": ["the"]}},
    ]
    assert question_scores(examples, {"e": ""}, version_2=True) == {"e": (1, 1.0)}
    assert question_scores(examples, {"e": ""}, version_2=False) == {"e": (1, 0.0)}


@pytest.mark.parametrize("version_2", [False, True])
def test_prediction_without_labels_answers_with_the_given_threshold(version_2):
    examples = [example("a", "Denver Broncos"), example("b", None)]
    data = FakeData(examples, version_2).data
    data.null_threshold = 1.0
    # a: span 20 vs null 0 (odds -20); b: span 10 vs null 10.5 (odds 0.5, under the threshold)
    logits_of = crafted_logits([(4, 5, 10.0), (7, 8, 5.0)], [0.0, 5.25], branches=1)[0]
    feature_logits = {
        f: (logits_of[f, :-1, 0].numpy(), logits_of[f, :-1, 1].numpy()) for f in (0, 1)
    }
    scores = score_spans(data, feature_logits, labelled=False)
    assert scores.metrics == {}
    assert scores.predictions == {"a": "Denver Broncos", "b": "Super Bowl"}
    if version_2:
        assert scores.null_odds == pytest.approx({"a": -20.0, "b": 0.5})
        data.null_threshold = 0.25
        assert score_spans(data, feature_logits, labelled=False).predictions["b"] == ""
    else:
        assert scores.null_odds is None


@pytest.mark.parametrize("answers", ["known", "unknown"])
def test_predict_records_carry_the_gold_the_split_has_and_each_branchs_answer(answers):
    """Predict scores nothing, but a split with answers (SQuAD's dev set, predict's default)
    gives each record its gold and verdict; a split with none (a test set) gives null."""
    span_head = head()
    known = answers == "known"
    examples = [example("a", "Denver Broncos" if known else None), example("b", None)]
    outputs = crafted_logits([(4, 5, 10.0), (7, 8, 10.0)], [0.0, 0.0])
    outputs[1, 0, 4, 0] = outputs[1, 0, 5, 1] = 0.0  # the image branch answers "a" differently
    outputs[1, 0, 7, 0] = outputs[1, 0, 8, 1] = 10.0
    metrics = span_head.make_metrics(["fused", "text", "image"])
    batch = {
        "attention_mask": torch.cat([torch.ones(2, 12), torch.zeros(2, 1)], 1),
        "feature_index": torch.arange(2),
    }
    span_head.update_metrics(metrics, HeadOutput(outputs), None, torch.tensor([2.0, -2.0]), batch)
    data = FakeData(examples, True)
    data.span_evaluation = lambda stage, split: data.data  # predict asks for its own split
    result = span_head.compute_metrics(metrics, EvaluationContext("predict", "test", data))
    assert result.metrics == {}
    first, second = result.records
    if known:  # "a" answered right; "b" (no answer) answered with a span: wrong
        assert (first["gold"], first["correct"], first["exact"], first["f1"]) == (
            ["Denver Broncos"],
            True,
            1,
            1.0,
        )
        assert (second["gold"], second["correct"], second["exact"]) == ([], False, 0)
    else:
        assert first["gold"] is None and first["correct"] is None and "exact" not in first
    assert first["prediction"] == "Denver Broncos" and first["null_odds"] < 0
    assert first["branches"] == {"text": "Denver Broncos", "image": "Super Bowl"}
    assert [r["id"] for r in result.records] == ["a", "b"]
    assert result.files["predictions.json"]["a"] == "Denver Broncos"


def test_span_heads_keep_one_prior_entry_and_apply_their_dropout():
    from macsc.method.heads import build_task_head
    from macsc.method.network import BranchRepresentations
    from macsc.task import TaskSpec

    span_head = build_task_head(TaskSpec("span", 2, ["exact"]), 2, 8, dropout=0.5)
    assert span_head.prior_size == 1
    text = torch.randn(3, 5, 8)
    representations = BranchRepresentations(
        text,
        torch.ones(3, 5),
        (text + 1)[None],
        torch.randn(1, 3, 2, 8),
        torch.ones(1, 3, 2, dtype=torch.bool),
        None,
        "first",
    )
    span_head.train()
    torch.manual_seed(0)
    trained = span_head(representations, {}).outputs
    span_head.eval()
    evaluated = span_head(representations, {}).outputs
    assert not torch.allclose(trained, evaluated)


def test_identity_keys_live_on_the_batchs_device():
    keys = head().positive_keys({"input_ids": torch.zeros(3, 4, dtype=torch.long, device="meta")})
    assert keys.device.type == "meta" and keys.shape == (3,)
