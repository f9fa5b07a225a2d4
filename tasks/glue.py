"""GLUE tasks (SST-2, QNLI, QQP, MNLI, MRPC, STS-B) from the Hugging Face hub or local files.

Local files may be the official GLUE TSVs (each task's own header, tab-separated, no quoting),
CSV, JSON Lines or Parquet with the hub's column names. Labels follow the hub's ``glue`` order
(MNLI entailment=0, neutral=1, contradiction=2; QNLI entailment=0, not_entailment=1); a file may
give them as indices or as those names.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError, DataError
from macsc.paths import load_hub_dataset
from macsc.task import TaskSpec
from tasks.base import MaCSCDataModule, TextSplit

# One (where, row) pair per example: ``where`` names the line or row in error messages.
Rows = Iterable[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class TableFormat:
    """How one task's examples sit in a table (a file or a hub split).

    segments: for each segment column, the column names that may hold it (hub name first).
    label_columns: the names the label column may have.
    label_names: class names in label-index order; empty for a regression task.
    label_bins: regression only, the bin centres, also the valid label range.
    validation_splits / val_names: the validation split names and their display names.
    """

    name: str
    segments: tuple[tuple[str, ...], ...]
    label_columns: tuple[str, ...] = ("label",)
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)
    label_bins: tuple[float, ...] = ()
    validation_splits: tuple[str, ...] = ("validation",)
    val_names: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)

    @property
    def regression(self) -> bool:
        return not self.label_names

    @property
    def split_names(self) -> dict[str, list[str]]:
        """role -> split names."""
        return {
            "train": ["train"],
            "validation": list(self.validation_splits),
            "test": list(self.test_splits),
        }

    def task_spec(self) -> TaskSpec:
        if self.regression:
            return TaskSpec(
                kind="regression",
                num_labels=1,
                metrics=list(self.metrics),
                label_bins=[float(b) for b in self.label_bins],
                val_names=list(self.val_names),
            )
        return TaskSpec(
            kind="classification",
            num_labels=len(self.label_names),
            metrics=list(self.metrics),
            val_names=list(self.val_names),
            label_names=list(self.label_names),
        )

    def parse_label(self, value: Any, where: str) -> int | float | None:
        """A label as a class index or a float score; None for the hub's "no label" value -1."""
        number = _as_number(value)
        if number == -1:
            return None
        if self.regression:
            low, high = min(self.label_bins), max(self.label_bins)
            if number is not None and math.isfinite(number) and low <= number <= high:
                return float(number)
            raise DataError(f"{where}: label {value!r} is not a number in [{low:g}, {high:g}]")
        if number is not None and number == int(number) and 0 <= number < len(self.label_names):
            return int(number)
        if isinstance(value, str) and value.strip().lower() in self.label_names:
            return self.label_names.index(value.strip().lower())
        raise DataError(
            f"{where}: label {value!r} is not one of {list(range(len(self.label_names)))} "
            f"or {list(self.label_names)}"
        )


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


