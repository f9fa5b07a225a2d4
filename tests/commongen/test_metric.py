"""CommonGen scores (COCO caption toolkit + concept coverage) against values worked out by hand,
with the official spaCy tokens (the default) and the PTB tokenizer (``tokenizer="ptb"``), and
``macsc commongen-eval`` end to end. Java starts METEOR once per process (~10 s); the scoring
runs are module fixtures shared by the tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from macsc.cli import main
from macsc.commongen.metric import (
    GenerationEvaluationData,
    concept_coverage,
    english_pipeline,
    inflection_coverage,
    score_commongen,
    spice_available,
)
from macsc.errors import ConfigError, DataError

# Two concept sets with disjoint vocabularies (so every n-gram's CIDEr document frequency is
# 0 or 1, and all its idf weights are equal): the first predicted word for word, the second
# sharing "a cat sleeps" with its reference. PTB tokenisation lowercases and drops the period;
# spaCy's keeps both: "The" is not "the", and "." is a token.
CONCEPTS = [["dog", "run", "park"], ["cat", "sleep", "sofa"]]
REFERENCES = [["The dog runs in the park."], ["a cat sleeps on my red sofa"]]
PREDICTIONS = ["the dog runs in the park", "A cat sleeps near an old chair."]


@pytest.fixture(scope="module")
def scores() -> dict[str, float]:
    """The default: the official CommonGen scripts' spaCy tokens."""
    return score_commongen(CONCEPTS, PREDICTIONS, REFERENCES)


@pytest.fixture(scope="module")
def ptb_scores() -> dict[str, float]:
    return score_commongen(CONCEPTS, PREDICTIONS, REFERENCES, tokenizer="ptb")


@pytest.fixture(scope="module")
def evaluation_data() -> GenerationEvaluationData:
    """The two sets, and a third that gets no prediction (a partial evaluation pass)."""
    return GenerationEvaluationData(
        ["s1", "s2", "s3"], [*CONCEPTS, ["sun", "rise"]], [*REFERENCES, ["The sun rises."]]
    )


@pytest.fixture(scope="module")
def perfect(evaluation_data) -> dict[str, float]:
    """Sets 1 and 2 predicted as their references, through the data module's evaluation data:
    only the predicted sets are scored."""
    return evaluation_data.score({1: REFERENCES[1][0], 0: REFERENCES[0][0]})


def test_the_keys_are_the_leaderboard_metrics_and_spice_only_when_installed(scores, ptb_scores):
    expected = {"bleu_4", "meteor", "rouge_l", "cider", "coverage"}
    assert set(scores) == expected | ({"spice"} if spice_available() else set())
    assert set(ptb_scores) == set(scores)


def test_spacy_tokens_keep_case_and_punctuation():
    # the official script's tokens: spaCy's English rules, joined by spaces; spaces and
    # newlines are not tokens
    assert english_pipeline().tokens("A dog,  running!\nDon't stop.") == (
        "A dog , running ! Do n't stop ."
    )


def test_bleu_4_on_spacy_tokens_counts_case_and_punctuation(scores):
    # set 1: "the dog runs in the park" against "The dog runs in the park ." (7 tokens): the
    # second "the" matches, the first does not ("The"): 1-grams 5 of 6, 2-grams 4 of 5 (no
    # "the dog"), 3-grams 3 of 4, 4-grams 2 of 3. Set 2: "A cat sleeps near an old chair ."
    # (8 tokens; "A" is not "a") shares "cat sleeps": 2 of 8, 1 of 7, 0 of 6, 0 of 5.
    # Hypothesis and reference lengths 14 and 14: no brevity penalty.
    precisions = [7 / 14, 5 / 12, 3 / 10, 2 / 8]
    expected = math.exp(sum(math.log(p) for p in precisions) / 4)
    assert scores["bleu_4"] == pytest.approx(expected, rel=1e-6)


def lcs_f(lcs: int, hypothesis: int, reference: int, beta: float = 1.2) -> float:
    p, r = lcs / hypothesis, lcs / reference
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def test_rouge_l_on_spacy_tokens_counts_case_and_punctuation(scores):
    # set 1: LCS "dog runs in the park" = 5, of 6 and 7 tokens; set 2: "cat sleeps", of 8 and 7
    assert scores["rouge_l"] == pytest.approx((lcs_f(5, 6, 7) + lcs_f(2, 8, 7)) / 2, rel=1e-9)


