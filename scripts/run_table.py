#!/usr/bin/env python
"""Run a whole table of the paper: `macsc fit` then `macsc validate` (best checkpoint) per run.

    python scripts/run_table.py --table 1              # run Table 1 here, one run after another
    python scripts/run_table.py --table 1,4 --dry-run  # print the commands
    python scripts/run_table.py --table 2 --slurm      # write an sbatch array script (one task a run)
    python scripts/run_table.py --table 1 -- --trainer.devices 4   # extra options for every run
    make table T=1 [ARGS=--dry-run]

The rows are data: scripts/table_rows.yaml names, for each row of each table, the base config of
each column and the overlays (files of lightning_configs/). Runs land in
runs/tables/<column>/<row>/version_0, so `macsc report runs/tables` fills the paper's tables; a
finished run (its validate.done marker) is not run again, which also makes a row two tables share
run once. A row whose config does not exist yet is skipped with "... is not available yet".

A row with a ``grid`` (a baseline whose paper chose its fine-tuning settings on dev, SPEC 10) is
one run per point of the grid, in runs/tables/<column>/<row>/<point>/version_0 (``lr=2e-5,bs=4``);
`macsc report` keeps the best dev score of the points. Every run's resolved batch size, learning
rate and length are printed beside its commands.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path("lightning_configs")
ROWS_FILE = Path(__file__).resolve().with_name("table_rows.yaml")
DEFAULT_RUNS = "runs/tables"
FIT_DONE, VALIDATE_DONE = "fit.done", "validate.done"
#: how a grid point's folder name spells an option (others: the option's last component)
SHORT_NAMES = {"model.optimizer.learning_rate": "lr", "data.init_args.batch_size": "bs"}


@dataclass
class PlannedRun:
    """One row of one table in one column (one point of the row's grid, if it has one).
    configs: paths relative to the repository root; point: option -> value, given on the
    command line after the configs; index: the point's place in the grid of grid_size."""

    tables: list[int]
    row: str
    column: str
    configs: list[Path]
    skip: str | None = None
    point: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    grid_size: int = 1

    @property
    def name(self) -> str:
        """``<column>/<row>[/<point>]`` with the row id's slashes made underscores: the
        logger's name."""
        name = f"{self.column}/{self.row.replace('/', '_')}"
        return f"{name}/{self.point_label}" if self.point else name

    @property
    def point_label(self) -> str:
        """``lr=2e-5,bs=4``: the grid point, as its folder is named."""
        return ",".join(f"{short_name(k)}={format_value(v)}" for k, v in self.point.items())

    @property
    def label(self) -> str:
        """``Table 1 <row> / <column>``, and which point of how many for a grid's run."""
        where = f"Table {', '.join(map(str, self.tables))} {self.row} / {self.column}"
        if self.grid_size > 1:
            where += f" (grid point {self.index + 1} of {self.grid_size}: {self.point_label})"
        return where


def short_name(option: str) -> str:
    return SHORT_NAMES.get(option, option.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    """Numbers as written by hand: 2e-05 -> 2e-5, 0.0001 -> 1e-4, 0.06 -> 0.06, 16 -> 16."""
    if isinstance(value, float) and 0 < abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid_points(row: dict) -> list[dict[str, Any]]:
    """Every point of a row's ``grid`` ({option: [values]}), the first option varying slowest;
    one empty point for a row without a grid."""
    grid = row.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SystemExit(
            f"run_table.py: error: row {row['row']}: grid should map options to non-empty lists "
            "of values, e.g. grid: {model.optimizer.learning_rate: [2.0e-5, 3.0e-5]}"
        )
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def row_overlays(row: dict, base: str) -> list[str]:
    """The row's overlays for a column with base config ``base``: an entry is a file, or a
    mapping from base config to file where the overlay depends on it (BERT's SQuAD v1.1 and
    v2.0 settings differ)."""
    names = []
    for entry in row.get("overlays", []):
        if isinstance(entry, dict):
            if base not in entry:
                raise SystemExit(
                    f"run_table.py: error: row {row['row']}: an overlay given per base config "
                    f"names none for {base} (it names {', '.join(entry)}); add {base}: FILE"
                )
            entry = entry[base]
        names.append(entry)
    return names


def load_rows(path: Path = ROWS_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def parse_tables(value: str, known: list[int]) -> list[int]:
    if value.strip().lower() == "all":
        return known
    tables = []
    for part in value.split(","):
        if not part.strip().isdigit() or int(part) not in known:
            raise SystemExit(
                f"run_table.py: error: --table {value!r}: the tables are {known} or all"
            )
        tables.append(int(part))
    return tables


def plan(spec: dict, tables: list[int], root: Path = ROOT) -> list[PlannedRun]:
    """Every run of ``tables``, each (column, row, grid point) once, in table order."""
    runs: dict[str, PlannedRun] = {}  # by name: <column>/<row>[/<point>]
    for number in tables:
        table = spec["tables"][number]
        for row in table["rows"]:
            columns = table["columns"] or [None]
            for column in columns:
                skip = row.get("skip")
                configs: list[Path] = []
                if column is not None:
                    setting = spec["columns"][column]
                    names = [
                        setting["base"],
                        *setting.get("overlays", []),
                        *row_overlays(row, setting["base"]),
                    ]
                    configs = [CONFIGS / name for name in names]
                    missing = [str(c) for c in configs if not (root / c).is_file()]
                    if skip is None and missing:
                        kind = "base config" if missing[0] == str(configs[0]) else "overlay"
                        skip = f"{kind} {missing[0]} is not available yet"
                points = [{}] if skip else grid_points(row)
                for index, point in enumerate(points):
                    run = PlannedRun(
                        [number],
                        row["row"],
                        column or "-",
                        configs,
                        skip,
                        point,
                        index,
                        len(points),
                    )
                    if run.name in runs:
                        runs[run.name].tables.append(number)
                    else:
                        runs[run.name] = run
    return list(runs.values())


def log_options(run: PlannedRun, runs_dir: str) -> list[str]:
    """Where a run writes: its logger folder runs_dir/<column>/<row>/version_0, and its
    default_root_dir (where Lightning's SLURM requeue saves and finds hpc_ckpt_*.ckpt)."""
    return [
        "--trainer.default_root_dir",
        run_root(run, runs_dir),
        "--trainer.logger.init_args.save_dir",
        runs_dir,
        "--trainer.logger.init_args.name",
        run.name,
        "--trainer.logger.init_args.version",
        "0",
    ]


def run_root(run: PlannedRun, runs_dir: str) -> str:
    return f"{runs_dir}/{run.name}"


def log_dir(run: PlannedRun, runs_dir: str) -> str:
    return f"{run_root(run, runs_dir)}/version_0"


def point_options(run: PlannedRun) -> list[str]:
    """The grid point as command-line options (after the configs, so they win over them)."""
    return [item for key, value in run.point.items() for item in (f"--{key}", format_value(value))]


def commands(run: PlannedRun, runs_dir: str, extra: list[str], best: str) -> list[list[str]]:
    """[fit, validate] argument lists (without the ``macsc`` program)."""
    configs = [item for config in run.configs for item in ("--config", str(config))]
    configs += point_options(run)
    where = log_options(run, runs_dir)
    return [
        ["fit", *configs, *where, *extra],
        ["validate", *configs, *where, *extra, "--ckpt_path", best],
    ]


# ------------------------------------------------------------------- what a run trains with
def merge(into: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``into`` as LightningCLI composes ``--config`` files: mappings
    key by key, anything else replaced; a new ``class_path`` starts its ``init_args`` afresh."""
    for key, value in overlay.items():
        current = into.get(key)
        if (
            isinstance(value, dict)
            and isinstance(current, dict)
            and value.get("class_path", current.get("class_path")) == current.get("class_path")
        ):
            merge(current, value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def parse_value(text: str) -> Any:
    """A command-line value as jsonargparse reads it: 2e-5 is a number (YAML 1.1 says string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def option_pairs(options: list[str]) -> list[tuple[str, str]]:
    """(key, value) of the ``--key value`` and ``--key=value`` items of ``options``; a flag
    without a value reads true."""
    pairs = []
    position = 0
    while position < len(options):
        item = options[position]
        position += 1
        if not item.startswith("--"):
            continue
        key, sep, value = item[2:].partition("=")
        if not sep:
            value = "true"
            if position < len(options) and not options[position].startswith("--"):
                value = options[position]
                position += 1
        pairs.append((key, value))
    return pairs


def resolved_config(run: PlannedRun, extra: list[str], root: Path = ROOT) -> dict:
    """The run's configs merged, then its grid point and the options of ``extra`` (``--key
    value``, ``--config FILE``) applied, in the order ``macsc`` applies them."""
    config: dict = {}
    for path in run.configs:
        merge(config, yaml.safe_load((root / path).read_text(encoding="utf-8")) or {})
    for key, value in option_pairs([*point_options(run), *extra]):
        if key == "config":
            path = Path(value) if Path(value).is_absolute() else root / value
            merge(config, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
            continue
        *parents, last = key.split(".")
        node = config
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = parse_value(value)
    return config


def settings_line(config: dict) -> str:
    """What a run trains with: the batch per device and in all, the learning rate and its
    schedule, weight decay and length."""
    optimizer = (config.get("model") or {}).get("optimizer") or {}
    trainer = config.get("trainer") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    batch = data.get("batch_size")
    devices = trainer.get("devices", 1)
    nodes = trainer.get("num_nodes", 1)
    accumulate = trainer.get("accumulate_grad_batches", 1)
    text = f"batch {batch} per device"
    if all(isinstance(v, int) for v in (batch, devices, nodes, accumulate)):
        factors = [f"{devices} devices"]
        factors += [f"{nodes} nodes"] if nodes != 1 else []
        factors += [f"{accumulate} accumulated"] if accumulate != 1 else []
        text += f" x {' x '.join(factors)} = {batch * devices * nodes * accumulate} in all"
    else:
        text += f" (devices: {devices})"
    schedule = "constant" if optimizer.get("schedule") == "constant" else "linear decay"
    warmup = optimizer.get("warmup_ratio")
    text += f", lr {format_value(optimizer.get('learning_rate'))} ({optimizer.get('name', 'adamw')}"
    text += f", warm-up {format_value(warmup)} then {schedule})" if warmup else f", {schedule})"
    text += f", weight decay {format_value(optimizer.get('weight_decay'))}"
    text += f", {trainer.get('max_epochs')} epochs"
    steps = trainer.get("max_steps")
    return text + (f" or {steps} steps" if steps not in (None, -1) else "")


# ---------------------------------------------------------------------------------- running
def best_checkpoint(folder: Path) -> Path:
    """The best checkpoint ModelCheckpoint kept in ``folder/checkpoints`` (the one that is not
    last.ckpt; with several, the one last.ckpt records as best, else the newest), or last.ckpt."""
    checkpoints = folder / "checkpoints"
    kept = sorted(
        (p for p in checkpoints.glob("*.ckpt") if not p.name.startswith("last")),
        key=lambda p: p.stat().st_mtime,
    )
    if len(kept) == 1:
        return kept[0]
    last = checkpoints / "last.ckpt"
    if len(kept) > 1 and last.is_file():
        import torch

        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        for key, value in state.get("callbacks", {}).items():
            best = Path(str(value.get("best_model_path", ""))) if "ModelCheckpoint" in key else None
            if best is not None and best.name in {p.name for p in kept}:
                return checkpoints / best.name
    if kept:
        return kept[-1]
    if last.is_file():
        return last
    raise SystemExit(f"run_table.py: error: {checkpoints} holds no checkpoint; did the fit finish?")


def show(argv: list[str]) -> str:
    return "macsc " + shlex.join(argv)


def skipped_lines(runs: list[PlannedRun]) -> list[str]:
    """One line per skipped row and reason, naming its columns."""
    groups: dict[tuple[str, str], list[PlannedRun]] = {}
    for run in runs:
        if run.skip:
            groups.setdefault((run.row, run.skip), []).append(run)
    lines = []
    for (row, reason), group in groups.items():
        tables = sorted({t for run in group for t in run.tables})
        columns = [run.column for run in group if run.column != "-"]
        count = f"{len(columns)} run{'s' if len(columns) != 1 else ''}"
        where = f" ({count}: {', '.join(columns)})" if columns else ""
        lines.append(f"skipped Table {', '.join(map(str, tables))} {row}{where}: {reason}")
    return lines


def grid_lines(spec: dict, tables: list[int]) -> list[str]:
    """One line per row with a grid: its options and values, and how the report reads it."""
    lines = []
    for number in tables:
        for row in spec["tables"][number]["rows"]:
            if row.get("grid") and not row.get("skip"):
                options = "; ".join(
                    f"{key} {', '.join(map(format_value, values))}"
                    for key, values in row["grid"].items()
                )
                size = len(grid_points(row))
                lines.append(
                    f"grid of Table {number} {row['row']}: {options} ({size} runs a column; "
                    "macsc report keeps the best dev score, as the baseline's paper did)"
                )
    return lines


def print_plan(
    runs: list[PlannedRun], spec: dict, tables: list[int], runs_dir: str, extra: list[str]
) -> None:
    for number in tables:
        table = spec["tables"][number]
        print(f"# Table {number}: {table['title']}. Estimate: {table['estimate']}")
    print(f"# from {ROOT}")
    for line in skipped_lines(runs):
        print(f"# {line}")
    for line in grid_lines(spec, tables):
        print(f"# {line}")
    for run in runs:
        if run.skip:
            continue
        fit, validate = commands(
            run, runs_dir, extra, f"<best checkpoint in {log_dir(run, runs_dir)}/checkpoints>"
        )
        print(f"# {run.label}")
        print(f"# settings: {settings_line(resolved_config(run, extra))}")
        print(show(fit))
        print(show(validate))
    ready = [r for r in runs if not r.skip]
    print(
        f"# {len(ready)} run{'s' if len(ready) != 1 else ''} to do, {len(runs) - len(ready)} skipped"
    )


def execute(runs: list[PlannedRun], runs_dir: str, extra: list[str], force: bool) -> int:
    failed = []
    macsc = [sys.executable, "-m", "macsc.cli"]
    for line in skipped_lines(runs):
        print(line, flush=True)
    for run in runs:
        label = f"{run.row} / {run.column}" + (f" {run.point_label}" if run.point else "")
        if run.skip:
            continue
        root = ROOT / run_root(run, runs_dir)
        if (root / VALIDATE_DONE).exists() and not force:
            print(f"done already {label} ({root / VALIDATE_DONE})", flush=True)
            continue
        fit, validate = commands(run, runs_dir, extra, "BEST")
        if force or not (root / FIT_DONE).exists():
            print(f"# {run.label}: {settings_line(resolved_config(run, extra))}", flush=True)
            print(f"$ {show(fit)}", flush=True)
            if subprocess.run(macsc + fit, cwd=ROOT).returncode != 0:
                failed.append(label)
                continue
            (root / FIT_DONE).touch()
        validate[-1] = str(best_checkpoint(ROOT / log_dir(run, runs_dir)))
        print(f"$ {show(validate)}", flush=True)
        if subprocess.run(macsc + validate, cwd=ROOT).returncode != 0:
            failed.append(label)
            continue
        (root / VALIDATE_DONE).touch()
    print(f"finished; read the results with: macsc report {runs_dir}")
    if failed:
        runs_failed = f"{len(failed)} run{'s' if len(failed) != 1 else ''} failed"
        print(f"{runs_failed}: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def sbatch_script(
    runs: list[PlannedRun],
    tables: list[int],
    spec: dict,
    runs_dir: str,
    extra: list[str],
    max_parallel: int | None,
) -> str:
    """A SLURM array job, one task per run: each runs `macsc fit` (skipped once done) and
    `macsc validate` of the best checkpoint, 8 GPUs and 8 tasks (DDP ranks) on one node."""
    ready = [r for r in runs if not r.skip]
    limit = max(spec["tables"][n]["time_limit"] for n in tables)
    array = f"0-{len(ready) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    names = "-".join(map(str, tables))
    lines = [
        "#!/bin/bash",
        f"# Paper Table(s) {', '.join(map(str, tables))}: {len(ready)} runs, one array task each.",
        f"# Written by scripts/run_table.py; submit from {ROOT} with: sbatch <this file>",
        "# Set MACSC (default: macsc) and PYTHON (default: python) to your environment's.",
        f"#SBATCH --job-name=macsc-table{names}",
        f"#SBATCH --array={array}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=6",
        f"#SBATCH --time={limit}",
        "# Lightning saves an hpc checkpoint on SIGUSR1, 90 s before the limit, and requeues the task",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={runs_dir}/slurm/%x_%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(ROOT))}",
        "MACSC=${MACSC:-macsc}",
        "PYTHON=${PYTHON:-python}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for index, run in enumerate(ready):
        fit, validate = commands(run, runs_dir, extra, "")
        point = f" {run.point_label}" if run.point else ""
        lines += [
            f"  {index})  # Table {', '.join(map(str, run.tables))}: {run.row} / {run.column}{point}",
            f"    # {settings_line(resolved_config(run, extra))}",
            f"    ROOT_DIR={shlex.quote(run_root(run, runs_dir))}",
            f"    FIT=({shlex.join(fit)})",
            f"    VALIDATE=({shlex.join(validate[:-2])})",
            "    ;;",
        ]
    lines += [
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2;;',
        "esac",
        'mkdir -p "$ROOT_DIR"',
        f'if [ -e "$ROOT_DIR/{VALIDATE_DONE}" ]; then echo "done already: $ROOT_DIR"; exit 0; fi',
        f'if [ ! -e "$ROOT_DIR/{FIT_DONE}" ]; then',
        '  srun "$MACSC" "${FIT[@]}"',
        f'  touch "$ROOT_DIR/{FIT_DONE}"',
        "fi",
        'BEST=$("$PYTHON" scripts/run_table.py --best-checkpoint "$ROOT_DIR/version_0")',
        'srun "$MACSC" "${VALIDATE[@]}" --ckpt_path "$BEST"',
        f'touch "$ROOT_DIR/{VALIDATE_DONE}"',
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a whole table of the paper (fit, then validate the best checkpoint).",
        epilog="Options after -- are added to every macsc command (e.g. -- --trainer.devices 4).",
    )
    parser.add_argument("--table", help="table number(s): 1, 1,4 or all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--slurm",
        nargs="?",
        const="",
        metavar="FILE",
        help="write an sbatch array script (default runs/tables/slurm/table<N>.sbatch) and say how to submit it",
    )
    parser.add_argument(
        "--max-parallel", type=int, help="with --slurm: at most this many tasks at once"
    )
    parser.add_argument(
        "--runs-dir", default=DEFAULT_RUNS, help=f"where runs go (default {DEFAULT_RUNS})"
    )
    parser.add_argument("--force", action="store_true", help="run again runs that are done")
    parser.add_argument(
        "--rows",
        default=str(ROWS_FILE),
        metavar="FILE",
        help="the row list (default scripts/table_rows.yaml)",
    )
    parser.add_argument("--best-checkpoint", metavar="LOG_DIR", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = build_parser().parse_args(argv)
    if args.best_checkpoint:
        print(best_checkpoint(Path(args.best_checkpoint)))
        return 0
    spec = load_rows(Path(args.rows))
    known = sorted(spec["tables"])
    if not args.table:
        raise SystemExit(f"run_table.py: error: give --table N (the tables are {known} or all)")
    tables = parse_tables(args.table, known)
    runs = plan(spec, tables)
    if args.dry_run:
        print_plan(runs, spec, tables, args.runs_dir, extra)
        return 0
    if args.slurm is not None:
        ready = [r for r in runs if not r.skip]
        for line in skipped_lines(runs):
            print(line)
        if not ready:
            print("nothing to submit: every run of these tables is skipped")
            return 1
        path = Path(args.slurm or f"{args.runs_dir}/slurm/table{'-'.join(map(str, tables))}.sbatch")
        path = path if path.is_absolute() else ROOT / path
        path.parent.mkdir(parents=True, exist_ok=True)
        (ROOT / args.runs_dir / "slurm").mkdir(parents=True, exist_ok=True)
        path.write_text(sbatch_script(runs, tables, spec, args.runs_dir, extra, args.max_parallel))
        print(f"wrote {path}: {len(ready)} array tasks, 8 GPUs each")
        print(f"submit it from {ROOT} with:  sbatch {path}")
        print(f"then read the results with:  macsc report {args.runs_dir}")
        return 0
    return execute(runs, args.runs_dir, extra, args.force)


if __name__ == "__main__":
    sys.exit(main())