GLUE_FORMATS = {
    fmt.name: fmt
    for fmt in (
        TableFormat("sst2", (("sentence",),), label_names=("negative", "positive")),
        TableFormat(
            "qnli",
            (("question",), ("sentence",)),
            label_names=("entailment", "not_entailment"),
        ),
        TableFormat(
            "qqp",
            (("question1",), ("question2",)),
            label_columns=("label", "is_duplicate"),
            label_names=("not_duplicate", "duplicate"),
            metrics=("accuracy", "f1"),
        ),
        TableFormat(
            "mnli",
            (("premise", "sentence1"), ("hypothesis", "sentence2")),
            label_columns=("label", "gold_label"),
            label_names=("entailment", "neutral", "contradiction"),
            validation_splits=("validation_matched", "validation_mismatched"),
            val_names=("matched", "mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        TableFormat(
            "mrpc",
            (("sentence1", "#1 String"), ("sentence2", "#2 String")),
            label_columns=("label", "Quality"),
            label_names=("not_equivalent", "equivalent"),
            metrics=("accuracy", "f1"),
        ),
        TableFormat(
            "stsb",
            (("sentence1",), ("sentence2",)),
            label_columns=("label", "score"),
            metrics=("spearman", "pearson"),
            label_bins=(0, 1, 2, 3, 4, 5),
        ),
    )
}
GLUE_TASKS = tuple(GLUE_FORMATS)


def glue_format(task: str) -> TableFormat:
    """The format of a GLUE task by name: case-insensitive, ``sst-2`` and ``sts-b`` accepted."""
    key = task.strip().lower().replace("-", "")
    if key not in GLUE_FORMATS:
        raise ConfigError(f"unknown GLUE task {task!r}; choose one of {list(GLUE_TASKS)}")
    return GLUE_FORMATS[key]


# Reading tables.

#: columns that hold an example's id (hub ``idx``, GLUE TSV ``index``/``id``), written in records
ID_COLUMNS = ("idx", "index", "id")

SUFFIXES = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def read_table(path: Path) -> tuple[list[str], Rows]:
    """Column names and rows of a TSV, CSV, JSON (Lines) or Parquet file, chosen by suffix."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; use one of {sorted(SUFFIXES)} "
            "(GLUE TSV, CSV, JSON Lines, Parquet)"
        )
    if kind == "json":
        return _read_json(path)
    if kind == "parquet":
        return _read_parquet(path)
    # GLUE TSVs hold bare quote characters inside sentences: quoting must be off to read them.
    quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
    return _read_delimited(path, "\t" if kind == "tsv" else ",", quoting)


def _read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are a DataError naming the line (a leading
    byte-order mark, as in the GLUE MRPC TSVs, is dropped)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        data = error.object  # without the byte-order mark, which offsets count from
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte {data[error.start : error.start + 1]!r}, "
            f"{error.reason}); save the file as UTF-8"
        ) from error


def _read_delimited(path: Path, delimiter: str, quoting: int) -> tuple[list[str], Rows]:
    reader = csv.reader(
        io.StringIO(_read_utf8(path), newline=""), delimiter=delimiter, quoting=quoting
    )
    try:
        header = next(reader, None)
        lines = [(reader.line_num, fields) for fields in reader if fields]
    except csv.Error as error:
        message = f"{path}: cannot be read as {delimiter!r}-separated text: {error}"
        raise DataError(message) from error
    if not header:
        raise DataError(f"{path} is empty; expected a header row with column names")

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        for line, fields in lines:
            if len(fields) != len(header):
                raise DataError(
                    f"{path} line {line}: {len(fields)} fields, but the header has "
                    f"{len(header)} ({header}); check the separator and quoting"
                )
            yield f"{path} line {line}", dict(zip(header, fields, strict=True))

    return header, rows()


def _read_json(path: Path) -> tuple[list[str], Rows]:
    """JSON Lines (one object per line), or one JSON array of objects."""
    text = _read_utf8(path)
    if text.lstrip().startswith("["):
        records = [(f"{path} item {i}", row) for i, row in enumerate(_json(text, str(path)))]
    else:
        records = [
            (f"{path} line {n}", _json(line, f"{path} line {n}"))
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with named fields, got {row!r:.60}")
    columns = list(records[0][1]) if records else []
    return columns, records


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error}); write one object per line") from error


def _read_parquet(path: Path) -> tuple[list[str], Rows]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot be read as Parquet ({error})") from error
    rows = ((f"{path} row {i}", row) for i, row in enumerate(table.to_pylist()))
    return table.column_names, rows


def _find_column(names: tuple[str, ...], columns: list[str]) -> str | None:
    return next((name for name in names if name in columns), None)


def rows_to_split(
    fmt: TableFormat, name: str, source: str, columns: list[str], rows: Rows
) -> TextSplit:
    """Read a table into a :class:`TextSplit`; the label column may be absent in test splits."""
    segment_columns = [_find_column(names, columns) for names in fmt.segments]
    label_column = _find_column(fmt.label_columns, columns)
    id_column = _find_column(ID_COLUMNS, columns)
    needs_labels = name not in fmt.test_splits
    if not columns:
        raise DataError(f"{source} is empty; expected a header or records with named columns")
    if None in segment_columns or (needs_labels and label_column is None):
        expected = [" or ".join(names) for names in fmt.segments]
        expected.append(" or ".join(fmt.label_columns) + " (absent in test files)")
        if GLUE_FORMATS.get(fmt.name) is fmt:
            advice = "see the task's official GLUE TSV header or the Hugging Face names"
        else:  # the user's own table
            advice = (
                "rename the file's columns, or name yours in data option table_format "
                "(segments, label_columns)"
            )
        raise DataError(
            f"{source} has columns {columns}, but the {fmt.name} {name} split needs the columns "
            f"{expected}; {advice}"
        )
    segments: list[list[str]] = [[] for _ in segment_columns]
    labels, ids = [], []
    for where, row in rows:
        if id_column is not None:
            ids.append(_as_id(row.get(id_column)))
        for texts, column in zip(segments, segment_columns, strict=True):
            text = row.get(column)
            if not isinstance(text, str):
                raise DataError(f"{where}: column {column!r} holds {text!r}, not text")
            texts.append(text)
        if label_column is not None:
            labels.append(fmt.parse_label(row.get(label_column), where))
    return TextSplit(
        name, source, segments, _all_or_none(labels, source), ids if id_column else None
    )


def _as_id(value: Any) -> Any:
    """An example id as JSON writes it: digit strings (TSV) as numbers."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _all_or_none(labels: list[int | float | None], source: str) -> list | None:
    """All labels, or None when the split is unlabelled (no column, or the hub's -1 throughout)."""
    unlabelled = sum(label is None for label in labels)
    if labels and unlabelled == len(labels):
        return None
    if unlabelled:
        first = next(i for i, label in enumerate(labels) if label is None)
        raise DataError(
            f"{source}: example {first} has label -1 (no label) while others are labelled; "
            "remove unlabelled rows from a training or validation file"
        )
    return labels or None


# The data modules.


class TableDataModule(MaCSCDataModule):
    """A task whose examples are rows of a table, described by a :class:`TableFormat`.

    Each split comes from ``data_files[split]`` when ``data_files`` is given, else from the
    Hugging Face hub dataset ``hub_name`` (config ``hub_config``).
    """

    def __init__(
        self,
        table_format: TableFormat,
        data_files: dict[str, str] | None = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.table_format = table_format
        self.data_files = _checked_data_files(data_files, table_format)
        if self.data_files is None and not hub_name:
            raise ConfigError(
                f"the {table_format.name} data has no source: set data_files (one file per "
                "split) or hub_name"
            )
        self.hub_name = hub_name
        self.hub_config = hub_config
        self._hub_dataset: Any = None

    @property
    def task(self) -> str:
        """The task's name in run summaries (``metrics-<split>.json``): the format's name."""
        return self.table_format.name

    @property
    def task_spec(self) -> TaskSpec:
        return self.table_format.task_spec()

    def split_names(self, role: str) -> list[str]:
        return self.table_format.split_names[role]

    def input_fields(self) -> list[str]:
        """One field per segment, named by its first column name (``["premise", "hypothesis"]``)."""
        return [names[0] for names in self.table_format.segments]

    def load_split(self, name: str) -> TextSplit:
        if self.data_files is None:
            return self._hub_split(name)
        if name not in self.data_files:
            raise self.missing_split(name, sorted(self.data_files))
        path = Path(self.data_files[name]).expanduser()
        if not path.is_file():
            raise DataError(f"{path} does not exist; check data_files.{name}")
        columns, rows = read_table(path)
        return rows_to_split(self.table_format, name, str(path), columns, rows)

    def _hub_split(self, name: str) -> TextSplit:
        source = f"{self.hub_name}/{self.hub_config}" if self.hub_config else self.hub_name
        dataset = self._load_hub(source)
        if name not in dataset:
            raise DataError(f"{source} has no split {name!r}; it has {list(dataset)}")
        split = dataset[name]
        columns = list(split.column_names)
        values = [list(split[column]) for column in columns]
        rows = (
            (f"{source} {name} row {i}", dict(zip(columns, row, strict=True)))
            for i, row in enumerate(zip(*values, strict=True))
        )
        return rows_to_split(self.table_format, name, f"{source} {name}", columns, rows)

    def _load_hub(self, source: str) -> Any:
        if self._hub_dataset is None:
            self._hub_dataset = load_hub_dataset(
                self.hub_name,
                self.hub_config,
                what=source,
                advice="pass data_files={split: PATH} with local files (GLUE TSV, CSV, JSON "
                "Lines or Parquet), or run once online so the hub cache holds it",
            )
        return self._hub_dataset


def _checked_data_files(
    data_files: dict[str, str] | None, fmt: TableFormat
) -> dict[str, str] | None:
    if data_files is None:
        return None
    known = [name for names in fmt.split_names.values() for name in names]
    unknown = sorted(set(data_files) - set(known))
    if unknown:
        raise ConfigError(
            f"data_files has unknown split names {unknown}; the {fmt.name} task's splits are "
            f"{known}"
        )
    return {name: str(path) for name, path in data_files.items()}


class GLUEDataModule(TableDataModule):
    """One GLUE task: ``sst2``, ``qnli``, ``qqp``, ``mnli``, ``mrpc`` or ``stsb``.

    Args:
        task: the task name (case-insensitive; ``sst-2`` and ``sts-b`` accepted).
        data_files: split -> local file; when None, the task is loaded from the hub. Splits are
            ``train``, ``validation``, ``test``; MNLI has ``validation_matched``,
            ``validation_mismatched``, ``test_matched``, ``test_mismatched``.
        hub_name: the hub dataset holding GLUE (its config is the task name).
        The other options are :class:`~tasks.base.MaCSCDataModule`'s.
    """

    def __init__(
        self,
        task: str = "sst2",
        data_files: dict[str, str] | None = None,
        hub_name: str = "nyu-mll/glue",
        **options: Any,
    ) -> None:
        table_format = glue_format(task)
        super().__init__(
            table_format,
            data_files=data_files,
            hub_name=hub_name,
            hub_config=table_format.name,
            **options,
        )

    @property
    def run_name(self) -> str:
        """``glue_<task>``: the run folders of the shipped configs (``runs/glue_sst2/``)."""
        return f"glue_{self.table_format.name}"