def test_cider_d_on_spacy_tokens(scores):
    # As the PTB case below (every idf log 2: a cosine of count vectors per n-gram order), now
    # with unequal lengths: CIDEr-D multiplies by exp(-delta^2 / (2 * 6^2)), delta the
    # difference in bigram counts, -1 for set 1 and +1 for set 2. Set 1: the hypothesis has
    # "the" twice (clipped to 1 against the reference's one "the"), so its unigram norm is
    # sqrt(4 + 4); shared 5 of (8, 7) squared norms, then 4 of (5, 6) bigrams, 3 of (4, 5)
    # trigrams, 2 of (3, 4) 4-grams. Set 2: 2 of (8, 7) unigrams, 1 of (7, 6) bigrams.
    set_1 = (
        5 / math.sqrt(8 * 7) + 4 / math.sqrt(5 * 6) + 3 / math.sqrt(4 * 5) + 2 / math.sqrt(3 * 4)
    ) / 4
    set_2 = (2 / math.sqrt(8 * 7) + 1 / math.sqrt(7 * 6)) / 4
    penalty = math.exp(-1 / (2 * 6**2))
    assert scores["cider"] == pytest.approx(10 * penalty * (set_1 + set_2) / 2, rel=1e-6)


def test_bleu_4_sums_clipped_ngram_counts_over_the_corpus(ptb_scores):
    # matches / hypothesis n-grams, set 1 + set 2: 1-grams 6+3 of 6+7, 2-grams 5+2 of 5+6,
    # 3-grams 4+1 of 4+5, 4-grams 3+0 of 3+4; hypothesis and reference lengths equal: no
    # brevity penalty
    precisions = [9 / 13, 7 / 11, 5 / 9, 3 / 7]
    expected = math.exp(sum(math.log(p) for p in precisions) / 4)
    assert ptb_scores["bleu_4"] == pytest.approx(expected, rel=1e-6)


def test_rouge_l_is_the_mean_lcs_f_measure_of_the_sets(ptb_scores):
    # set 1 identical (1.0); set 2: LCS "a cat sleeps" = 3 of 7 and 7 tokens, P = R = 3/7
    assert ptb_scores["rouge_l"] == pytest.approx((1 + 3 / 7) / 2, rel=1e-9)


def test_rouge_l_weights_recall_by_beta_1_2():
    # LCS of "a dog runs in park" (5 tokens) and "the dog quickly runs in the big park" (8):
    # dog runs in park = 4, so P = 4/5, R = 4/8, F = (1 + b^2) P R / (R + b^2 P), b = 1.2
    p, r, b2 = 4 / 5, 4 / 8, 1.2**2
    result = score_commongen(
        [["dog", "run", "park"]], ["a dog runs in park"], [["the dog quickly runs in the big park"]]
    )
    assert result["rouge_l"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-9)


def test_cider_d_is_ten_times_the_mean_clipped_tf_idf_cosine(ptb_scores):
    # Every idf is log(2) (two sets; each n-gram in at most one set's references), so each
    # n-gram order scores the cosine of the count vectors; same lengths, no length penalty.
    # Set 1 identical: 1 for n = 1..4. Set 2 shares 3 of 7 unigrams, 2 of 6 bigrams, 1 of 5
    # trigrams and no 4-gram; all counts 1, so cosine = shared / (sqrt(a) sqrt(b)).
    set_2 = (3 / 7 + 2 / 6 + 1 / 5 + 0) / 4
    assert ptb_scores["cider"] == pytest.approx(10 * (1 + set_2) / 2, rel=1e-6)


def test_meteor_lies_between_a_miss_and_a_perfect_match(scores, ptb_scores, perfect):
    assert perfect["meteor"] == pytest.approx(1.0)
    assert 0.1 < scores["meteor"] < 0.95
    assert 0.1 < ptb_scores["meteor"] < 0.95


def test_a_prediction_equal_to_its_reference_scores_full_marks(perfect):
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] == pytest.approx(10.0, rel=1e-6)  # CIDEr-D's x10 scale


def test_the_evaluation_pass_scores_with_spacy_tokens_too():
    # what the generation head logs during validation: "a" is not "A", and "." is a token
    data = GenerationEvaluationData(["s1"], [["dog", "run", "park"]], [["A dog runs in the park."]])
    assert data.score({0: "a dog runs in the park"})["rouge_l"] == pytest.approx(lcs_f(5, 6, 7))


@pytest.mark.parametrize("tokenizer", ["spacy", "ptb"])
def test_coverage_averages_the_sets_share_of_lemmatised_concepts(tokenizer, scores, ptb_scores):
    # set 1: dog, runs, park -> 3/3; set 2: cat, sleeps -> 2/3 (no sofa in "near an old chair")
    result = scores if tokenizer == "spacy" else ptb_scores
    assert result["coverage"] == pytest.approx((1 + 2 / 3) / 2)


