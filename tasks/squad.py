"""SQuAD v1.1 / v2.0 (extractive QA) as a MaCSC task: windows over the context as training items,
start/end positions as targets, prototypes of the question and of the context (SPEC 1.7, 3, 4).

One *example* is a question with its context; one *feature* is a window of ``max_length`` tokens
over that context (consecutive windows share ``doc_stride`` tokens). Training and evaluation
iterate over features; post-processing gathers each question's windows back into one answer
(:mod:`macsc.squad.features`). Besides the base batch fields (:mod:`tasks.base`, ``example_index`` there is
the feature's question), a batch holds:

- ``start_positions``, ``end_positions`` ``(B,)`` long: the first gold answer's first and last
  token in the window, or ``null_index`` when the question is unanswerable or the answer is not
  wholly inside this window;
- ``null_index`` ``(B,)``: where the window scores "no answer", the backbone's CLS position, or
  the final EOT of a causal text tower, whose start token sees nothing of the input (SPEC 13;
  :func:`macsc.squad.features.null_position`); ``feature_index`` ``(B,)``: the feature's position in its
  split (the post-processing reads its offsets and question through it);
- ``context_start``, ``context_end`` ``(B,)``: the window's context tokens are
  ``[context_start, context_end)``;
- ``context_mask`` ``(B, l)`` bool: the positions an answer may take -- the context tokens, and
  for v2 also the null position ("no answer"); the allocation distributions live there (SPEC 4).

Positions index the unpadded window; the collator pads on the right for every backbone (XLNet
included), so they stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from macsc.errors import ConfigError, DataError
from macsc.method.heads import SpanEvaluationData
from macsc.squad.features import prepare_squad_features
from macsc.task import TaskSpec
from tasks.base import EncodedSplit, MaCSCDataModule, TextSplit
from tasks.collate import Collator
from tasks.splits import input_records
from tasks.squad_data import HUB_NAMES, load_squad
from tasks.token_cache import Columns, json_digest

VERSIONS = {"1.1": "squad", "2.0": "squad_v2"}  # version -> its hub dataset
_SHOWN_IDS = 5


@dataclass
class SquadSplit(TextSplit):
    """A SQuAD split. segments: ``[questions, contexts]`` (one prototype table each; a context
    shared by several questions is extracted once). labels: 1 for an answerable question, else 0.
    examples: the flat examples of :mod:`tasks.squad_data`, in the same order."""

    examples: list[dict[str, Any]] = field(default_factory=list)

    def subset(self, indices: list[int]) -> SquadSplit:
        part = super().subset(indices)
        examples = [self.examples[i] for i in indices]
        return SquadSplit(
            part.name, part.source, part.segments, part.labels, part.ids, examples=examples
        )


def squad_split(name: str, source: str, examples: list[dict[str, Any]]) -> SquadSplit:
    """The :class:`SquadSplit` of flat examples."""
    return SquadSplit(
        name,
        source,
        [[e["question"] for e in examples], [e["context"] for e in examples]],
        [int(bool(e["answers"]["text"])) for e in examples],
        [e["id"] for e in examples],
        examples=list(examples),
    )


#: the per-window scalars of a batch besides ``example_index`` and ``feature_index``
WINDOW_FIELDS = (
    "start_positions",
    "end_positions",
    "null_index",
    "context_start",
    "context_end",
)


def context_bounds(offsets: list[tuple[int, int] | None]) -> tuple[int, int]:
    """``(first, last + 1)`` of the context tokens of one window (they are contiguous)."""
    context = [i for i, offset in enumerate(offsets) if offset is not None]
    return context[0], context[-1] + 1


def offset_array(offsets: list[tuple[int, int] | None]) -> np.ndarray:
    """One window's offsets as ``(L, 2)`` int64, ``(-1, -1)`` for a token that is not context."""
    rows = [(-1, -1) if offset is None else offset for offset in offsets]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 2)


class OffsetMapping(Sequence):
    """Windows' offsets in :func:`macsc.squad.features.prepare_squad_features`' format (per
    token ``(start, end)`` characters of the context, or None), read from :func:`offset_array`
    rows (in memory or mapped from the token cache) when a window is post-processed."""

    def __init__(self, rows: Sequence[np.ndarray]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, feature: int) -> list[tuple[int, int] | None]:
        pairs = np.asarray(self.rows[feature]).tolist()
        return [None if start < 0 else (start, end) for start, end in pairs]


@dataclass
class SpanCollator(Collator):
    """The base batch plus ``context_mask`` (module docstring).

    with_null: v2, the null position is an answer position too. pad_to: pad every ``(B, l)``
    tensor to this length (a fixed ``l`` on every DDP rank, which ``gather_across_devices``
    needs); None pads to the longest window of the batch.
    """

    with_null: bool = False
    pad_to: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(items)
        if self.pad_to is not None:
            extra = self.pad_to - batch["input_ids"].shape[1]
            for name, value in (
                ("input_ids", self.pad_token_id),
                ("attention_mask", 0),
                ("token_type_ids", 0),
            ):
                if name in batch:
                    batch[name] = torch.nn.functional.pad(batch[name], (0, extra), value=value)
        positions = torch.arange(batch["input_ids"].shape[1])[None, :]
        mask = (positions >= batch["context_start"][:, None]) & (
            positions < batch["context_end"][:, None]
        )
        if self.with_null:
            mask |= positions == batch["null_index"][:, None]
        batch["context_mask"] = mask
        return batch


