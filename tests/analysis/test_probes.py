"""Visual-reasoning probes (paper Table 7, SPEC 11): the loaders on files in the published
formats, the template filling, multi-piece candidates, and the three kinds of model -- a tiny
masked LM, a tiny open_clip text tower and a tiny MaCSC checkpoint -- each checked against an
independent computation (the Hugging Face model run on hand-written strings, open_clip's own
``encode_text``, the plain masked LM that a text-only MaCSC must equal)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from macsc.analysis.probe_data import (
    COLOUR_TEMPLATES,
    COLOURS,
    SHAPE_TEMPLATES,
    SHAPES,
    load_color_terms,
    load_memory_color,
    load_object_shape,
)
from macsc.analysis.probes import (
    Probe,
    ProbeExample,
    candidate_pieces,
    clip_scorer,
    clip_word_scores,
    fill_template,
    load_macsc,
    load_masked_lm,
    macsc_scorer,
    macsc_text_states,
    masked_lm_scorer,
    masked_lm_word_scores,
    mlm_head,
    probe_words,
    score_clip,
    score_masked_lm,
)
from macsc.cli import main
from macsc.errors import ConfigError, DataError
from tests.conftest import write_tiny_bert

MEMORY_COLOR_JSONL = [
    {"descriptor": "a", "item": "sunflower", "label": "yellow", "picture": "x.jpg"},
    {"descriptor": "", "item": "grass", "label": "green"},
    {"descriptor": "the inside of a", "item": "watermelon", "label": "red"},
    {"descriptor": "", "item": "stone", "label": "gray"},
]
# the published CSV copy: CRLF line ends, trailing spaces after some descriptors
MEMORY_COLOR_CSV = (
    b"Index,Descriptor,Item,Color\r\n1,a ,sunflower,yellow\r\n3,,grass,green\r\n"
    b"42,the inside of a,watermelon,red\r\n36,,stone,grey\r\n"
)
EXPECTED_MEMORY_COLOR = [
    ProbeExample("sunflower", "yellow", "a"),
    ProbeExample("grass", "green", ""),
    ProbeExample("watermelon", "red", "the inside of a"),
    ProbeExample("stone", "grey", ""),
]
SHAPE_ROWS = [
    {"sub": "clock", "obj": "circle", "alt": "heptagon", "count": 741},
    {"sub": "stop sign", "obj": "octagon", "alt": "ring"},
    {"sub": "field", "obj": "diamond", "alt": "semicircle"},
    {"sub": "table", "obj": "square", "alt": "polygon"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def shape_folder(tmp_path_factory) -> Path:
    """The ViComTe ``db/shape`` layout: ``test.jsonl`` and ``single/test.jsonl``."""
    root = tmp_path_factory.mktemp("shape")
    write_jsonl(root / "test.jsonl", SHAPE_ROWS)
    write_jsonl(root / "single" / "test.jsonl", SHAPE_ROWS[:1])
    return root


@pytest.fixture(scope="module")
def memory_color_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mc") / "memory_color_data.csv"
    path.write_bytes(MEMORY_COLOR_CSV)
    return path


# ------------------------------------------------------------------------------------ loaders
def test_memory_color_reads_json_lines_and_the_crlf_csv_alike(tmp_path, memory_color_csv):
    from_jsonl = load_memory_color(write_jsonl(tmp_path / "mc.jsonl", MEMORY_COLOR_JSONL))
    from_csv = load_memory_color(memory_color_csv)
    assert from_jsonl.examples == EXPECTED_MEMORY_COLOR == from_csv.examples
    assert list(from_csv.classes) == list(COLOURS) and len(COLOURS) == 11
    assert from_csv.classes["grey"] == ("grey",)  # "gray" is read as a label, never scored
    assert from_csv.templates == COLOUR_TEMPLATES and len(COLOUR_TEMPLATES) == 13
    assert from_csv.source == str(memory_color_csv)


def test_color_terms_reads_object_color_csv_without_descriptors(tmp_path):
    path = tmp_path / "color-concrete-objects.csv"
    path.write_bytes(b"Object,color\r\nash,grey\r\nbanana ,Yellow\r\n\r\nsea,blue\r\n")
    probe = load_color_terms(path)
    assert probe.examples == [
        ProbeExample("ash", "grey"),
        ProbeExample("banana", "yellow"),
        ProbeExample("sea", "blue"),
    ]
    assert probe.templates == COLOUR_TEMPLATES


def test_object_shape_splits_and_synonyms(shape_folder):
    probe = load_object_shape(shape_folder)
    assert [(e.item, e.label) for e in probe.examples] == [
        ("clock", "round"),
        ("stop sign", "octagon"),
        ("field", "rhombus"),
        ("table", "square"),
    ]
    assert list(probe.classes) == list(SHAPES) and len(SHAPES) == 12
    assert probe.classes["round"] == ("round", "circle")
    assert probe.classes["rhombus"] == ("rhombus", "diamond")
    assert probe.classes["polygon"] == ("polygon", "hexagon")
    assert probe.classes["star"] == ("star",)
    assert probe.templates == SHAPE_TEMPLATES and len(SHAPE_TEMPLATES) == 7
    single = load_object_shape(shape_folder, split="single")
    assert single.source == str(shape_folder / "single" / "test.jsonl")
    assert [e.item for e in single.examples] == ["clock"]
    assert load_object_shape(shape_folder / "test.jsonl").examples == probe.examples
    with pytest.raises(ConfigError, match="give that folder"):
        load_object_shape(shape_folder / "test.jsonl", split="single")


@pytest.mark.parametrize(
    "name,content,loader,message",
    [
        (
            "mc.jsonl",
            '{"descriptor": "a", "item": "sun", "label": "yellow"}\n\n{"item": "sky", "label"\n',
            load_memory_color,
            r"mc.jsonl, line 3: not valid JSON",
        ),
        (
            "mc.jsonl",
            '{"item": "sun", "label": "yellow"}\n{"item": "sea", "label": "teal"}\n',
            load_memory_color,
            r"mc.jsonl, line 2: label 'teal' is not one of the 11 classes \(white, green",
        ),
        (
            "mc.jsonl",
            '{"descriptor": "a", "label": "yellow"}\n',
            load_memory_color,
            r"mc.jsonl, line 1: missing the field 'item'",
        ),
        (
            "mc.csv",
            "Index,Descriptor,Item,Color\r\n1,a ,sun,yellow\r\n2,,sky,azure\r\n",
            load_memory_color,
            r"mc.csv, line 3: label 'azure' is not one of the 11 classes",
        ),
        (
            "mc.csv",
            "Index,Item,Color\r\n1,sun,yellow\r\n",
            load_memory_color,
            r"mc.csv, line 1: the CSV header .* lacks the column\(s\) \['descriptor'\]",
        ),
        (
            "ct.csv",
            "Object,color\nash,grey\nbanana,yellow,extra\n",
            load_color_terms,
            r"ct.csv, line 3: 3 fields where the header has 2",
        ),
        (
            "shape.jsonl",
            '{"sub": "egg", "obj": "oval"}\n{"sub": "egg", "obj": "ellipse"}\n',
            load_object_shape,
            r"shape.jsonl, line 2: label 'ellipse' is not one of the 12 classes",
        ),
        ("shape.jsonl", "\n\n", load_object_shape, r"holds no examples"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, name, content, loader, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        loader(path)
    assert "\n" not in str(error.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"Memory-Color file '.*nope.jsonl' does not exist"):
        load_memory_color(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"ObjectShape file '.*test.jsonl' does not exist"):
        load_object_shape(tmp_path)


# ---------------------------------------------------------------------------------- templates
def test_template_filling_exact_strings():
    first, with_sep, *_ = COLOUR_TEMPLATES
    assert (
        fill_template(first, "sunflower", "a")
        == "Q: What is the color of a sunflower? A: It is [MASK]."
    )
    assert (
        fill_template(with_sep, "pineapple", "the inside of a")
        == "Q: What is the color of the inside of a pineapple? [SEP] A: It is [MASK]."
    )
    # an empty descriptor drops "[DESCRIPTOR] ", also at the start of a sentence
    assert (
        fill_template(with_sep, "grass") == "Q: What is the color of grass? [SEP] A: It is [MASK]."
    )
    assert fill_template(COLOUR_TEMPLATES[8], "grass") == "grass usually has the color of [MASK]."
    assert (
        fill_template(COLOUR_TEMPLATES[8], "sun", "the")
        == "the sun usually has the color of [MASK]."
    )
    # the tokenizer's own tokens, a candidate answer, and no separator at all
    assert (
        fill_template(COLOUR_TEMPLATES[4], "sky", "the", answer="<mask>", sep="</s>")
        == "What is the color of the sky? </s> <mask>."
    )
    assert (
        fill_template(COLOUR_TEMPLATES[4], "sky", answer="blue", sep="")
        == "What is the color of sky? blue."
    )
    assert fill_template(SHAPE_TEMPLATES[6], "clock", answer="round") == "This is a round clock ."
    assert fill_template(SHAPE_TEMPLATES[5], "stop sign") == "[MASK] stop sign ."


# ------------------------------------------------------------------------------- masked LM
@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory) -> Path:
    """A random ``BertForMaskedLM`` (head included) with MiniLM's real WordPiece tokenizer."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_mlm"), masked_lm=True)