def test_coverage_needs_each_concept_itself_among_the_lemmas():
    # "barked" has the lemma bark; "dog" is a lemma, but the concept "dogs" is not (the
    # official script does not lemmatise concepts; lemminflect coverage does)
    result = score_commongen([["dogs", "bark"]], ["One dog barked."], [["Dogs bark."]])
    assert result["coverage"] == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    ("concepts", "sentence", "expected"),
    [
        (["dog", "run", "park", "frisbee"], "the dogs were running in a park", 3 / 4),
        (["child", "mouse", "run"], "two children ran after the mice", 1.0),
        (["dog", "bark"], "Dogs barked.", 1.0),  # a capitalised word has a lower-case lemma
        (["dogs"], "one dog", 0.0),  # the concept itself must equal a lemma
        (["dog", "dog", "cat"], "a dog", 1 / 2),  # distinct concepts, as the official set
        (["ice cream", "eat"], "we eat ice", 1 / 2),  # every word of a phrase is needed
        (["ice cream", "eat"], "we ate ice cream", 1.0),
        (["cat"], "a category", 0.0),  # no substring matches
    ],
)
def test_coverage_is_an_exact_match_with_a_spacy_lemma(concepts, sentence, expected):
    assert concept_coverage(concepts, english_pipeline().lemmas(sentence)) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    ("concepts", "sentence", "expected"),
    [
        (["dog", "run", "park", "frisbee"], "the dogs were running in a park", 3 / 4),
        (["child", "mouse", "run"], "two children ran after the mice", 1.0),
        (["leaf", "fall"], "leaves fell", 1.0),
        (["Dog"], "a DOG", 1.0),
        (["dogs"], "one dog", 1.0),  # an inflected concept is lemmatised too
        (["frisbee"], "frisbees", 1.0),  # a word lemminflect does not know: its rules
        (["ice cream", "eat"], "we eat ice", 1 / 2),  # every word of a phrase is needed
        (["cat"], "a category", 0.0),  # no substring matches
    ],
)
def test_ptb_coverage_matches_inflections(concepts, sentence, expected):
    assert inflection_coverage(concepts, sentence.split()) == pytest.approx(expected)


def test_evaluation_records_are_the_shared_predictions_format(evaluation_data):
    assert evaluation_data.records({2: "Sunrise.", 0: "A dog."}) == [
        {
            "id": "s1",
            "concepts": ["dog", "run", "park"],
            "gold": ["The dog runs in the park."],
            "prediction": "A dog.",
            "correct": None,
        },
        {
            "id": "s3",
            "concepts": ["sun", "rise"],
            "gold": ["The sun rises."],
            "prediction": "Sunrise.",
            "correct": None,
        },
    ]


def test_a_set_without_references_cannot_be_scored():
    with pytest.raises(DataError, match="'dog#run' has no reference"):
        score_commongen([["run", "dog"]], ["A dog runs."], [[]])


def test_a_missing_java_is_a_clear_error(monkeypatch):
    # the PTB tokenizer starts Java on every call
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError, match="no 'java' command was found"):
        score_commongen([["dog"]], ["A dog."], [["A dog runs."]], tokenizer="ptb")