class SquadDataModule(MaCSCDataModule):
    """SQuAD v1.1 or v2.0 from the Hugging Face hub or local files.

    Args:
        version: ``"1.1"`` or ``"2.0"`` (quote it in YAML).
        data_files: ``{train: PATH, validation: PATH}`` (``test`` optional): the official JSON
            (``train-v2.0.json``, ``dev-v2.0.json``) or JSON Lines of flat examples; when None,
            the hub dataset ``hub_name`` is used.
        hub_name: default ``squad`` (v1.1) or ``squad_v2`` (v2.0).
        max_length: tokens per window, special tokens included.
        doc_stride: tokens shared by consecutive windows.
        max_question_length: longer questions are cut to leave room for the context.
        n_best, max_answer_length: post-processing (see :func:`macsc.squad.features.span_candidates`).
        pad_to_max_length: pad every batch to ``max_length`` (a fixed width; not needed for
            the model's ``gather_across_devices``, which pads the gathered spans itself).
        null_threshold: v2, ``macsc predict`` only: answer "no answer" where the null score
            exceeds the best span's by more than this (validation and test pick the best
            threshold on the split itself and log it as ``best_f1_thresh``: pass that here).
        data_fraction: a seeded fraction of the training *questions* (all windows of a chosen
            question are kept), chosen by :func:`tasks.base.fraction_indices` among the questions
            left after the answer-offset check of :func:`tasks.squad_data.load_squad`.
        The other options are :class:`~tasks.base.MaCSCDataModule`'s; the validation and test
        splits are scored with the official SQuAD definitions (``macsc.method.heads.SpanHead``).
    """

    def __init__(
        self,
        version: str = "2.0",
        data_files: dict[str, str] | None = None,
        hub_name: str | None = None,
        max_length: int = 384,
        doc_stride: int = 128,
        max_question_length: int = 64,
        n_best: int = 20,
        max_answer_length: int = 30,
        pad_to_max_length: bool = False,
        null_threshold: float = 0.0,
        batch_size: int = 12,
        predict_on: str = "validation",
        **options: Any,
    ) -> None:
        super().__init__(
            batch_size=batch_size, max_length=max_length, predict_on=predict_on, **options
        )
        self.version = str(version).lstrip("v")
        if self.version not in VERSIONS:
            raise ConfigError(f"data option version={version!r} is unknown; use '1.1' or '2.0'")
        for option, value in (
            ("doc_stride", doc_stride),
            ("n_best", n_best),
            ("max_answer_length", max_answer_length),
            ("max_question_length", max_question_length),
        ):
            if value < 1:
                raise ConfigError(f"data option {option}={value} must be a positive integer")
        unknown = sorted(set(data_files or {}) - {"train", "validation", "test"})
        if unknown:
            raise ConfigError(
                f"data_files has unknown split names {unknown}; SQuAD splits are train, "
                "validation and test"
            )
        self.data_files = {k: str(v) for k, v in data_files.items()} if data_files else None
        self.hub_name = hub_name or VERSIONS[self.version]
        self.doc_stride = doc_stride
        self.max_question_length = max_question_length
        self.n_best = n_best
        self.max_answer_length = max_answer_length
        self.pad_to_max_length = pad_to_max_length
        self.null_threshold = null_threshold
        self._evaluation: dict[str, SpanEvaluationData] = {}

    @property
    def task(self) -> str:
        """The task's name in run summaries: ``squad_v1.1`` or ``squad_v2.0``."""
        return f"squad_v{self.version}"

    @property
    def run_name(self) -> str:
        """``squad_v1`` or ``squad_v2``: the run folders of the shipped configs."""
        return f"squad_v{self.version[0]}"

    @property
    def version_2(self) -> bool:
        return self.version == "2.0"

    @property
    def task_spec(self) -> TaskSpec:
        return TaskSpec(kind="span", num_labels=2, metrics=["exact", "f1"])

    def load_split(self, name: str) -> SquadSplit:
        if self.data_files is None:
            if self.hub_name not in HUB_NAMES:
                raise ConfigError(
                    f"hub_name={self.hub_name!r} is not a SQuAD hub dataset ({HUB_NAMES}); "
                    "give data_files with the official JSON or JSON Lines instead"
                )
            source = self.hub_name
        elif name in self.data_files:
            source = str(Path(self.data_files[name]).expanduser())
            if not Path(source).is_file():
                raise DataError(f"{source} does not exist; check data_files.{name}")
        else:
            raise self.missing_split(name, sorted(self.data_files))
        examples = load_squad(source, name)
        if not self.version_2:
            _check_answerable(examples, source)
        return squad_split(name, source, examples)

    def input_fields(self) -> list[str]:
        return ["question", "context"]

    def inputs_split(self, name: str, inputs: Sequence[Any]) -> SquadSplit:
        """Questions with their contexts, ``(question, context)`` pairs or mappings (with an
        ``id``, else the position is the id), as an unlabelled split of flat examples."""
        examples = [
            {
                "id": str(record.get("id", position)),
                "title": "",
                "context": record["context"],
                "question": record["question"],
                "answers": {"text": [], "answer_start": []},
            }
            for position, record in enumerate(input_records(inputs, self.input_fields()))
        ]
        return squad_split(name, "the inputs given", examples)

    def tokenize(self, split: TextSplit) -> Columns:
        """The windows of every question of ``split``: their tokens, per-token context offsets
        ``(L, 2)`` (-1 where a token is not context), question, answer and null positions, and
        context bounds (the token cache stores these)."""
        if not isinstance(split, SquadSplit):
            raise TypeError(f"SquadDataModule.tokenize needs a SquadSplit, got {type(split)}")
        features = prepare_squad_features(
            split.examples,
            self.tokenizer,
            self.max_length,
            self.doc_stride,
            max_question_length=self.max_question_length,
        )
        index_of = {str(example["id"]): i for i, example in enumerate(split.examples)}
        bounds = [context_bounds(offsets) for offsets in features["offset_mapping"]]
        # numpy rows: a list of Python ints per window costs ~10x the memory on the full train set
        columns: Columns = {
            name: [np.asarray(row, dtype=np.int32) for row in features[name]]
            for name in ("input_ids", "token_type_ids")
            if name in features
        }
        columns.update(
            offsets=[offset_array(offsets) for offsets in features["offset_mapping"]],
            example_index=[index_of[qid] for qid in features["example_id"]],
            start_positions=features["start_positions"],
            end_positions=features["end_positions"],
            null_index=features["null_index"],
            context_start=[start for start, _ in bounds],
            context_end=[end for _, end in bounds],
        )
        return columns

    def encoding_key(self, split: TextSplit) -> dict[str, Any]:
        """The base key (questions, contexts, ``max_length``) with the window options, the
        version, the rule of the null position, and the examples' ids and answers."""
        if not isinstance(split, SquadSplit):
            raise TypeError(f"SquadDataModule.encoding_key needs a SquadSplit, got {type(split)}")
        return {
            **super().encoding_key(split),
            "truncation": "only the context",
            "doc_stride": self.doc_stride,
            "max_question_length": self.max_question_length,
            "version": self.version,
            "null_index": "the CLS token, else the last real end-of-sequence token",
            "examples": json_digest([[e["id"], e["answers"]] for e in split.examples]),
        }

    def encoded_split(self, split: TextSplit, columns: Columns) -> EncodedSplit:
        """One item per window; keeps what post-processing needs for the evaluation splits."""
        fields = {
            name: columns[name] for name in ("input_ids", "token_type_ids") if name in columns
        }
        fields.update(
            example_index=columns["example_index"],
            feature_index=range(len(columns["example_index"])),
            **{name: columns[name] for name in WINDOW_FIELDS},
        )
        if split.name != "train":
            ids = [str(example["id"]) for example in split.examples]
            features = {
                "example_id": [ids[i] for i in columns["example_index"]],
                "offset_mapping": OffsetMapping(columns["offsets"]),
                "null_index": columns["null_index"],
            }
            self._evaluation[split.name] = SpanEvaluationData(
                split.examples,
                features,
                self.version_2,
                self.n_best,
                self.max_answer_length,
                self.null_threshold,
            )
        return EncodedSplit(fields)

    def span_evaluation(self, stage: str, split: str) -> SpanEvaluationData:
        """Examples and features of the split evaluated as ``split`` (a ``task_spec.val_names``
        entry) in ``stage`` (``val``, ``test`` or ``predict``); read for
        :meth:`SpanHead.compute_metrics`."""
        name = self.evaluated_split_name(stage, split)
        if name not in self._evaluation:
            self._dataset(name, needs_labels=stage != "predict")
        return self._evaluation[name]

    def _collator(self, name: str) -> SpanCollator:
        return SpanCollator(
            self.pad_token_id,
            self._texts[name].segments,
            self._tables[name],
            with_null=self.version_2,
            pad_to=self.max_length if self.pad_to_max_length else None,
        )


def _check_answerable(examples: list[dict[str, Any]], source: str) -> None:
    """v1.1 has no unanswerable questions; one here means the wrong version was configured."""
    missing = [e["id"] for e in examples if not e["answers"]["text"]]
    if missing:
        shown = ", ".join(repr(qid) for qid in missing[:_SHOWN_IDS])
        raise DataError(
            f"{source}: {len(missing)} questions have no answer ({shown}); SQuAD v1.1 has "
            "none -- set data option version: '2.0' for data with unanswerable questions"
        )