@functools.cache
def hf_masked_lm(folder: Path):
    from transformers import AutoTokenizer, BertForMaskedLM

    return AutoTokenizer.from_pretrained(folder), BertForMaskedLM.from_pretrained(folder).eval()


def hf_mask_log_probs(folder: Path, text: str) -> torch.Tensor:
    """The Hugging Face model on one hand-written string: log-probabilities ``(masks, V)`` at
    its [MASK] positions, in order."""
    tokenizer, model = hf_masked_lm(folder)
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    return logits[encoded["input_ids"][0] == tokenizer.mask_token_id].log_softmax(-1)


def test_multi_piece_candidate_gets_one_mask_per_piece(tiny_mlm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mlm)
    ids = candidate_pieces(tokenizer, "stop sign has shape ", "octagon", " .")
    assert tokenizer.convert_ids_to_tokens(ids) == ["oct", "##ago", "##n"]
    probe = Probe(
        "shape",
        [ProbeExample("stop sign", "octagon")],
        {"octagon": ("octagon",), "polygon": ("polygon",), "star": ("star",)},
        ("[ITEM] has shape [MASK] .",),
    )
    _, logits = masked_lm_scorer(str(tiny_mlm), "cpu")
    scores = masked_lm_word_scores(probe, tokenizer, logits)
    for w, (word, masks) in enumerate([("octagon", 3), ("polygon", 2), ("star", 1)]):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) == masks
        rows = hf_mask_log_probs(
            tiny_mlm, "stop sign has shape " + " ".join(["[MASK]"] * masks) + " ."
        )
        assert rows.shape[0] == masks
        expected = sum(float(rows[j, pieces[j]]) for j in range(masks)) / masks
        assert scores[0, 0, w].item() == pytest.approx(expected, abs=1e-5)