def test_a_missing_java_leaves_one_line_and_no_traceback(tmp_path):
    # with spaCy's tokens only METEOR runs Java, and it starts first; a fresh process, since
    # this one's METEOR is already running
    references = write_lines(tmp_path / "refs.jsonl", [{"concepts": ["dog"], "target": "A dog."}])
    predictions = write_lines(
        tmp_path / "pred.jsonl", [{"concepts": ["dog"], "prediction": "A dog."}]
    )
    command = "import sys; from macsc.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", command, "commongen-eval", references, predictions],
        env={**os.environ, "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    assert "no 'java' command was found" in run.stderr.strip().splitlines()[-1]
    assert "Traceback" not in run.stderr  # nothing half built is left to fail at exit


# --- the command -----------------------------------------------------------------------------


def write_lines(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture
def reference_file(tmp_path) -> str:
    """Two concept sets: one given as two `target` lines (concepts in two orders), one as a
    `references` list."""
    return write_lines(
        tmp_path / "refs.jsonl",
        [
            {"concepts": ["dog", "frisbee", "catch"], "target": "A dog catches a frisbee."},
            {"concepts": ["catch", "dog", "frisbee"], "target": "The puppy leaps to catch it."},
            {
                "concepts": ["kid", "ball", "kick"],
                "references": ["Kids kick a ball.", "A boy kicks the red ball hard."],
            },
        ],
    )


def test_command_groups_references_per_concept_set_and_prints_json_last(
    reference_file, tmp_path, capfd
):
    # each prediction is one of its set's references (not the first): with the references
    # grouped, BLEU-4, ROUGE-L and METEOR are all 1
    predictions = write_lines(
        tmp_path / "pred.jsonl",
        [
            {"concepts": ["kid", "kick", "ball"], "prediction": "A boy kicks the red ball hard."},
            {"concepts": ["frisbee", "dog", "catch"], "prediction": "The puppy leaps to catch it."},
        ],
    )
    assert main(["commongen-eval", reference_file, predictions]) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"bleu_4", "meteor", "rouge_l", "cider", "coverage"}
    assert result["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert result["rouge_l"] == pytest.approx(1.0)
    assert result["meteor"] == pytest.approx(1.0)
    # "The puppy leaps to catch it." has catch only (1/3); the kid sentence has kick and ball,
    # and "boy" is not "kid" (2/3)
    assert result["coverage"] == pytest.approx((1 / 3 + 2 / 3) / 2)


@pytest.mark.parametrize(
    ("option", "tokenizer", "lemmatizer", "bleu_4", "rouge_l"),
    [
        # spaCy: "The" is not "the", "." is a token. 1-grams 5 of 6, 2-grams 4 of 5, 3-grams
        # 3 of 4, 4-grams 2 of 3; 6 tokens against 7: brevity penalty exp(1 - 7/6)
        (
            [],
            "spacy",
            "spacy-lookups-data|en_core_web_sm",
            (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25 * math.exp(1 - 7 / 6),
            lcs_f(5, 6, 7),
        ),
        # PTB: lower case, no period: the same 6 tokens
        (["--tokenizer", "ptb"], "ptb", "lemminflect", 1.0, 1.0),
    ],
)
def test_command_names_the_tokenizer_and_lemmatizer_it_used(
    option, tokenizer, lemmatizer, bleu_4, rouge_l, tmp_path, capfd
):
    references = write_lines(
        tmp_path / "refs.jsonl",
        [{"concepts": ["dog", "run", "park"], "target": "The dog runs in the park."}],
    )
    predictions = write_lines(
        tmp_path / "pred.jsonl",
        [{"concepts": ["park", "dog", "run"], "prediction": "the dog runs in the park"}],
    )
    assert main(["commongen-eval", references, predictions, *option]) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert result["tokenizer"].startswith(tokenizer)
    assert any(name in result["lemmatizer"] for name in lemmatizer.split("|"))
    assert result["bleu_4"] == pytest.approx(bleu_4, rel=1e-6)
    assert result["rouge_l"] == pytest.approx(rouge_l, rel=1e-9)
    assert result["coverage"] == pytest.approx(1.0)


def test_command_help_offers_the_tokenizer_with_spacy_the_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["commongen-eval", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--tokenizer {spacy,ptb}" in text
    assert "spacy (default)" in text and "ptb: a departure" in text


def run_error(args, capsys) -> str:
    assert main(["commongen-eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("macsc: error: ") and "\n" not in err
    return err


def test_command_rejects_a_prediction_for_an_unknown_concept_set(reference_file, tmp_path, capsys):
    predictions = write_lines(
        tmp_path / "pred.jsonl",
        [
            {"concepts": ["dog", "frisbee", "catch"], "prediction": "x"},
            {"concepts": ["kid", "ball", "kick"], "prediction": "y"},
            {"concepts": ["cat", "sofa"], "prediction": "z"},
        ],
    )
    err = run_error([reference_file, predictions], capsys)
    assert "line 3" in err and "'cat#sofa' is not in REFERENCES" in err


def test_command_names_how_many_predictions_are_missing_and_the_first(
    reference_file, tmp_path, capsys
):
    predictions = write_lines(
        tmp_path / "pred.jsonl", [{"concepts": ["kid", "ball", "kick"], "prediction": "y"}]
    )
    err = run_error([reference_file, predictions], capsys)
    assert "1 of the 2 concept sets" in err and "'dog#frisbee#catch'" in err


def test_command_names_the_file_and_line_of_bad_json(reference_file, tmp_path, capsys):
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text('{"concepts": ["kid"], "prediction": "y"}\n\n{"concepts": [\n')
    err = run_error([reference_file, str(predictions)], capsys)
    assert f"{predictions} line 3 is not valid JSON" in err


def test_command_notices_swapped_files(reference_file, tmp_path, capsys):
    predictions = write_lines(
        tmp_path / "pred.jsonl", [{"concepts": ["kid", "ball", "kick"], "prediction": "y"}]
    )
    assert "the order is: macsc commongen-eval REFERENCES PREDICTIONS" in run_error(
        [predictions, reference_file], capsys
    )


def test_command_says_to_pass_local_files_when_the_hub_is_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions = write_lines(
        tmp_path / "pred.jsonl", [{"concepts": ["kid", "ball", "kick"], "prediction": "y"}]
    )
    err = run_error(["allenai/common_gen:validation", predictions], capsys)
    assert "allenai/common_gen" in err and "pass local files" in err
