"""CommonGen (generative commonsense reasoning) as a MaCSC task: a concept set in, a sentence
out (SPEC 6; paper Table 3).

The encoder input is the concept set joined by spaces in the dataset's order, after an optional
``prefix``; prototypes are extracted from the concept string (without the prefix), the single
segment, so the base class's prototype tables work unchanged. Sources are read by
:mod:`macsc.commongen.data` (hub, JSON Lines, the original release files).

Training iterates over every (concept set, reference) pair; evaluation (validation, test,
predict) over the distinct concept sets, each with all its references
(:meth:`CommonGenDataModule.generation_references`). Besides the base fields
(:mod:`tasks.base`: ``input_ids``, ``attention_mask``, ``example_index``, ``prototypes``,
``segments``), a training batch holds

- ``labels`` ``(B, T)`` long: the tokenizer's ids of the reference (with its end token, cut to
  ``max_target_length``), padded with -100 (ignored by the cross-entropy) to the batch's longest.

An evaluation batch has no ``labels``; its ``example_index`` is the concept set's position in
:class:`~macsc.commongen.metric.GenerationEvaluationData`. No ``token_type_ids`` (T5 has none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macsc.commongen.data import (
    HUB_NAME,
    ConceptExample,
    concept_text,
    group_concept_sets,
    hub_examples,
    load_hub,
    read_examples,
)
from macsc.commongen.metric import METRICS, GenerationEvaluationData, spice_available
from macsc.errors import ConfigError, DataError
from macsc.task import TaskSpec
from tasks.base import EncodedSplit, MaCSCDataModule, TextSplit
from tasks.collate import Collator, pad
from tasks.token_cache import Columns, json_digest

SPLITS = ("train", "validation", "test")
LABEL_PAD = -100  # the index torch's cross-entropy ignores


@dataclass
class CommonGenSplit(TextSplit):
    """A CommonGen split. segments: ``[concept strings]``, one per item. labels: training, one
    reference per item (a pair); evaluation, every reference of the item's concept set; None
    when the split has no references.

    ids, concepts: per item, its concept set's id and concepts (training: of the pair's set).
    """

    ids: list[str] = field(default_factory=list)
    concepts: list[list[str]] = field(default_factory=list)

    def subset(self, indices: list[int]) -> CommonGenSplit:
        part = super().subset(indices)
        return CommonGenSplit(
            part.name,
            part.source,
            part.segments,
            part.labels,
            [self.ids[i] for i in indices],
            [self.concepts[i] for i in indices],
        )


def training_split(name: str, source: str, examples: list[ConceptExample]) -> CommonGenSplit:
    """One item per (concept set, reference) pair, in the source's order."""
    unlabelled = [e for e in examples if not e.references]
    if unlabelled:
        raise DataError(
            f"{unlabelled[0].where}: a training example without a reference sentence "
            f"({len(unlabelled)} of {len(examples)} lines have none); every training line needs "
            "'target' or 'references'"
        )
    pairs = [(example, reference) for example in examples for reference in example.references]
    return CommonGenSplit(
        name,
        source,
        [[concept_text(example.concepts) for example, _ in pairs]],
        [reference for _, reference in pairs],
        [example.set_id or "#".join(example.concepts) for example, _ in pairs],
        [list(example.concepts) for example, _ in pairs],
    )


def evaluation_split(name: str, source: str, examples: list[ConceptExample]) -> CommonGenSplit:
    """One item per distinct concept set, its references grouped; labels None when no set has
    a reference, a DataError when only some have."""
    sets = group_concept_sets(examples)
    unlabelled = [s for s in sets if not s.references]
    if unlabelled and len(unlabelled) < len(sets):
        raise DataError(
            f"{source}: {len(unlabelled)} of {len(sets)} concept sets have no reference "
            f"sentence (first: {unlabelled[0].where}); give references for all of them, or none "
            "for a split to predict on"
        )
    return CommonGenSplit(
        name,
        source,
        [[concept_text(s.concepts) for s in sets]],
        None if unlabelled else [list(s.references) for s in sets],
        [s.id for s in sets],
        [list(s.concepts) for s in sets],
    )