def test_masked_lm_accuracy_per_template_equals_a_hand_count(tiny_mlm, memory_color_csv):
    """Every template's accuracy equals the count made by running the Hugging Face model on
    each hand-filled string and taking the top colour at its [MASK]."""
    from transformers import AutoTokenizer

    probe = load_memory_color(memory_color_csv)
    tokenizer, logits = masked_lm_scorer(str(tiny_mlm), "cpu")
    result = score_masked_lm(probe, tokenizer, logits, batch_size=5)
    colour_ids = AutoTokenizer.from_pretrained(tiny_mlm).convert_tokens_to_ids(list(COLOURS))
    expected = []
    for template in COLOUR_TEMPLATES:
        correct = 0
        for example in probe.examples:
            text = template.replace("[ITEM]", example.item)
            text = text.replace(
                "[DESCRIPTOR] ", example.descriptor + " " if example.descriptor else ""
            )
            top = hf_mask_log_probs(tiny_mlm, text)[0, colour_ids].argmax()
            correct += COLOURS[int(top)] == example.label
        expected.append(correct / len(probe.examples))
    assert result.accuracy == pytest.approx(expected)
    assert result.average == pytest.approx(sum(expected) / len(expected))
    assert len(set(map(tuple, result.predictions))) > 1  # the templates really differ


def test_raising_one_candidate_makes_it_the_answer_everywhere(tiny_mlm, tmp_path, shape_folder):
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_mlm)
    model = BertForMaskedLM.from_pretrained(tiny_mlm)
    with torch.no_grad():
        model.cls.predictions.bias[tokenizer.convert_tokens_to_ids("circle")] += 100.0
    folder = tmp_path / "likes_circle"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    probe = load_object_shape(shape_folder)
    result = score_masked_lm(probe, *masked_lm_scorer(str(folder), "cpu"))
    # "circle" is a word of the class "round": every example, every template, predicts round
    assert all(p == "round" for row in result.predictions for p in row)
    assert result.accuracy == pytest.approx([1 / 4] * 7)  # one of the four objects is round


