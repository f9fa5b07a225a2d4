"""The examples of one split, as read (:class:`TextSplit`) and as tokenised
(:class:`EncodedSplit`, what the loaders read)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from macsc.errors import ConfigError, DataError
from tasks.token_cache import RaggedColumn

#: the roles a split plays: training, validation, test
ROLES = ("train", "validation", "test")


def check_split_options(data_fraction: float, test_on: str, predict_on: str, **sizes: int) -> None:
    """A one-line ConfigError for a data option out of range: ``data_fraction`` outside (0, 1],
    ``test_on``/``predict_on`` not a split role, or one of ``sizes`` below 1."""
    if not 0.0 < data_fraction <= 1.0:
        raise ConfigError(
            f"data option data_fraction={data_fraction} is outside (0, 1]; "
            "use e.g. 0.05 for the paper's 5% low-resource setting or 1.0 for all data"
        )
    for option, value in (("test_on", test_on), ("predict_on", predict_on)):
        if value not in ROLES[1:]:
            raise ConfigError(
                f"data option {option}={value!r} is unknown; choose 'validation' or 'test'"
            )
    for option, value in sizes.items():
        if value < 1:
            raise ConfigError(f"data option {option}={value} must be a positive integer")


def missing_split_error(
    name: str, available: list[str], is_test: bool, stage: str | None, roles: dict[str, str]
) -> DataError:
    """The error for split ``name``, missing from ``data_files``; for a test split it names the
    option (``roles``: ``predict_on``/``test_on`` -> the role it now reads) that would evaluate
    or predict on the validation split instead, for the running ``stage`` (None: any)."""
    advice = f"add data_files.{name}=PATH"
    if is_test:
        reads = {"predict_on": "predict", "test_on": "test"}
        options = [
            f"--data.init_args.{option} validation"
            for option, role in roles.items()
            if role == "test" and stage in (reads[option], None)
        ]
        advice += f", or use the validation split: {' or '.join(options)}" if options else ""
    return DataError(f"no {name!r} split: data_files has only {available}; {advice}")


def input_records(inputs: Sequence[Any], fields: list[str]) -> list[dict[str, Any]]:
    """Raw inputs of a trained model as one dict per input, keyed by ``fields`` (the text
    segments, e.g. ``["question", "sentence"]``): each input is a string (a one-field task), a
    list or tuple of one string per field, or a mapping with the fields (and optionally an
    ``id``, kept); a DataError names the first input that is none of these."""
    if isinstance(inputs, str | Mapping):
        inputs = [inputs]
    shape = " or ".join(
        (["a string"] if len(fields) == 1 else [])
        + [f"[{', '.join(fields)}]", "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"]
    )
    records = []
    for position, given in enumerate(inputs):
        if isinstance(given, str) and len(fields) == 1:
            record: dict[str, Any] = {fields[0]: given}
        elif isinstance(given, Sequence) and not isinstance(given, str):
            record = dict(zip(fields, given, strict=False)) if len(given) == len(fields) else {}
        elif isinstance(given, Mapping):
            record = {key: given[key] for key in (*fields, "id") if key in given}
        else:
            record = {}
        if not all(isinstance(record.get(field), str) for field in fields):
            raise DataError(
                f"input {position} ({given!r:.80}) is not an input of this model: give {shape}"
            )
        records.append(record)
    if not records:
        raise DataError("no inputs given: give at least one")
    return records


@dataclass
class TextSplit:
    """The raw examples of one split.

    name: the split's name (``train``, ``validation_matched``, ...).
    source: where it was read from (a file or a hub dataset), named in error messages.
    segments: one list of ``N`` texts per segment column (two for pair tasks).
    labels: ``N`` labels (int class indices or float scores), or None when the split is unlabelled.
    ids: ``N`` ids of the examples as the source gives them (GLUE's ``idx``), or None; written
        in prediction records, which otherwise use the example's position. The data module
        fills None with each example's position in its split (before ``data_fraction``), so
        every example read has an id (image features are keyed by it).
    """

    name: str
    source: str
    segments: list[list[str]]
    labels: list[int] | list[float] | None = None
    ids: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.segments[0])

    def subset(self, indices: list[int]) -> TextSplit:
        """The examples at ``indices``, in that order."""
        return TextSplit(
            self.name,
            self.source,
            [[texts[i] for i in indices] for texts in self.segments],
            None if self.labels is None else [self.labels[i] for i in indices],
            None if self.ids is None else [self.ids[i] for i in indices],
        )


class EncodedSplit(Dataset):
    """Tokenised examples of one split: one dict of values per item, unpadded.

    columns: field name -> ``N`` values; ``input_ids`` (and ``token_type_ids``) hold one
    sequence of ints per item (a list, or an array mapped from the token cache), every other
    field one scalar per example (``example_index``, ``labels``, ...).
    """

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: values[index] for name, values in self.columns.items()}

    def lengths(self) -> list[int]:
        input_ids = self.columns["input_ids"]
        if isinstance(input_ids, RaggedColumn):
            return input_ids.lengths()
        return [len(ids) for ids in input_ids]
