"""``macsc report RUN ...``: our finished runs beside the paper's numbers, as Markdown tables
shaped like the paper's Tables 1-7.

A run fills the cells of the row whose id its ``config.yaml`` gives (:func:`macsc.analysis.runs.row_id`,
or ``--name RUN=ROW``) in every table that has that row, in the columns of its task and
``data_fraction``, from its ``metrics-<split>.json``. Each cell reads ``ours / paper (ours -
paper)`` in the paper's units (the scales are documented in ``macsc/analysis/paper_results.json``); a cell
filled by several runs with the same fine-tuning settings shows their mean and how many; one
filled by runs whose settings differ (a baseline's grid, SPEC 10) shows the best dev score over
the settings, marked ``†``, and a note under the table names the chosen point; ``–`` marks a
cell no run filled. Under the tables: which runs filled which cells, and why the others filled
none.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from macsc.analysis.runs import (
    Run,
    check_named_runs,
    data_fraction,
    find_run_folders,
    load_run,
    max_train_examples,
    metric_value,
    parse_names,
    row_id,
    task_key,
    training_settings,
)
from macsc.errors import ConfigError

DASH = "–"
GRID_MARK = "†"


def paper_results() -> dict[str, Any]:
    """The paper's numbers (``macsc/analysis/paper_results.json``)."""
    text = (
        resources.files("macsc.analysis").joinpath("paper_results.json").read_text(encoding="utf-8")
    )
    return json.loads(text)


