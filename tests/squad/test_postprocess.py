"""Post-processing on crafted logits (macsc.squad.features), no tokenizer or model."""

import json

import numpy as np
import pytest

from macsc.squad.metric import evaluate_v2
from macsc.squad.postprocess import (
    apply_null_threshold,
    postprocess_qa_predictions,
    span_candidates,
    write_squad_predictions,
)

CONTEXT = "Paris is the capital of France."
# Tokens: [CLS] what ? [SEP] Paris is the capital of France . [SEP]
OFFSETS = [
    None,
    None,
    None,
    None,
    (0, 5),
    (6, 8),
    (9, 12),
    (13, 20),
    (21, 23),
    (24, 30),
    (30, 31),
    None,
]
EXAMPLES = [{"id": "q", "context": CONTEXT}]


def logits(**peaks):
    """A (12,) row of -5 with ``{position: value}`` peaks given as ``p<position>=value``."""
    row = np.full(len(OFFSETS), -5.0)
    for name, value in peaks.items():
        row[int(name[1:])] = value
    return row


def features(*offsets, example_ids=None, null_index=None):
    offsets = offsets or (OFFSETS,)
    return {
        "example_id": example_ids or ["q"] * len(offsets),
        "offset_mapping": list(offsets),
        "null_index": null_index or [0] * len(offsets),
    }


def test_best_valid_span_is_mapped_back_to_the_context():
    # The highest start is a question token (1): never an answer. The best pair "France ." wins.
    starts = [logits(p1=9.0, p9=4.0, p4=3.0)]
    ends = [logits(p2=9.0, p10=4.0, p5=1.0)]
    predictions, null_odds = postprocess_qa_predictions(EXAMPLES, features(), starts, ends)
    assert predictions == {"q": "France."}
    assert null_odds["q"] == pytest.approx((-5 - 5) - 8.0)


def test_end_before_start_and_too_long_spans_are_skipped():
    starts = [logits(p9=6.0, p4=0.5)]
    ends = [logits(p5=6.0, p10=1.0)]  # (9, 5) scores 12 but is reversed
    predictions, _ = postprocess_qa_predictions(EXAMPLES, features(), starts, ends)
    assert predictions["q"] == "France."  # 6 + 1 beats "Paris is" (0.5 + 6)
    starts = [logits(p4=6.0)]
    ends = [logits(p10=6.0, p5=1.0)]  # "Paris ... ." is 7 tokens
    predictions, _ = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, max_answer_length=3
    )
    assert predictions["q"] == "Paris is"


@pytest.mark.parametrize(("limit", "answer"), [(3, "Paris is the"), (2, "Paris is")])
def test_an_answer_exactly_max_answer_length_tokens_long_is_allowed(limit, answer):
    # As Hugging Face's utils_qa.py: a span is skipped only when end - start + 1 > the limit.
    starts = [logits(p4=6.0)]
    ends = [logits(p6=6.0, p5=1.0)]  # tokens 4..6 "Paris is the" (3 tokens) or 4..5 (2)
    predictions, _ = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, max_answer_length=limit
    )
    assert predictions["q"] == answer


def test_n_best_limits_the_candidates():
    starts = [logits(p9=6.0, p4=5.0)]
    ends = [logits(p5=6.0, p10=1.0)]
    # With one start (France) and one end (is) the only pair is reversed: no answer at all.
    predictions, null_odds = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, n_best=1
    )
    assert predictions == {"q": ""} and null_odds == {"q": float("inf")}
    assert postprocess_qa_predictions(EXAMPLES, features(), starts, ends, n_best=2)[0] == {
        "q": "Paris is"
    }


def test_span_candidates_ignore_batch_padding():
    start = np.concatenate([logits(p7=3.0), [50.0, 50.0]])
    end = np.concatenate([logits(p7=3.0), [50.0, 50.0]])
    best = max(span_candidates(start, end, OFFSETS))
    assert best == (6.0, 13, 20)


def test_windows_of_one_example_compete_and_the_null_score_is_the_smallest():
    # Two windows: the second one sees only "of France." (tokens 8..10 of the full layout).
    second = [None, None, None, None, None, None, None, None, (21, 23), (24, 30), (30, 31), None]
    starts = [logits(p0=2.0, p4=1.0), logits(p0=-1.0, p9=4.0)]
    ends = [logits(p0=2.0, p5=1.0), logits(p0=-1.0, p10=4.0)]
    feats = features(OFFSETS, second)
    predictions, null_odds = postprocess_qa_predictions(
        EXAMPLES, feats, starts, ends, version_2=True
    )
    # Null = min(2 + 2, -1 - 1) = -2; best span "France." = 8: odds -10 < 0, so answer.
    assert predictions == {"q": "France."}
    assert null_odds["q"] == pytest.approx(-10.0)