@dataclass
class GenerationCollator(Collator):
    """The base batch plus ``labels`` ``(B, T)`` padded with -100, when the items have them."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        targets = [item["labels"] for item in items] if "labels" in items[0] else None
        batch = super().__call__(
            [{k: v for k, v in item.items() if k != "labels"} for item in items]
        )
        if targets is not None:
            batch["labels"] = pad(targets, LABEL_PAD)
        return batch


class CommonGenDataModule(MaCSCDataModule):
    """CommonGen from the Hugging Face hub or local files.

    Args:
        data_files: ``{train: PATH, validation: PATH, test: PATH}`` (any subset): JSON Lines
            (``{"concepts": [...], "target": "..."}`` or ``"references": [...]``) or the release
            ``commongen.*.src_alpha.txt`` (its ``.tgt.txt`` is read from beside it); when None,
            the hub dataset ``hub_name`` is used (online, or cached).
        hub_name: the hub dataset (``allenai/common_gen``).
        prefix: text put before the concepts in the encoder input (e.g.
            ``"generate a sentence with: "``); not part of the prototype segment.
        max_length: longest encoder input, in tokens.
        max_target_length: longest training target, in tokens (longer ones are cut).
        data_fraction: a seeded fraction of the training (concept set, reference) pairs.
        test_on: ``validation`` by default, since the hub's test split has no references;
            predict_on: ``test``.
        The other options are :class:`~tasks.base.MaCSCDataModule`'s.
    """

    task = "commongen"

    def __init__(
        self,
        data_files: dict[str, str] | None = None,
        hub_name: str = HUB_NAME,
        prefix: str = "",
        max_length: int = 64,
        max_target_length: int = 64,
        **options: Any,
    ) -> None:
        super().__init__(max_length=max_length, **options)
        unknown = sorted(set(data_files or {}) - set(SPLITS))
        if unknown:
            raise ConfigError(
                f"data_files has unknown split names {unknown}; CommonGen splits are {list(SPLITS)}"
            )
        if max_target_length < 1:
            raise ConfigError(
                f"data option max_target_length={max_target_length} must be a positive integer"
            )
        self.data_files = {k: str(v) for k, v in data_files.items()} if data_files else None
        self.hub_name = hub_name
        self.prefix = prefix
        self.max_target_length = max_target_length
        self._hub_dataset: Any = None
        self._evaluation: dict[str, GenerationEvaluationData] = {}

    @property
    def task_spec(self) -> TaskSpec:
        metrics = list(METRICS) + (["spice"] if spice_available() else [])
        return TaskSpec(kind="generation", num_labels=1, metrics=metrics)

    def load_split(self, name: str) -> CommonGenSplit:
        if self.data_files is None:
            if self._hub_dataset is None:
                self._hub_dataset = load_hub(self.hub_name)
            source = f"{self.hub_name} {name}"
            examples = hub_examples(self._hub_dataset, self.hub_name, name)
        elif name in self.data_files:
            source = str(Path(self.data_files[name]).expanduser())
            examples = read_examples(source)
        else:
            raise self.missing_split(name, sorted(self.data_files))
        if name == "train":
            return training_split(name, source, examples)
        return evaluation_split(name, source, examples)

    def input_fields(self) -> list[str]:
        return ["concepts"]

    def inputs_split(self, name: str, inputs: Sequence[Any]) -> CommonGenSplit:
        """Concept sets, each a list of concepts, a string of them separated by spaces, or a
        mapping with ``concepts`` (and an ``id``, else the position is the id)."""
        if isinstance(inputs, str | Mapping):
            inputs = [inputs]
        examples = []
        for position, given in enumerate(inputs):
            record = dict(given) if isinstance(given, Mapping) else {"concepts": given}
            concepts = record.get("concepts")
            if isinstance(concepts, str):
                concepts = concepts.split()
            if not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
                raise DataError(
                    f"input {position} ({given!r:.80}) is not a concept set: give a list of "
                    'concepts, a string of them, or {"concepts": [...]}'
                )
            where = f"input {position}"
            identity = str(record.get("id", position))
            examples.append(ConceptExample(tuple(concepts), (), identity, where))
        return evaluation_split(name, "the inputs given", examples)

    def tokenize(self, split: TextSplit) -> Columns:
        """Encoder ids of ``prefix`` + concepts; training, also the target ids (``labels``)."""
        if not isinstance(split, CommonGenSplit):
            raise TypeError(
                f"CommonGenDataModule.tokenize needs a CommonGenSplit, got {type(split)}"
            )
        inputs = self.tokenizer(
            [self.prefix + text for text in split.segments[0]],
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
        )
        columns: Columns = {"input_ids": inputs["input_ids"]}
        if split.name == "train":
            targets = self.tokenizer(
                text_target=list(split.labels),
                truncation=True,
                max_length=self.max_target_length,
                return_attention_mask=False,
            )
            columns["labels"] = targets["input_ids"]
        return columns

    def encoding_key(self, split: TextSplit) -> dict[str, Any]:
        """The base key (the concept strings, ``max_length``) with the prefix; training, also
        the targets and ``max_target_length``."""
        key = {**super().encoding_key(split), "prefix": self.prefix}
        if split.name == "train":
            key.update(
                targets=json_digest(list(split.labels)),
                max_target_length=self.max_target_length,
            )
        return key

    def encoded_split(self, split: TextSplit, columns: Columns) -> EncodedSplit:
        """Training items carry their target ids; evaluation keeps the split's concept sets
        for :meth:`generation_references`."""
        fields = {"input_ids": columns["input_ids"], "example_index": range(len(split))}
        if split.name == "train":
            fields["labels"] = columns["labels"]
        else:
            references = split.labels or [[] for _ in range(len(split))]
            self._evaluation[split.name] = GenerationEvaluationData(
                list(split.ids), [list(c) for c in split.concepts], [list(r) for r in references]
            )
        return EncodedSplit(fields)

    def generation_references(
        self, stage: str, split: str | None = None
    ) -> GenerationEvaluationData:
        """The concept sets, in ``example_index`` order, of the split evaluated as ``split`` (a
        ``task_spec.val_names`` entry; None: the first) in ``stage`` (``val``, ``test`` or
        ``predict``)."""
        roles = {"val": "validation", "test": self.test_on, "predict": self.predict_on}
        if stage not in roles:
            raise ValueError(f"stage {stage!r} is not one of {list(roles)}")
        position = 0 if split is None else self.task_spec.val_names.index(split)
        name = self.split_names(roles[stage])[position]
        if name not in self._evaluation:
            self._dataset(name, needs_labels=stage != "predict")
        return self._evaluation[name]

    def _collator(self, name: str) -> GenerationCollator:
        return GenerationCollator(self.pad_token_id, self._texts[name].segments, self._tables[name])
