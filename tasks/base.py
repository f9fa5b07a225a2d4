"""The data module every MaCSC task builds on.

A task subclass declares what it produces (:attr:`MaCSCDataModule.task_spec`), which splits it
has (:meth:`~MaCSCDataModule.split_names`) and how to read one
(:meth:`~MaCSCDataModule.load_split`); this base does the rest the same way for every task:
tokenisation, prototype tables (SPEC sections 1.7 and 8), ``data_fraction``, batches, loaders.

A batch is a dict padded to its longest sequence (the format: :mod:`tasks.collate`).

Each split is tokenised once: the first run (rank 0, in ``prepare_data``) stores the columns that
:meth:`MaCSCDataModule.tokenize` makes in the token cache (:mod:`tasks.token_cache`), beside the
prototype cache; every later run and every other rank maps them in ``setup``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from macsc.errors import ConfigError, DataError
from macsc.paths import load_tokenizer
from macsc.prototypes import (
    ImageFeatureSource,
    IndexedTexts,
    PrototypeExtractor,
    PrototypeTable,
    check_storage_dtype,
    index_texts,
    prototype_table,
    resolve_cache_dir,
)
from macsc.task import TaskSpec
from tasks.collate import Collator
from tasks.inputs import RawInputs
from tasks.labels import has_classes, label_classes
from tasks.sampling import (
    LengthGroupedSampler,
    ResumableDataLoader,
    ResumableSampler,
    fraction_indices,
    training_indices,
    warn_if_few_batches,
)
from tasks.splits import EncodedSplit, TextSplit, check_split_options, missing_split_error
from tasks.token_cache import (
    Columns,
    cached_columns,
    ordered_digest,
    token_cache_key,
    tokenizer_fingerprint,
)

__all__ = ["EncodedSplit", "MaCSCDataModule", "TextSplit", "fraction_indices"]


class MaCSCDataModule(RawInputs, L.LightningDataModule):
    """Base data module: a task subclass provides ``task_spec``, ``split_names``, ``load_split``
    (and ``input_fields`` for a trained model to read raw inputs: :class:`tasks.inputs.RawInputs`).

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the validation, test and predict loaders.
        num_workers: DataLoader worker processes.
        max_length: longest tokenised input; longer inputs are truncated (pairs: longest first).
        data_fraction: the fraction of the training split to use, in (0, 1] (the paper's 5%
            low-resource setting is 0.05); a seeded random subset, the same on every rank.
        max_train_examples: at most this many training examples (after ``data_fraction``), a
            seeded random subset; None uses them all. For smoke tests
            (``lightning_configs/cpu.yaml``): a split this size or smaller is used whole.
            A cut that leaves fewer than ``tasks.sampling.FEW_BATCHES`` batches is warned about.
        seed: seed of the subset and of the training shuffle.
        prototype_batch_size: texts per extractor call when filling the prototype cache.
        cache_dir: the folder of the prototype and token caches; None uses ``$MACSC_CACHE`` or
            ``~/.cache/macsc``, False turns both on-disk caches off.
        prototype_dtype: how prototypes are stored, ``auto`` (bfloat16 where extraction runs
            in bf16, else float16), ``float16``, ``bfloat16`` or ``float32``; part of the key.
        group_by_length: batch training examples of similar length together (faster).
        pin_memory: pin batches in page-locked memory; None pins when CUDA is available.
        test_on: the split ``trainer.test`` evaluates, ``validation`` (labelled) or ``test``.
        predict_on: the split ``trainer.predict`` runs on, ``test`` or ``validation``.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        max_length: int = 128,
        data_fraction: float = 1.0,
        max_train_examples: int | None = None,
        seed: int = 42,
        prototype_batch_size: int = 64,
        cache_dir: bool | str | None = None,
        prototype_dtype: str = "auto",
        group_by_length: bool = False,
        pin_memory: bool | None = None,
        test_on: str = "validation",
        predict_on: str = "test",
    ) -> None:
        super().__init__()
        check_split_options(
            data_fraction,
            test_on,
            predict_on,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_length=max_length,
            prototype_batch_size=prototype_batch_size,
            max_train_examples=1 if max_train_examples is None else max_train_examples,
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.data_fraction = data_fraction
        self.max_train_examples = max_train_examples
        self.seed = seed
        self.prototype_batch_size = prototype_batch_size
        self.cache_dir = cache_dir
        self.prototype_dtype = check_storage_dtype(prototype_dtype)
        self.group_by_length = group_by_length
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.test_on = test_on
        self.predict_on = predict_on
        self._tokenizer: Any = None
        self._extractors: dict[str, PrototypeExtractor] | None = None
        self._texts: dict[str, TextSplit] = {}
        self._tables: dict[str, dict[str, list[PrototypeTable]]] = {}
        self._encoded: dict[str, EncodedSplit] = {}
        self._indexed: dict[str, tuple[TextSplit, list[IndexedTexts]]] = {}

    # What a task declares.

    @property
    def run_name(self) -> str:
        """The name of the task's run folders (``runs/<run_name>/version_N``), which the
        ``macsc`` command gives a logger whose name is not configured."""
        return str(getattr(self, "task", None) or type(self).__name__)

    @property
    def task_spec(self) -> TaskSpec:
        """What the task produces; known at construction, before any data is read."""
        raise NotImplementedError

    def split_names(self, role: str) -> list[str]:
        """The split names behind a role (``train``, ``validation``, ``test``).

        Validation has one split per name in ``task_spec.val_names``, in that order.
        """
        return [role]

    def load_split(self, name: str) -> TextSplit:
        """Read split ``name``; raise :class:`DataError` when it is missing or malformed."""
        raise NotImplementedError

    def missing_split(self, name: str, available: list[str]) -> DataError:
        """The error for a split ``data_files`` lacks (:func:`tasks.splits.missing_split_error`)."""
        stage = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        roles = {"predict_on": self.predict_on, "test_on": self.test_on}
        is_test = name in self.split_names("test")
        return missing_split_error(name, available, is_test, getattr(stage, "value", stage), roles)

    def tokenize(self, split: TextSplit) -> Columns:
        """What the tokenizer makes of a split, stored in the token cache: here ``input_ids``
        (and ``token_type_ids``) of its one or two segments, unpadded, truncated to
        ``max_length`` (pairs: longest first). Integer columns only, one sequence or one int per
        item; a task that changes what this makes changes :meth:`encoding_key` (or
        :data:`tasks.token_cache.FORMAT_VERSION`) with it."""
        encoded = self.tokenizer(
            *split.segments,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
        )
        columns: Columns = {"input_ids": encoded["input_ids"]}
        if "token_type_ids" in encoded:
            columns["token_type_ids"] = encoded["token_type_ids"]
        return columns

    def encoding_key(self, split: TextSplit) -> dict[str, Any]:
        """Everything besides the tokenizer that changes what :meth:`tokenize` makes of
        ``split``: the ordered texts of each segment (digests), ``max_length``, the truncation
        rule. Part of the token cache's key (:mod:`tasks.token_cache`)."""
        return {
            "segments": [
                ordered_digest(texts.digest, texts.rows.numpy())
                for texts in self._indexed_segments(split)
            ],
            "max_length": self.max_length,
            "truncation": "longest_first",
        }

    def encoded_split(self, split: TextSplit, columns: Columns) -> EncodedSplit:
        """The dataset of ``split`` from its tokenised ``columns`` (made by :meth:`tokenize` or
        read from the token cache): here those, each example's position and its label."""
        fields = {**columns, "example_index": range(len(split))}
        if split.labels is not None:
            fields["labels"] = list(split.labels)
        return EncodedSplit(fields)

    def encode(self, split: TextSplit) -> EncodedSplit:
        """The dataset of ``split``: tokenised once and stored in the token cache, read from it
        afterwards; tokenised in memory when the cache is off (``cache_dir: false``)."""
        columns = self._cached_columns(split)
        return self.encoded_split(split, self.tokenize(split) if columns is None else columns)

    # Wiring: what is known only once the model is built.

    def connect(
        self,
        tokenizer: Any,
        extractors: Mapping[str, PrototypeExtractor],
        modalities: list[str] | None = None,
    ) -> None:
        """Give the data module the backbone's tokenizer and the prototype extractors.

        tokenizer: a Hugging Face name or path, or a tokenizer object (a text tower's, whose
        ``model_max_length`` is the most tokens the model reads: ``max_length`` may not exceed
        it). extractors: non-text modality -> extractor. modalities: the run's modalities
        (``text`` first); when given, only their extractors are used, and each must be present.
        """
        wanted = [m for m in (modalities or list(extractors)) if m != "text"]
        missing = [m for m in wanted if m not in extractors]
        if missing:
            raise ConfigError(
                f"modalities {missing} have no prototype extractor (extractors given: "
                f"{sorted(extractors)}); configure one for each non-text modality"
            )
        limit = getattr(tokenizer, "model_max_length", None)
        if not isinstance(tokenizer, str | os.PathLike) and isinstance(limit, int):
            if self.max_length > limit:
                raise ConfigError(
                    f"data option max_length={self.max_length} is longer than the {limit} "
                    f"tokens the model's encoder reads; set data.init_args.max_length: {limit}"
                )
        self._tokenizer = tokenizer
        self._extractors = {m: extractors[m] for m in wanted}
        self._tables.clear()
        self._encoded.clear()

    @property
    def tokenizer(self) -> Any:
        """The connected tokenizer, loaded on first use when it was given by name."""
        self._ensure_connected()
        if isinstance(self._tokenizer, str | os.PathLike):
            self._tokenizer = load_tokenizer(str(self._tokenizer))
        return self._tokenizer

    @property
    def extractors(self) -> dict[str, PrototypeExtractor]:
        self._ensure_connected()
        return self._extractors

    def _ensure_connected(self) -> None:
        """Connect from the trainer's model (``tokenizer`` or ``backbone_name``, and
        ``extractors``) if not yet done."""
        if self._extractors is not None:
            return
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            tokenizer = getattr(module, "backbone_name", None)
        extractors = getattr(module, "extractors", None)
        if tokenizer is not None and extractors is not None:
            self.connect(tokenizer, dict(extractors.items()), getattr(module, "modalities", None))
            return
        raise ConfigError(
            f"{type(self).__name__} has no tokenizer or prototype extractors: call "
            "datamodule.connect(tokenizer, extractors) before use, or run it in a Trainer with "
            "a model that has a tokenizer (or backbone_name) and extractors (the macsc CLI "
            "does this for you)"
        )

    # Lightning hooks.

    def prepare_data(self) -> None:
        """Read the splits the trainer's stage needs and fill the prototype and token caches
        for them.

        Lightning runs this on one process per node; the other ranks read the caches in
        ``setup``.
        """
        trainer = getattr(self, "trainer", None)
        stage = getattr(getattr(trainer, "state", None), "fn", None)
        for name, needs_labels in self._splits_for(getattr(stage, "value", stage)):
            split = self._text_split(name, needs_labels)
            self._prototype_tables(name, split)
            self._cached_columns(split)

    def setup(self, stage: str | None = None) -> None:
        """Read the splits ``stage`` needs, map their tokens from the token cache (tokenising
        only what it lacks) and look up their prototypes."""
        for name, needs_labels in self._splits_for(stage):
            self._dataset(name, needs_labels)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``seed`` and the epoch, resumable mid-epoch (:class:`ResumableDataLoader`)."""
        dataset = self._dataset("train", needs_labels=True)
        if self.group_by_length:
            sampler = LengthGroupedSampler(dataset.lengths(), self.batch_size, self.seed)
        else:
            sampler = ResumableSampler(dataset, self.seed)
        return self._loader("train", dataset, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders("validation", needs_labels=True)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.test_on, needs_labels=True)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.predict_on, needs_labels=False)

    def train_label_classes(self) -> Tensor:
        """The class of every training example in use (after ``data_fraction``), from which
        the model computes the class prior ``pi_e`` (:func:`tasks.labels.label_classes`).
        Reads labels only: needs no tokenizer."""
        spec = self.task_spec
        if not has_classes(spec):
            return torch.empty(0, dtype=torch.long)
        return label_classes(self._text_split("train", needs_labels=True).labels, spec)

    def prototype_tables(self) -> dict[str, list[PrototypeTable]]:
        """Every prototype-cache table opened so far, by modality (all splits and segments);
        not the tables of stored image features, which are no cache."""
        tables: dict[str, list[PrototypeTable]] = {}
        for by_modality in self._tables.values():
            for modality, segments in by_modality.items():
                if not isinstance(self.extractors.get(modality), ImageFeatureSource):
                    tables.setdefault(modality, []).extend(segments)
        return tables

    def evaluated_split_name(self, stage: str, name: str) -> str:
        """The split evaluated as ``name`` (a ``task_spec.val_names`` entry) in ``stage``
        (``val``, ``test`` or ``predict``): e.g. ``validation_matched``."""
        role = {"val": "validation", "test": self.test_on, "predict": self.predict_on}[stage]
        names = self.split_names(role)
        index = self.task_spec.val_names.index(name)
        return names[index] if index < len(names) else names[-1]

    def evaluation_split(self, stage: str, name: str) -> TextSplit:
        """The examples of the split evaluated as ``name`` in ``stage`` (for their ids, texts
        and labels in prediction records)."""
        return self._texts[self.evaluated_split_name(stage, name)]

    # Internals.

    def _splits_for(self, stage: str | None) -> list[tuple[str, bool]]:
        """(split name, needs labels) for each split a stage reads; None reads what fit reads."""
        roles = {
            "fit": [("train", True), ("validation", True)],
            "validate": [("validation", True)],
            "test": [(self.test_on, True)],
            "predict": [(self.predict_on, False)],
        }.get(stage or "fit", [])
        return [(name, labelled) for role, labelled in roles for name in self.split_names(role)]

    def _text_split(self, name: str, needs_labels: bool) -> TextSplit:
        """Split ``name`` read once, checked, and cut to ``data_fraction`` when it is train."""
        if name not in self._texts:
            split = self.load_split(name)
            if len(split) == 0:
                raise DataError(f"the {name!r} split ({split.source}) is empty: it has no examples")
            if split.ids is None:  # positions in the whole split, which a subset keeps
                split = dataclasses.replace(split, ids=list(range(len(split))))
            if name == "train":
                split = self._cut_training_split(split)
            self._texts[name] = split
        split = self._texts[name]
        if needs_labels and split.labels is None:
            raise DataError(
                f"the {name!r} split ({split.source}) has no labels, and evaluating or training "
                "on it needs them; use a labelled file, or trainer.predict for unlabelled data "
                "(data option test_on=validation evaluates on the labelled validation split)"
            )
        return split

    def _cut_training_split(self, split: TextSplit) -> TextSplit:
        """The training examples in use (:func:`tasks.sampling.training_indices`), with a
        warning when the cut leaves only a few batches an epoch."""
        indices, cuts = training_indices(
            len(split), self.data_fraction, self.max_train_examples, self.seed
        )
        trainer = getattr(self, "trainer", None)
        world_size = trainer.world_size if trainer is not None else 1
        warn_if_few_batches(len(indices), len(split), cuts, self.batch_size, world_size)
        return split.subset(indices) if cuts else split

    def _prototype_tables(self, name: str, split: TextSplit) -> dict[str, list[PrototypeTable]]:
        """modality -> one table per segment column, for every cacheable extractor; one table
        of the split's examples (by id) for an image-features source."""
        if name not in self._tables:
            options = {} if self.cache_dir is None else {"cache_dir": self.cache_dir}
            # the same device on every rank and in prepare_data and setup: the extraction
            # precision (bf16 on CUDA) is part of the cache key, so ranks find rank 0's entries
            options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            options["dtype"] = self.prototype_dtype
            cacheable = {m: e for m, e in self.extractors.items() if e.cacheable}
            segments = self._indexed_segments(split) if cacheable else []
            self._tables[name] = {
                modality: [
                    prototype_table(
                        extractor,
                        texts,
                        batch_size=self.prototype_batch_size,
                        progress=True,
                        description=f"{modality} prototypes, {name} segment {i + 1}",
                        **options,
                    )
                    for i, texts in enumerate(segments)
                ]
                for modality, extractor in cacheable.items()
            }
            task = getattr(self, "task", None) or type(self).__name__
            for modality, source in self.extractors.items():
                if isinstance(source, ImageFeatureSource):
                    self._tables[name][modality] = [source.table(name, task, split.ids)]
        return self._tables[name]

    def _indexed_segments(self, split: TextSplit) -> list[IndexedTexts]:
        """Each segment column of ``split`` deduplicated and digested once, whatever the number
        of extractors, for the prototype tables and the token cache's key."""
        known = self._indexed.get(split.name)
        if known is None or known[0] is not split:
            known = (split, [index_texts(texts) for texts in split.segments])
            self._indexed[split.name] = known
        return known[1]

    def _cached_columns(self, split: TextSplit) -> Columns | None:
        """``split``'s tokenised columns from the token cache, built there first if missing;
        None when the cache is off or the tokenizer cannot be fingerprinted."""
        folder = resolve_cache_dir(self.cache_dir)
        fingerprint = None if folder is None else tokenizer_fingerprint(self.tokenizer)
        if fingerprint is None:
            return None
        described = {
            "data_module": f"{type(self).__module__}.{type(self).__qualname__}",
            "tokenizer": fingerprint,
            **self.encoding_key(split),
        }
        key = token_cache_key(described)
        return cached_columns(folder, key, described, lambda: self.tokenize(split))

    def _dataset(self, name: str, needs_labels: bool) -> EncodedSplit:
        """Split ``name`` tokenised once, with its prototype tables ready for the collator."""
        split = self._text_split(name, needs_labels)
        if name not in self._encoded:
            self._prototype_tables(name, split)
            self._encoded[name] = self.encode(split)
        return self._encoded[name]

    @property
    def pad_token_id(self) -> int:
        """The backbone tokenizer's padding id (0 for tokenizers that define none)."""
        pad_token_id = self.tokenizer.pad_token_id
        return 0 if pad_token_id is None else pad_token_id

    def _collator(self, name: str) -> Collator:
        """What turns split ``name``'s items into batches (a task may return its own)."""
        return Collator(
            self.pad_token_id,
            self._texts[name].segments,
            self._tables[name],
        )

    def _loader(self, name: str, dataset: EncodedSplit, batch_size: int, **options) -> DataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self._collator(name),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # its own generator: making an iterator then draws no number from the global
            # stream, which dropout uses (an exact resume restores that stream)
            generator=torch.Generator().manual_seed(self.seed),
            **options,
        )

    def _eval_loaders(self, role: str, needs_labels: bool) -> DataLoader | list[DataLoader]:
        loaders = [
            self._loader(name, self._dataset(name, needs_labels), self.eval_batch_size)
            for name in self.split_names(role)
        ]
        return loaders[0] if len(loaders) == 1 else loaders