def test_version_2_null_threshold():
    starts = [logits(p0=5.0, p9=3.0)]
    ends = [logits(p0=5.0, p10=3.0)]
    # Null 10, best span 6: odds 4.
    result = postprocess_qa_predictions(EXAMPLES, features(), starts, ends, version_2=True)
    assert result == ({"q": ""}, {"q": pytest.approx(4.0)})
    kept, _ = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, version_2=True, null_threshold=4.5
    )
    assert kept == {"q": "France."}
    v1, _ = postprocess_qa_predictions(EXAMPLES, features(), starts, ends, version_2=False)
    assert v1 == {"q": "France."}


def test_null_odds_exactly_at_the_threshold_keep_the_span():
    # Hugging Face's utils_qa.py and the official v2.0 script both answer "" only when the
    # odds exceed the threshold (score_diff > threshold, na_prob > na_prob_thresh).
    starts = [logits(p0=5.0, p9=3.0)]
    ends = [logits(p0=5.0, p10=3.0)]  # null 10, best span 6: odds exactly 4
    at, odds = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, version_2=True, null_threshold=4.0
    )
    assert odds == {"q": 4.0} and at == {"q": "France."}
    below, _ = postprocess_qa_predictions(
        EXAMPLES, features(), starts, ends, version_2=True, null_threshold=3.75
    )
    assert below == {"q": ""}
    assert apply_null_threshold({"q": "France."}, odds, 4.0) == {"q": "France."}
    assert apply_null_threshold({"q": "France."}, odds, 3.75) == {"q": ""}


def test_a_na_prob_exactly_at_the_threshold_counts_as_answered():
    examples = [
        {"id": "has", "context": CONTEXT, "answers": {"text": ["France"], "answer_start": [24]}}
    ]
    predictions = {"has": "France"}
    at = evaluate_v2(examples, predictions, {"has": 0.5}, na_prob_thresh=0.5)
    assert at["exact"] == 100.0
    above = evaluate_v2(examples, predictions, {"has": 0.625}, na_prob_thresh=0.5)
    assert above["exact"] == 0.0


def test_several_examples_in_any_feature_order_and_partial_passes():
    examples = [
        {"id": "a", "context": CONTEXT},
        {"id": "b", "context": CONTEXT},
        {"id": "c", "context": CONTEXT},
    ]
    feats = features(OFFSETS, OFFSETS, example_ids=["b", "a"])
    starts = [logits(p4=3.0), logits(p7=3.0)]
    ends = [logits(p4=3.0), logits(p7=3.0)]
    predictions, null_odds = postprocess_qa_predictions(examples, feats, starts, ends)
    assert predictions == {"a": "capital", "b": "Paris"}  # "c" had no feature in this pass
    assert set(null_odds) == {"a", "b"}
    with pytest.raises(ValueError, match="2 features but 1 start"):
        postprocess_qa_predictions(examples, feats, starts[:1], ends)


def test_best_threshold_reporting_and_written_files(tmp_path):
    examples = [
        {"id": "has", "context": CONTEXT, "answers": {"text": ["France"], "answer_start": [24]}},
        {"id": "none", "context": CONTEXT, "answers": {"text": [], "answer_start": []}},
    ]
    feats = features(OFFSETS, OFFSETS, example_ids=["has", "none"])
    # "has": null 2, span "France" 8 (odds -6). "none": null 4, span "Paris" 6 (odds -2).
    starts = [logits(p0=1.0, p9=4.0), logits(p0=2.0, p4=3.0)]
    ends = [logits(p0=1.0, p9=4.0), logits(p0=2.0, p4=3.0)]
    spans, null_odds = postprocess_qa_predictions(
        examples, feats, starts, ends, version_2=True, null_threshold=float("inf")
    )
    assert spans == {"has": "France", "none": "Paris"}
    scores = evaluate_v2(examples, spans, null_odds)
    assert scores["best_exact"] == 100.0 and scores["best_exact_thresh"] == pytest.approx(-6.0)
    at_best = apply_null_threshold(spans, null_odds, scores["best_exact_thresh"])
    assert at_best == {"has": "France", "none": ""}
    assert evaluate_v2(examples, at_best)["exact"] == 100.0

    written = write_squad_predictions(tmp_path / "val", at_best, null_odds)
    assert [p.name for p in written] == ["predictions.json", "null_odds.json"]
    assert json.loads(written[0].read_text()) == at_best
    assert json.loads(written[1].read_text()) == pytest.approx(null_odds)
    assert [p.name for p in write_squad_predictions(tmp_path / "v1", at_best)] == [
        "predictions.json"
    ]
