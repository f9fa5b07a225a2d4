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
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path("lightning_configs")
ROWS_FILE = Path(__file__).resolve().with_name("table_rows.yaml")
DEFAULT_RUNS = "runs/tables"
FIT_DONE, VALIDATE_DONE = "fit.done", "validate.done"


@dataclass
class PlannedRun:
    """One row of one table in one column. configs: paths relative to the repository root."""

    tables: list[int]
    row: str
    column: str
    configs: list[Path]
    skip: str | None = None

    @property
    def name(self) -> str:
        """``<column>/<row>`` with the row id's slashes made underscores: the logger's name."""
        return f"{self.column}/{self.row.replace('/', '_')}"


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
    """Every run of ``tables``, each (column, row) once, in table order."""
    runs: dict[tuple[str, str], PlannedRun] = {}
    for number in tables:
        table = spec["tables"][number]
        for row in table["rows"]:
            columns = table["columns"] or [None]
            for column in columns:
                key = (column or "-", row["row"])
                if key in runs:
                    runs[key].tables.append(number)
                    continue
                skip = row.get("skip")
                configs: list[Path] = []
                if column is not None:
                    setting = spec["columns"][column]
                    names = [
                        setting["base"],
                        *setting.get("overlays", []),
                        *row.get("overlays", []),
                    ]
                    configs = [CONFIGS / name for name in names]
                    missing = [str(c) for c in configs if not (root / c).is_file()]
                    if skip is None and missing:
                        kind = "base config" if missing[0] == str(configs[0]) else "overlay"
                        skip = f"{kind} {missing[0]} is not available yet"
                runs[key] = PlannedRun([number], row["row"], column or "-", configs, skip)
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


def commands(run: PlannedRun, runs_dir: str, extra: list[str], best: str) -> list[list[str]]:
    """[fit, validate] argument lists (without the ``macsc`` program)."""
    configs = [item for config in run.configs for item in ("--config", str(config))]
    where = log_options(run, runs_dir)
    return [
        ["fit", *configs, *where, *extra],
        ["validate", *configs, *where, *extra, "--ckpt_path", best],
    ]


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


def print_plan(
    runs: list[PlannedRun], spec: dict, tables: list[int], runs_dir: str, extra: list[str]
) -> None:
    for number in tables:
        table = spec["tables"][number]
        print(f"# Table {number}: {table['title']}. Estimate: {table['estimate']}")
    print(f"# from {ROOT}")
    for line in skipped_lines(runs):
        print(f"# {line}")
    for run in runs:
        if run.skip:
            continue
        label = f"Table {', '.join(map(str, run.tables))} {run.row} / {run.column}"
        fit, validate = commands(
            run, runs_dir, extra, f"<best checkpoint in {log_dir(run, runs_dir)}/checkpoints>"
        )
        print(f"# {label}")
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
        label = f"{run.row} / {run.column}"
        if run.skip:
            continue
        root = ROOT / run_root(run, runs_dir)
        if (root / VALIDATE_DONE).exists() and not force:
            print(f"done already {label} ({root / VALIDATE_DONE})", flush=True)
            continue
        fit, validate = commands(run, runs_dir, extra, "BEST")
        if force or not (root / FIT_DONE).exists():
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
        lines += [
            f"  {index})  # Table {', '.join(map(str, run.tables))}: {run.row} / {run.column}",
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
