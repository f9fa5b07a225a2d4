"""``macsc overlap RUN ...``: the overlap of correct predictions between runs (Eq. 15, Figure 4,
SPEC 12).

``S_M`` is the set of ids run ``M`` gets right on one split, read from its
``predictions-<split>.jsonl``: ``correct: true`` (classification: the fused prediction is the
gold label; SQuAD: exact match), or, for SQuAD with ``--metric f1``, the per-question ``f1`` at
or above ``--f1-threshold``. ``O(M1, M2) = |S1 ∩ S2| / |S1|``: asymmetric (row ``M1``, column
``M2``), 1 on the diagonal. The runs must cover the same ids of the same split.

When a run gets nothing right (``|S1| = 0``) its row is undefined (0/0): the table prints ``–``,
the CSV leaves the cells empty, the heatmap paints them grey, and a note says so; its column is
still defined (0 for every other run).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from macsc.analysis.runs import check_named_runs, display_name, parse_names, read_config
from macsc.errors import ConfigError, DataError

METRICS = ("em", "f1")


# ----------------------------------------------------------------------------- the math
def overlap_matrix(correct: Sequence[set]) -> list[list[float]]:
    """Eq. 15 for every ordered pair: ``O[i][j] = |S_i ∩ S_j| / |S_i|``; a row with
    ``|S_i| = 0`` is NaN throughout (undefined)."""
    matrix = []
    for first in correct:
        if not first:
            matrix.append([math.nan] * len(correct))
            continue
        matrix.append([len(first & second) / len(first) for second in correct])
    return matrix


# ------------------------------------------------------------------------ reading a run
def prediction_splits(folder: Path) -> list[str]:
    return sorted(
        p.name[len("predictions-") : -len(".jsonl")] for p in folder.glob("predictions-*.jsonl")
    )


def read_correct(
    path: Path, metric: str = "em", f1_threshold: float = 0.5
) -> tuple[set[str], set[str]]:
    """(every id, the ids predicted correctly) of one ``predictions-<split>.jsonl``.

    ``em``: the line's ``correct`` is true; ``f1``: its ``f1`` (0-1) is at least
    ``f1_threshold``. Ids are compared as text. A line repeated with the same verdict (a DDP
    sampler pads with repeats) counts once; the same id judged both ways is a DataError.
    """
    ids: set[str] = set()
    right: set[str] = set()
    verdicts: dict[str, bool] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not valid JSON ({error})") from error
            if not isinstance(record, dict) or "id" not in record:
                raise DataError(f"{path} line {number}: a prediction needs an 'id'")
            key = str(record["id"])
            verdict = _verdict(record, metric, f1_threshold, f"{path} line {number}")
            if verdicts.setdefault(key, verdict) != verdict:
                raise DataError(f"{path}: id {key!r} appears twice, judged right and wrong")
            ids.add(key)
            if verdict:
                right.add(key)
    if not ids:
        raise DataError(f"{path} holds no predictions")
    return ids, right


def _verdict(record: dict[str, Any], metric: str, threshold: float, where: str) -> bool:
    if metric == "f1":
        value = record.get("f1")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(
                f"{where}: no per-line 'f1' (only SQuAD predictions have one); use --metric em"
            )
        return value >= threshold
    value = record.get("correct")
    if value is None and record.get("gold") is None:
        raise DataError(
            f"{where}: 'correct' is null because the split has no gold labels or answers (a "
            "predict run on an unlabelled split): compare runs evaluated on a labelled split "
            "(`macsc validate`, or predict with --data.init_args.predict_on validation)"
        )
    if value is None:
        raise DataError(
            f"{where}: 'correct' is null, so there is no right or wrong to compare "
            "(generation tasks such as CommonGen)"
        )
    if not isinstance(value, bool):
        raise DataError(f"{where}: 'correct' should be true or false, got {value!r}")
    return value


def choose_split(folders: list[Path], split: str | None) -> str:
    """The split every run has predictions for: ``split`` when given, else the one they share."""
    available = {folder: prediction_splits(folder) for folder in folders}
    for folder, splits in available.items():
        if not splits:
            raise DataError(
                f"{folder} has no predictions-<split>.jsonl (`macsc validate` or `macsc test` "
                "writes it)"
            )
    if split is not None:
        for folder, splits in available.items():
            if split not in splits:
                raise DataError(
                    f"{folder} has no predictions-{split}.jsonl (it has {', '.join(splits)})"
                )
        return split
    shared = set.intersection(*(set(s) for s in available.values()))
    if not shared:
        listing = "; ".join(f"{f}: {', '.join(s)}" for f, s in available.items())
        raise DataError(f"the runs cover different splits ({listing}); they must share one")
    if len(shared) > 1:
        raise DataError(
            f"the runs have predictions for several splits ({', '.join(sorted(shared))}); "
            "choose one with --split"
        )
    return shared.pop()


def _check_same_ids(labels: list[str], id_sets: list[set[str]], split: str) -> None:
    first_label, first = labels[0], id_sets[0]
    for label, ids in zip(labels[1:], id_sets[1:], strict=True):
        if ids == first:
            continue
        only_first = sorted(first - ids)[:3]
        only_other = sorted(ids - first)[:3]
        details = []
        if only_first:
            details.append(f"only in {first_label}: {', '.join(map(repr, only_first))}")
        if only_other:
            details.append(f"only in {label}: {', '.join(map(repr, only_other))}")
        raise DataError(
            f"the runs cover different ids on split {split!r}: {first_label} has {len(first)}, "
            f"{label} has {len(ids)} ({'; '.join(details)}); compare runs evaluated on the same data"
        )


def run_labels(folders: list[Path], names: dict[Path, str]) -> list[str]:
    """``--name`` labels, else names from the configs (``RoBERTa-base T+I+A+V``), else the
    TensorBoard run name; a name two runs share gets the TensorBoard name appended."""
    labels = []
    for folder in folders:
        label = names.get(folder.resolve())
        if label is None:
            try:
                label = display_name(read_config(folder))
            except DataError:
                label = None
        labels.append(label or f"{folder.parent.name}/{folder.name}")
    shared = {label for label in labels if labels.count(label) > 1}
    for index, label in enumerate(labels):
        if label in shared and folders[index].resolve() not in names:
            labels[index] = f"{label} [{folders[index].parent.name}/{folders[index].name}]"
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two runs have the same name {labels}; give distinct --name labels")
    return labels


def compute_overlap(
    runs: list[str | Path],
    names: list[str] | None = None,
    split: str | None = None,
    metric: str = "em",
    f1_threshold: float = 0.5,
) -> tuple[list[str], list[int], int, list[list[float]], str]:
    """(labels, |S| per run, number of ids, O, split) for ``runs`` (run folders)."""
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {METRICS}, got {metric!r}")
    if metric == "f1" and not 0.0 <= f1_threshold <= 1.0:
        raise ConfigError(f"--f1-threshold is an F1 between 0 and 1, got {f1_threshold}")
    folders = [Path(run) for run in runs]
    if len(folders) < 2:
        raise ConfigError("give at least two runs to compare")
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"run folder {str(folder)!r} does not exist")
    named = parse_names(names)
    check_named_runs(named, folders)
    labels = run_labels(folders, named)
    split = choose_split(folders, split)
    read = [read_correct(f / f"predictions-{split}.jsonl", metric, f1_threshold) for f in folders]
    _check_same_ids(labels, [ids for ids, _ in read], split)
    correct = [right for _, right in read]
    return labels, [len(s) for s in correct], len(read[0][0]), overlap_matrix(correct), split


# ------------------------------------------------------------------------------- output
def format_table(labels: list[str], matrix: list[list[float]]) -> str:
    width = max(len(label) for label in labels)
    cell = max(6, *(len(label) for label in labels))
    lines = [" " * width + "  " + "  ".join(label.rjust(cell) for label in labels)]
    for label, row in zip(labels, matrix, strict=True):
        values = ["–" if math.isnan(v) else f"{v:.2f}" for v in row]
        lines.append(label.ljust(width) + "  " + "  ".join(v.rjust(cell) for v in values))
    return "\n".join(lines)


def write_csv(path: str | Path, labels: list[str], matrix: list[list[float]]) -> None:
    """The matrix with the run names as the header row and the first column (row = M1)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", *labels])
        for label, row in zip(labels, matrix, strict=True):
            writer.writerow([label, *("" if math.isnan(v) else f"{v:.6f}" for v in row)])