def test_a_probe_needs_examples_to_have_an_accuracy():
    with pytest.raises(ValueError, match="probe empty has no examples"):
        Probe("empty", [], {"round": ("round",)}, ("[ITEM] is [MASK] .",))


#: the probabilities at every mask of :func:`chosen_mlm`: two synonyms of "round", each below
#: "square", whose sum beats it; every other word piece gets a negligible share
CHOSEN = {"square": 0.4, "round": 0.3, "circle": 0.3}
#: twelve objects, one of them round (written with its synonym, as ViComTe does)
TWELVE_SHAPES = [{"sub": "clock", "obj": "circle"}] + [
    {"sub": item, "obj": "square"}
    for item in ("table", "box", "tile", "window", "dice", "napkin", "chessboard", "stamp",
                 "cracker", "cube", "pillow")
]  # fmt: skip


@pytest.fixture(scope="module")
def chosen_mlm(tiny_mlm, tmp_path_factory) -> Path:
    """A masked LM whose logits are its output bias alone (decoder weights zero, untied), so the
    probabilities at any mask are chosen here: log-weights ``CHOSEN`` and -30 for every other
    token of the vocabulary."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_mlm)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    model = BertForMaskedLM(config)
    decoder = model.cls.predictions.decoder
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.fill_(-30.0)
        for word, probability in CHOSEN.items():
            decoder.bias[tokenizer.convert_tokens_to_ids(word)] = math.log(probability)
    folder = tmp_path_factory.mktemp("chosen_mlm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_class_scores_the_sum_of_its_synonyms_probabilities(chosen_mlm, shape_folder):
    """round <- {round, circle}: each synonym (0.3) is below square (0.4), their sum (0.6) is
    above it, so every object is predicted round."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chosen_mlm)
    bias = torch.full((tokenizer.vocab_size,), -30.0, dtype=torch.float64)
    for word, probability in CHOSEN.items():
        bias[tokenizer.convert_tokens_to_ids(word)] = math.log(probability)
    log_z = torch.logsumexp(bias, dim=0).item()  # the softmax's normaliser, by hand
    probe = load_object_shape(shape_folder)
    words, _ = probe_words(probe)
    scorer = masked_lm_scorer(str(chosen_mlm), "cpu")
    scores = masked_lm_word_scores(probe, *scorer)
    for word, probability in CHOSEN.items():
        expected = torch.full(scores.shape[:2], math.log(probability) - log_z, dtype=torch.float64)
        torch.testing.assert_close(
            scores[..., words.index(word)].double(), expected, atol=1e-5, rtol=0
        )
    assert scores[..., words.index("star")].max() < math.log(1e-6)

    result = score_masked_lm(probe, *scorer)
    assert all(p == "round" for row in result.predictions for p in row)
    # the four objects: clock (round), stop sign, field, table: one of four right everywhere
    assert result.accuracy == [1 / 4] * len(SHAPE_TEMPLATES)


def test_probe_accuracies_are_exact_fractions(chosen_mlm, tmp_path, capsys):
    """One of twelve objects right under every template: the report says 1/12 in float64
    (0.08333333333333333), not a float32 mean (0.0833333358168602), and so does the average."""
    path = write_jsonl(tmp_path / "shape" / "test.jsonl", TWELVE_SHAPES)
    code, lines, _ = run_cli(capsys, "--model", str(chosen_mlm), "--object-shape", str(path))
    assert code == 0
    shapes = json.loads(lines[-1])["probes"]["object_shape"]
    assert shapes["examples"] == 12
    assert [t["accuracy"] for t in shapes["templates"]] == [1 / 12] * len(SHAPE_TEMPLATES)
    assert shapes["average"] == 1 / 12
    assert '"average": 0.08333333333333333' in lines[-1]


