"""The token cache's key (issue 20): whatever changes the tokenised result (texts, their order,
the tokenizer, max_length, the task's own options, the format) misses; what does not (another
load of the same tokenizer, one already used with other arguments, the labels) hits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tasks.glue import GLUEDataModule
from tests.tasks.test_squad import QUESTIONS, squad_json
from tests.tasks.test_token_cache import (
    TOKENIZER,
    commongen,
    glue,
    squad,
    token_files,
    write_commongen,
    write_mnli,
)


def new_entries(cache: Path, dm) -> set[Path]:
    """The token files that setting ``dm`` up added to ``cache``."""
    before = token_files(cache)
    dm.setup("fit")
    return token_files(cache) - before


def rewrite(path: str, edit) -> None:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    Path(path).write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")


def swapped_vocabulary(folder: Path) -> str:
    """A copy of MiniLM's tokenizer whose ids of "red" and "blue" are exchanged."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(TOKENIZER) / name, folder / name)
    definition = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocabulary = definition["model"]["vocab"]
    vocabulary["red"], vocabulary["blue"] = vocabulary["blue"], vocabulary["red"]
    (folder / "tokenizer.json").write_text(json.dumps(definition), encoding="utf-8")
    return str(folder)


class RenamedTokenizerClass(type(AutoTokenizer.from_pretrained(TOKENIZER))):
    pass


def tokenizer_variant(name: str, tmp_path: Path):
    if name == "vocabulary":
        return AutoTokenizer.from_pretrained(swapped_vocabulary(tmp_path))
    if name == "added token":
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        tokenizer.add_tokens(["redapple"])
        return tokenizer
    if name == "no lower-casing":
        return AutoTokenizer.from_pretrained(TOKENIZER, do_lower_case=False)
    if name == "special token":
        return AutoTokenizer.from_pretrained(TOKENIZER, cls_token="[unused0]")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if name == "class":
        tokenizer.__class__ = RenamedTokenizerClass
    elif name == "truncation side":
        tokenizer.truncation_side = "left"
    elif name == "padding side":
        tokenizer.padding_side = "left"
    return tokenizer


TOKENIZER_VARIANTS = [
    "vocabulary",
    "added token",
    "no lower-casing",
    "special token",
    "class",
    "truncation side",
    "padding side",
]


@pytest.fixture
def mnli(tmp_path) -> tuple[dict[str, str], Path]:
    """MNLI files whose entries are already in the cache (tokenised by name)."""
    files, cache = write_mnli(tmp_path), tmp_path / "cache"
    assert len(new_entries(cache, glue(files, cache))) == 3
    return files, cache


def test_the_same_tokenizer_loaded_again_or_already_used_hits(mnli):
    files, cache = mnli
    used = AutoTokenizer.from_pretrained(TOKENIZER)
    used(["a b c d e f"], truncation=True, max_length=4, padding="max_length")
    assert not new_entries(cache, glue(files, cache, AutoTokenizer.from_pretrained(TOKENIZER)))
    assert not new_entries(cache, glue(files, cache, used))


@pytest.mark.parametrize("variant", TOKENIZER_VARIANTS)
def test_another_tokenizer_misses(variant, mnli, tmp_path):
    files, cache = mnli
    tokenizer = tokenizer_variant(variant, tmp_path)
    assert len(new_entries(cache, glue(files, cache, tokenizer))) == 3


def test_format_version_and_data_module_class_are_part_of_the_key(mnli, monkeypatch):
    import tasks.token_cache

    files, cache = mnli

    class Subclass(GLUEDataModule):
        pass

    other = Subclass("mnli", data_files=files, cache_dir=cache, max_length=24)
    other.connect(TOKENIZER, {})
    assert len(new_entries(cache, other)) == 3
    monkeypatch.setattr(tasks.token_cache, "FORMAT_VERSION", tasks.token_cache.FORMAT_VERSION + 1)
    assert len(new_entries(cache, glue(files, cache))) == 3