#: the longest line of a run's name in the heatmap; longer names are wrapped
LABEL_WIDTH = 28


def wrap_label(label: str, width: int = LABEL_WIDTH) -> str:
    """``label`` on lines of at most ``width`` characters, broken after a space, a comma or an
    opening parenthesis where it can (a run name such as ``MiniLM T+I+A+V
    prototypes=mixed(image=...,audio=gaussian)`` has few spaces), inside a word where not."""
    import re

    lines = [""]
    for piece in re.findall(r"[^ ,(]+[ ,(]*|[ ,(]+", label):
        while len(piece.rstrip()) > width:  # a word longer than a line: cut it
            if lines[-1]:
                lines.append("")
            lines[-1], piece = piece[:width], piece[width:]
            lines.append("")
        if len((lines[-1] + piece).rstrip()) > width and lines[-1]:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines if line.strip())


def overlap_heatmap(labels: list[str], matrix: list[list[float]], title: str) -> Any:
    """A matplotlib figure of ``O`` like the paper's Figure 4, values written in the cells;
    run names wrapped at :data:`LABEL_WIDTH` characters."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.ma.masked_invalid(np.array(matrix, dtype=float))
    size = len(labels)
    wrapped = [wrap_label(label) for label in labels]
    lines = max(text.count("\n") + 1 for text in wrapped)
    cell = max(0.8, 0.25 * lines)  # inches per row and column: room for a wrapped name
    figure, axes = plt.subplots(figsize=(cell * size + 4, cell * size + 0.12 * lines + 2))
    colours = plt.get_cmap("Blues").with_extremes(bad="lightgrey")
    image = axes.imshow(values, cmap=colours, vmin=0.0, vmax=1.0)
    axes.set_xticks(range(size), wrapped, rotation=90)
    axes.set_yticks(range(size), wrapped)
    axes.set_xlabel("M2")
    axes.set_ylabel("M1")
    axes.set_title(title)
    for row in range(size):
        for col in range(size):
            value = matrix[row][col]
            text = "–" if math.isnan(value) else f"{value:.2f}"
            colour = "white" if not math.isnan(value) and value > 0.6 else "black"
            axes.text(col, row, text, ha="center", va="center", color=colour, fontsize=9)
    figure.colorbar(image, ax=axes, label="O(M1, M2) = |S1 ∩ S2| / |S1|")
    figure.tight_layout()
    return figure