# ---------------------------------------------------------------------------------- CLIP row
CLIP_CONTEXT = 32


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    """A tiny open_clip architecture (registered by config, as open_clip's own JSON configs are;
    a short context keeps it fast) and a whole-model checkpoint of it, image tower included."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    name = "macsc-probe-tiny"
    _MODEL_CONFIGS[name] = {
        "embed_dim": 48,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": 64,
                     "heads": 2, "layers": 2},
    }  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(open_clip.create_model(name).state_dict(), path)
    return name, path


@functools.cache
def open_clip_model(name: str, path: Path) -> torch.nn.Module:
    import open_clip

    model = open_clip.create_model(name).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def open_clip_encode(name: str, path: Path, texts: list[str]) -> torch.Tensor:
    """open_clip's own whole model and ``encode_text``: the reference embedding."""
    import open_clip

    model = open_clip_model(name, path)
    with torch.no_grad():
        return model.encode_text(open_clip.tokenize(texts, context_length=CLIP_CONTEXT))


def test_text_tower_embedding_is_clips_encode_text(tiny_clip):
    name, path = tiny_clip
    texts = ["a yellow banana", "", "What is the color of the sky? blue.", "word " * 50]
    embed = clip_scorer({"kind": "open_clip", "model_name": name, "pretrained": None,
                         "checkpoint": str(path)}, "cpu")  # fmt: skip
    torch.testing.assert_close(
        embed(texts), open_clip_encode(name, path, texts), atol=1e-4, rtol=1e-4
    )


def test_clip_accuracy_per_template_equals_a_hand_count(tiny_clip, memory_color_csv):
    name, path = tiny_clip
    options = {"kind": "open_clip", "model_name": name, "pretrained": None, "checkpoint": str(path)}
    probe = load_memory_color(memory_color_csv)
    result = score_clip(probe, clip_scorer(options, "cpu"), batch_size=50)
    expected = []
    for template in COLOUR_TEMPLATES:
        correct = 0
        for example in probe.examples:
            d = example.descriptor + " " if example.descriptor else ""
            phrase = d + example.item
            text = template.replace("[SEP] ", "").replace("[DESCRIPTOR] ", d)
            texts = [text.replace("[ITEM]", example.item).replace("[MASK]", c) for c in COLOURS]
            vectors = open_clip_encode(name, path, [phrase, *texts])
            cosine = torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:])
            correct += COLOURS[int(cosine.argmax())] == example.label
        expected.append(correct / len(probe.examples))
    assert result.accuracy == pytest.approx(expected)


def test_clip_picks_the_filled_template_equal_to_the_phrase(tiny_clip):
    """Where one candidate's filled template is the object phrase itself, its cosine is 1 and
    no other can beat it; with synonyms, the class of that word wins."""
    name, path = tiny_clip
    embed = clip_scorer({"kind": "open_clip", "model_name": name, "pretrained": None,
                         "checkpoint": str(path)}, "cpu")  # fmt: skip
    classes = {"round": ("round", "circle"), "square": ("square",), "star": ("star",)}
    items = ["circle", "square", "star", "round"]
    probe = Probe("same", [ProbeExample(i, "round") for i in items], classes, ("[MASK]",))
    cosine = clip_word_scores(probe, embed)
    words, _ = probe_words(probe)
    for e, item in enumerate(items):
        assert cosine[0, e, words.index(item)].item() == pytest.approx(1.0, abs=1e-5)
    assert score_clip(probe, embed).predictions[0] == ["round", "square", "star", "round"]


def test_probe_command_with_a_clip_tower(tiny_clip, tmp_path, capsys):
    name, path = tiny_clip
    terms = tmp_path / "color-concrete-objects.csv"
    terms.write_text("Object,color\nash,grey\nbanana,yellow\nsea,blue\n")
    tower = {"kind": "open_clip", "model_name": name, "pretrained": None, "checkpoint": str(path)}
    code, lines, _ = run_cli(capsys, "--clip", json.dumps(tower), "--color-terms", str(terms))
    assert code == 0
    report = json.loads(lines[-1])
    assert report["model"] == {"kind": "clip", "tower": tower}
    expected = score_clip(load_color_terms(terms), clip_scorer(tower, "cpu"))
    assert [t["accuracy"] for t in report["probes"]["color_terms"]["templates"]] == (
        expected.accuracy
    )