def swap_two_rows(lines):
    return [lines[0], lines[2], lines[1], *lines[3:]]


def change_a_hypothesis(lines):
    premise, _, label = lines[5].split("\t")
    return [*lines[:5], f"{premise}\tsomething else entirely\t{label}", *lines[6:]]


def change_a_premise(lines):
    _, hypothesis, label = lines[1].split("\t")
    return [lines[0], f"another premise\t{hypothesis}\t{label}", *lines[2:]]


@pytest.mark.parametrize(
    ("edit", "options", "changed"),
    [
        (swap_two_rows, {}, 1),  # the same texts in another order
        (change_a_hypothesis, {}, 1),
        (change_a_premise, {}, 1),
        (None, {"max_length": 20}, 3),
        (None, {"data_fraction": 0.5}, 1),
    ],
    ids=["order", "hypothesis", "premise", "max_length", "data_fraction"],
)
def test_glue_texts_their_order_and_options_miss(edit, options, changed, mnli):
    files, cache = mnli
    if edit is not None:
        rewrite(files["train"], edit)
    settings = {"max_length": 24, **options}
    dm = GLUEDataModule("mnli", data_files=files, cache_dir=cache, **settings)
    dm.connect(TOKENIZER, {})
    assert len(new_entries(cache, dm)) == changed


def test_labels_are_not_part_of_the_key_and_come_from_the_file(mnli):
    files, cache = mnli
    rewrite(files["train"], lambda lines: [lines[0], *(f"{ln[:-1]}0" for ln in lines[1:])])
    dm = glue(files, cache)
    assert not new_entries(cache, dm)
    assert all(b["labels"].eq(0).all() for b in dm.train_dataloader())


SQUAD_ANSWERABLE = {qid: q for qid, q in QUESTIONS.items() if q[2] is not None}


def edit_squad(path: str, edit) -> None:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    edit(data["data"][0]["paragraphs"][0]["qas"][0])
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def shift_answer(qa):
    qa["answers"][0]["answer_start"] -= 1
    qa["answers"][0]["text"] = " " + qa["answers"][0]["text"]


@pytest.mark.parametrize(
    ("edit", "options"),
    [
        (None, {"doc_stride": 10}),
        (None, {"max_question_length": 12}),
        (None, {"max_length": 40}),
        (None, {"version": "1.1"}),
        (lambda qa: qa.update(id="renamed"), {}),
        (shift_answer, {}),
        (lambda qa: qa.update(question="What is it?"), {}),
    ],
    ids=[
        "doc_stride",
        "max_question_length",
        "max_length",
        "version",
        "id",
        "answer",
        "question",
    ],
)
def test_squad_window_options_examples_and_version_miss(edit, options, tmp_path):
    path = squad_json(tmp_path / "squad.json", questions=SQUAD_ANSWERABLE)
    cache = tmp_path / "cache"
    assert len(new_entries(cache, squad(path, cache))) == 1  # train and validation: one file
    assert not new_entries(cache, squad(path, cache))
    if edit is not None:
        edit_squad(path, edit)
    assert len(new_entries(cache, squad(path, cache, **options))) == 1


@pytest.mark.parametrize(
    ("edit", "options", "changed"),
    [
        (None, {"prefix": "make: "}, 2),
        (None, {"max_length": 4}, 2),
        (None, {"max_target_length": 5}, 1),  # targets are tokenised for training only
        ("target", {}, 1),
    ],
    ids=["prefix", "max_length", "max_target_length", "target"],
)
def test_commongen_prefix_targets_and_lengths_miss(edit, options, changed, tmp_path):
    path = write_commongen(tmp_path)
    cache = tmp_path / "cache"
    assert len(new_entries(cache, commongen(path, cache))) == 2
    if edit == "target":
        rewrite(path, lambda lines: [lines[0].replace("A dog", "One dog"), *lines[1:]])
    assert len(new_entries(cache, commongen(path, cache, **options))) == changed