def row_ids(tables: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Every row id (and alias) -> the tables it is a row of."""
    ids: dict[str, list[int]] = {}
    for table in tables:
        for row in table["rows"]:
            for name in [row["id"], *row.get("aliases", [])]:
                ids.setdefault(name, []).append(table["table"])
    return ids


def _row_matches(row: dict[str, Any], identity: str) -> bool:
    return identity == row["id"] or identity in row.get("aliases", [])


# ------------------------------------------------------------------------- matching runs
@dataclass
class Fill:
    """One value of one run for one cell, in the paper's units."""

    table: int
    row: str
    column: str
    value: float
    source: str  # "metrics-validation.json (validate, step 630)"
    settings: tuple[tuple[str, Any], ...] = ()  # the run's fine-tuning settings


@dataclass
class RunOutcome:
    run: Run
    identity: str | None
    fills: list[Fill] = field(default_factory=list)
    reason: str | None = None  # why nothing was filled


def _source(split: str, record: dict[str, Any]) -> str:
    stage = record.get("stage", "?")
    step = record.get("global_step")
    return f"metrics-{split}.json ({stage}" + (f", step {step})" if step is not None else ")")


def _find_metric(run: Run, column: dict[str, Any]) -> tuple[float, str] | str:
    """(value in the paper's units, source) or the reason there is none."""
    splits = column.get("split")
    candidates = [splits] if isinstance(splits, str) else (splits or sorted(run.metrics))
    for split in candidates:
        record = run.metrics.get(split)
        if record is None:
            continue
        value = metric_value(record, column["metric"])
        if value is not None:
            return value * column.get("scale", 1), _source(split, record)
    have = ", ".join(f"metrics-{s}.json" for s in sorted(run.metrics)) or "no metrics file"
    where = " or ".join(f"metrics-{s}.json" for s in candidates) or "any metrics file"
    return f"no {column['metric']} in {where} (it has {have})"


def match_run(
    run: Run, tables: list[dict[str, Any]], selected: set[int], name: str | None
) -> RunOutcome:
    """The cells ``run`` fills in the ``selected`` tables, or the reason it fills none."""
    if run.config is None and name is None:
        reason = run.problems.get("config.yaml") or "no config.yaml"
        return RunOutcome(run, None, reason=f"{reason}; name its row with --name RUN=ROW")
    identity = name or row_id(run.config or {})
    if not run.metrics:
        problems = "; ".join(run.problems.values())
        return RunOutcome(
            run,
            identity,
            reason=problems
            or "no metrics-<split>.json yet (`macsc validate` or `macsc test` writes it)",
        )
    metrics_task = next(iter(run.metrics.values())).get("task")
    task = task_key(run.config, metrics_task)
    fraction = data_fraction(run.config)
    cap = max_train_examples(run.config)  # a smoke test's cut: no column of the paper's
    settings = training_settings(run.config)
    outcome = RunOutcome(run, identity)
    task_tables, row_tables, missing = [], [], []
    for table in tables:
        columns = [
            c
            for c in table["columns"]
            if c.get("task") == task
            and abs(c.get("fraction", 1.0) - fraction) < 1e-9
            and cap is None
        ]
        if not columns:
            continue
        task_tables.append(table["table"])
        row = next((r for r in table["rows"] if _row_matches(r, identity)), None)
        if row is None:
            continue
        row_tables.append(table["table"])
        if table["table"] not in selected:
            continue
        for column in columns:
            found = _find_metric(run, column)
            if isinstance(found, str):
                missing.append(found)
                continue
            outcome.fills.append(Fill(table["table"], row["id"], column["id"], *found, settings))
    if not outcome.fills:
        where = f" at data_fraction {fraction:g}" if fraction != 1.0 else ""
        where += f" on at most {cap} training examples (max_train_examples)" if cap else ""
        outcome.reason = _why_unmatched(
            identity, task, where, task_tables, row_tables, missing, selected, tables
        )
    return outcome


def _why_unmatched(
    identity: str,
    task: str | None,
    where: str,
    task_tables: list[int],
    row_tables: list[int],
    missing: list[str],
    selected: set[int],
    tables: list[dict[str, Any]],
) -> str:
    if task is None:
        return "its config names no data module and its metrics files no task"
    if not task_tables:
        return f"task {task.removeprefix('other/')}{where} is in none of the paper's tables"
    if not row_tables:
        candidates = [r["id"] for t in tables if t["table"] in task_tables for r in t["rows"]]
        near = difflib.get_close_matches(identity, candidates, n=2, cutoff=0.5)
        hint = f"; nearest: {', '.join(near)}" if near else ""
        return (
            f"row {identity} is not a row of Table {' or '.join(map(str, task_tables))} "
            f"({task}){hint}; if the run stands for a row, name it with --name RUN=ROW"
        )
    if not set(row_tables) & selected:
        return f"it fills Table {', '.join(map(str, row_tables))} only, not selected with --table"
    return "; ".join(dict.fromkeys(missing))


# ------------------------------------------------------------------------------- rendering
def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _fmt_diff(value: float, decimals: int) -> str:
    text = f"{value:+.{decimals}f}"
    return "+" + text[1:] if text.startswith("-") and float(text) == 0 else text


@dataclass
class Cell:
    """Our value of one cell: the mean of ``runs`` runs with one setting. Where the cell's runs
    were ``grid`` settings, ``choice`` names the one kept (``SST-2: lr 3e-05``: the column it
    was chosen by and the settings in which the points differ)."""

    value: float
    runs: int
    grid: int = 1
    choice: str = ""


def _format_setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _point_label(chosen: tuple, points: list[tuple]) -> str:
    """The settings in which the points differ, at the chosen point: ``lr 3e-05, batch 4``."""
    varying = [
        index
        for index, (_, value) in enumerate(chosen)
        if any(p[index][1] != value for p in points)
    ]
    return ", ".join(f"{chosen[i][0]} {_format_setting(chosen[i][1])}" for i in varying)


def table_cells(table: dict[str, Any], fills: list[Fill]) -> dict[tuple[str, str], Cell]:
    """Our value of each (row, column) of ``table``. Runs with the same settings are repeats,
    averaged. Where the runs of a row differ in their settings (a baseline's grid), the setting
    with the best dev score fills the cells, chosen per task by its main column (F1 for SQuAD,
    CIDEr for CommonGen: ``main`` in ``paper_results.json``) for all the task's columns, as
    the baselines' papers chose their settings (SPEC 10)."""
    values: dict[tuple[str, str], dict[tuple, list[float]]] = {}
    for fill in fills:
        if fill.table == table["table"]:
            by_setting = values.setdefault((fill.row, fill.column), {})
            by_setting.setdefault(fill.settings, []).append(fill.value)
    tasks: dict[tuple[Any, float], list[dict[str, Any]]] = {}
    for column in table["columns"]:
        if "mean_of" not in column:
            tasks.setdefault((column["task"], column.get("fraction", 1.0)), []).append(column)
    cells: dict[tuple[str, str], Cell] = {}
    for row in table["rows"]:
        for columns in tasks.values():
            filled = [c for c in columns if (row["id"], c["id"]) in values]
            if not filled:
                continue
            judge = next((c for c in filled if c.get("main")), filled[0])
            scores = values[(row["id"], judge["id"])]
            best = max(scores, key=lambda point: sum(scores[point]) / len(scores[point]))
            points = list(dict.fromkeys(p for c in filled for p in values[(row["id"], c["id"])]))
            choice = f"{judge['label']}: {_point_label(best, points)}" if len(points) > 1 else ""
            for column in filled:
                kept = values[(row["id"], column["id"])].get(best)
                if kept:
                    cell = Cell(sum(kept) / len(kept), len(kept), len(points), choice)
                    cells[(row["id"], column["id"])] = cell
    return cells


def table_markdown(table: dict[str, Any], fills: list[Fill]) -> str:
    """One paper table with our values: each cell ``ours / paper (difference)``."""
    cells = table_cells(table, fills)
    header = list(table["row_header"]) + [c["label"] for c in table["columns"]]
    lines = [
        f"## Table {table['table']}. {table['title']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(table["row_header"]) + "---:|" * len(table["columns"]),
    ]
    notes: dict[str, list[str]] = {}  # note -> the rows it is about, so a shared note prints once
    for row in table["rows"]:
        ours: dict[str, float] = {}
        for column in table["columns"]:
            cell = cells.get((row["id"], column["id"]))
            if cell is not None:
                ours[column["id"]] = cell.value
            elif "mean_of" in column and all(c in ours for c in column["mean_of"]):
                ours[column["id"]] = sum(ours[c] for c in column["mean_of"]) / len(
                    column["mean_of"]
                )
        texts = []
        grids: dict[str, int] = {}  # the choice of each grid in this row -> its size
        for column in table["columns"]:
            decimals = column.get("decimals", 1)
            paper = row["values"].get(column["id"])
            paper_text = DASH if paper is None else _fmt(paper, decimals)
            if column["id"] not in ours:
                texts.append(f"{DASH} / {paper_text}")
                continue
            value = ours[column["id"]]
            text = _fmt(value, decimals)
            cell = cells.get((row["id"], column["id"]))
            if cell is not None and cell.grid > 1:
                text += GRID_MARK
                grids[cell.choice] = cell.grid
            if cell is not None and cell.runs > 1:
                text += f" ({cell.runs} runs)"
            text += f" / {paper_text}"
            if paper is not None:
                text += f" ({_fmt_diff(value - paper, decimals)})"
            texts.append(text)
        lines.append("| " + " | ".join([*row["cells"], *texts]) + " |")
        for key in ("baseline", "note"):
            if row.get(key):
                notes.setdefault(row[key], []).append(" ".join(row["cells"]))
        if grids:
            sizes = " or ".join(map(str, sorted(set(grids.values()))))
            note = (
                f"{GRID_MARK} the best dev score of {sizes} fine-tuning settings, chosen per task "
                f"as the baseline's paper chose its own (SPEC 10): {'; '.join(grids)}"
            )
            notes.setdefault(note, []).append(" ".join(row["cells"]))
    if notes:
        lines += ["", *(f"- {'; '.join(rows)}: {note}" for note, rows in notes.items())]
    return "\n".join(lines)


def runs_markdown(outcomes: list[RunOutcome], tables: list[dict[str, Any]]) -> str:
    labels = {
        (t["table"], c["id"]): f"Table {t['table']} {c['label']}"
        for t in tables
        for c in t["columns"]
    }
    matched = [o for o in outcomes if o.fills]
    unmatched = [o for o in outcomes if not o.fills]
    lines = [
        "## Runs",
        "",
        f"{len(outcomes)} run{'s' if len(outcomes) != 1 else ''} read: {len(matched)} matched, "
        f"{len(unmatched)} not matched.",
    ]
    if matched:
        lines += ["", "| run | row | cells | from |", "|---|---|---|---|"]
        for outcome in matched:
            cells = ", ".join(labels[(f.table, f.column)] for f in outcome.fills)
            sources = ", ".join(dict.fromkeys(f.source for f in outcome.fills))
            lines.append(f"| {outcome.run.path} | {outcome.identity} | {cells} | {sources} |")
        if any("(fit" in f.source for o in matched for f in o.fills):
            lines += [
                "",
                "A value from stage `fit` is the last validation during training; "
                "`macsc validate --ckpt_path <best checkpoint>` replaces it with the best "
                "checkpoint's.",
            ]
    if unmatched:
        lines += ["", "Not matched:", ""]
        for outcome in unmatched:
            lines.append(f"- {outcome.run.path}: {outcome.reason}")
    return "\n".join(lines)


def build_report(
    runs: list[str | Path], tables: Sequence[int] | None = None, names: list[str] | None = None
) -> tuple[str, list[RunOutcome]]:
    """The Markdown report of ``runs`` (run folders or folders holding them) for ``tables``
    (default all), with ``names`` (``RUN=ROW``) overriding the row a run stands for."""
    data = paper_results()
    all_tables = data["tables"]
    known = {t["table"] for t in all_tables}
    selected = set(tables or known)
    unknown = sorted(selected - known)
    if unknown:
        raise ConfigError(f"--table {unknown[0]}: the paper's tables are {sorted(known)}")
    folders = find_run_folders(runs)
    named = parse_names(names)
    check_named_runs(named, folders)
    ids = row_ids(all_tables)
    for label in named.values():
        if label not in ids:
            near = difflib.get_close_matches(label, list(ids), n=3, cutoff=0.4)
            raise ConfigError(
                f"--name: {label!r} is not a row id of the paper's tables"
                + (f"; nearest: {', '.join(near)}" if near else "")
                + " (`macsc report --list-rows` lists them)"
            )
    outcomes = [
        match_run(load_run(folder), all_tables, selected, named.get(folder.resolve()))
        for folder in folders
    ]
    fills = [fill for outcome in outcomes for fill in outcome.fills]
    parts = [
        "# MaCSC: our runs beside the paper's numbers",
        "",
        "Each cell: ours / paper (ours − paper), in the paper's units; "
        f"{DASH} where no run of ours fills the cell. Scales and sources: "
        "`macsc/analysis/paper_results.json`.",
    ]
    for table in all_tables:
        if table["table"] in selected:
            parts += ["", table_markdown(table, fills)]
    parts += ["", runs_markdown(outcomes, all_tables)]
    return "\n".join(parts) + "\n", outcomes


def list_rows() -> str:
    lines = []
    for table in paper_results()["tables"]:
        lines.append(f"Table {table['table']}. {table['title']}")
        for row in table["rows"]:
            lines.append(f"  {row['id']:<55} {' '.join(row['cells'])}")
    return "\n".join(lines)


def _table_numbers(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    numbers = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part.lower() == "all":
                return None
            if not part.isdigit():
                raise ConfigError(f"--table {value!r}: give table numbers, e.g. --table 1,4")
            numbers.append(int(part))
    return numbers