# ---------------------------------------------------------------------------------- MaCSC
def save_macsc(backbone: Path, path: Path, modalities: list[str]) -> Path:
    import lightning as L

    from macsc.training.module import MaCSC

    torch.manual_seed(0)
    model = MaCSC(
        backbone=str(backbone),
        modalities=modalities,
        prototypes={"image": {"kind": "gaussian", "dim": 16, "k": 4}},
        task={"kind": "classification", "num_labels": 2},
        enhancer={"heads": 4},
    )
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        accelerator="cpu")  # fmt: skip
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def macsc_checkpoints(tiny_mlm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("macsc")
    return {
        "image": save_macsc(tiny_mlm, root / "image.ckpt", ["text", "image"]),
        "text": save_macsc(tiny_mlm, root / "text.ckpt", ["text"]),
    }


def test_text_only_macsc_scores_as_its_pretrained_masked_lm(
    macsc_checkpoints, tiny_mlm, shape_folder
):
    """``modalities: [text]`` and an untrained backbone: ``H^t`` through the pretrained MLM head
    is exactly the Hugging Face masked LM (multi-piece shapes included)."""
    probe = load_object_shape(shape_folder)
    tokenizer, logits, loaded = macsc_scorer(macsc_checkpoints["text"], "cpu")
    assert loaded["modalities"] == ["text"] and loaded["mlm_head"] == str(tiny_mlm)
    plain = masked_lm_word_scores(probe, *masked_lm_scorer(str(tiny_mlm), "cpu"))
    torch.testing.assert_close(masked_lm_word_scores(probe, tokenizer, logits), plain)


def test_macsc_prototypes_change_the_probabilities(macsc_checkpoints, tiny_mlm):
    from macsc.training.module import MaCSC

    path = macsc_checkpoints["image"]
    texts = [
        "the sun usually has the color of [MASK].",
        "What is the color of grass? [SEP] [MASK].",
    ]
    head = mlm_head(load_masked_lm(str(tiny_mlm)), str(tiny_mlm))

    def mask_log_probs(model):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.backbone_name)
        states = macsc_text_states(model, tokenizer)
        with torch.no_grad():
            hidden, ids, mask = states(texts)
            alone = [states([t])[0][0] for t in texts]
            logits = head(hidden)
        # each sentence's own prototypes: a batch gives every row what it gives alone
        for row, single in enumerate(alone):
            torch.testing.assert_close(hidden[row, : single.shape[0]], single, atol=1e-5, rtol=1e-5)
        return logits[ids == tokenizer.mask_token_id].log_softmax(-1)

    reference = mask_log_probs(load_macsc(path))
    other_seed = {"image": {"kind": "gaussian", "dim": 16, "k": 4, "seed": 1}}
    changed = mask_log_probs(MaCSC.load_from_checkpoint(path, prototypes=other_seed).eval())
    assert not torch.allclose(reference, changed, atol=1e-4)
    torch.testing.assert_close(mask_log_probs(load_macsc(path)), reference)  # deterministic


def run_cli(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["probe", *args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip()


def test_probe_command_end_to_end_with_a_checkpoint(
    macsc_checkpoints, memory_color_csv, shape_folder, tmp_path, capsys, tiny_mlm
):
    out = tmp_path / "report.json"
    code, lines, _ = run_cli(
        capsys, "--ckpt", str(macsc_checkpoints["image"]), "--memory-color",
        str(memory_color_csv), "--object-shape", str(shape_folder), "--json", str(out),
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    report = json.loads(lines[-1])
    assert json.loads(out.read_text()) == report
    assert report["model"]["kind"] == "macsc"
    assert report["model"]["checkpoint"] == str(macsc_checkpoints["image"])
    assert report["model"]["modalities"] == ["text", "image"]
    assert list(report["probes"]) == ["memory_color", "object_shape"]
    for name, templates, examples in (("memory_color", 13, 4), ("object_shape", 7, 4)):
        probe = report["probes"][name]
        accuracies = [t["accuracy"] for t in probe["templates"]]
        assert len(accuracies) == templates and probe["examples"] == examples
        assert probe["average"] == pytest.approx(sum(accuracies) / templates)
        assert all(0 <= a <= 1 for a in accuracies)
        # the table shows the same numbers, in percent
        table_average = [line for line in lines if line.startswith(name) and "average" in line]
        assert float(table_average[0].split()[-1]) == pytest.approx(
            100 * probe["average"], abs=0.01
        )
    assert report["probes"]["memory_color"]["templates"][0]["template"] == COLOUR_TEMPLATES[0]

    # a text-only checkpoint reports what the plain masked LM reports
    _, ckpt_lines, _ = run_cli(capsys, "--ckpt", str(macsc_checkpoints["text"]),
                               "--memory-color", str(memory_color_csv), "--device", "cpu")  # fmt: skip
    _, model_lines, _ = run_cli(capsys, "--model", str(tiny_mlm), "--memory-color",
                                str(memory_color_csv), "--device", "cpu")  # fmt: skip
    assert json.loads(ckpt_lines[-1])["probes"] == json.loads(model_lines[-1])["probes"]


def test_probe_command_errors_are_one_line(
    capsys, tmp_path, memory_color_csv, tiny_backbone, macsc_checkpoints
):
    cases = [
        ((["--model", "x"]), "needs at least one probe file"),
        ((["--memory-color", str(memory_color_csv)]), "needs exactly one model"),
        ((["--model", "x", "--ckpt", "y", "--memory-color", "z"]), "got --model, --ckpt"),
        ((["--model", "x", "--memory-color", str(tmp_path / "nope.csv")]), "does not exist"),
        ((["--ckpt", str(tmp_path / "nope.ckpt"), "--memory-color", str(memory_color_csv)]),
         "checkpoint .* does not exist"),
        ((["--model", tiny_backbone, "--memory-color", str(memory_color_csv)]),
         "has no masked-LM weights"),
        ((["--clip", "{model_name: x}", "--memory-color", str(memory_color_csv)]), "needs a 'kind'"),
        ((["--clip", "{kind: gaussian}", "--memory-color", str(memory_color_csv)]),
         "not a CLIP text tower"),
        ((["--model", "x", "--mlm-head", "y", "--memory-color", str(memory_color_csv)]),
         "--mlm-head applies to --ckpt only"),
    ]  # fmt: skip
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(macsc_checkpoints["text"].read_bytes()[:4096])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    cases += [
        ((["--ckpt", str(damaged), "--memory-color", str(memory_color_csv)]), "cannot be read"),
        ((["--ckpt", str(foreign), "--memory-color", str(memory_color_csv)]),
         "does not load as a MaCSC checkpoint"),
    ]  # fmt: skip
    import re

    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        last = err.splitlines()[-1]
        assert code == 2 and last.startswith("macsc: error:") and re.search(message, last), (
            args,
            err,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_three_models_score_alike_on_cuda_and_cpu(
    tiny_mlm, macsc_checkpoints, tiny_clip, shape_folder, memory_color_csv
):
    shapes, colours = load_object_shape(shape_folder), load_memory_color(memory_color_csv)
    for device in ("cpu", "cuda"):
        scores = {
            "mlm": masked_lm_word_scores(shapes, *masked_lm_scorer(str(tiny_mlm), device)),
            "macsc": masked_lm_word_scores(
                shapes, *macsc_scorer(macsc_checkpoints["image"], device)[:2]
            ),
        }
        name, path = tiny_clip
        tower = {
            "kind": "open_clip",
            "model_name": name,
            "pretrained": None,
            "checkpoint": str(path),
        }
        scores["clip"] = clip_word_scores(colours, clip_scorer(tower, device))
        if device == "cpu":
            reference = scores
    for key, value in scores.items():
        torch.testing.assert_close(value, reference[key], atol=1e-4, rtol=1e-4, msg=key)


def test_probe_scores_a_checkpoint_of_an_earlier_macsc_as_its_weights_saved_today(
    tiny_mlm, memory_color_csv, tmp_path, monkeypatch, capsys
):
    """A checkpoint with the flat options of an earlier macsc (tests/training/test_legacy.py)
    loads with its settings, so it scores as the same weights under today's names."""
    from tests.training.test_legacy import old_checkpoint

    (tmp_path / "tiny_bert").symlink_to(tiny_mlm)  # where the old checkpoint says its backbone is
    monkeypatch.chdir(tmp_path)
    old, today, _ = old_checkpoint(tmp_path, "python")
    reports = []
    for path in (old, today):
        code, lines, _ = run_cli(capsys, "--ckpt", str(path), "--memory-color",
                                 str(memory_color_csv), "--device", "cpu")  # fmt: skip
        assert code == 0
        reports.append(json.loads(lines[-1]))
    assert reports[0]["model"]["modalities"] == ["text", "image", "video"]
    assert reports[0]["probes"] == reports[1]["probes"]
