"""``macsc report RUN ...``: finished runs beside the paper's tables (:mod:`macsc.analysis.report`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from macsc.analysis.report import _table_numbers, build_report, list_rows
from macsc.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc report",
        description="Final metrics of finished runs as Markdown tables shaped like the paper's "
        "Tables 1-7, the paper's number beside ours and the difference.",
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="run folders (runs/<name>/version_N), or folders holding them (runs/)",
    )
    parser.add_argument(
        "--table",
        action="append",
        metavar="N",
        help="only these tables (repeat or comma-separate: --table 1,4); default all",
    )
    parser.add_argument("--out", metavar="FILE.md", help="write the report here instead of stdout")
    parser.add_argument(
        "--name",
        action="append",
        metavar="RUN=ROW",
        help="the paper row a run stands for (a row id, see --list-rows), when its config "
        "does not say it",
    )
    parser.add_argument(
        "--list-rows", action="store_true", help="list the row ids of every table and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.list_rows:
        print(list_rows())
        return 0
    if not args.runs:
        raise ConfigError("give at least one run folder (or a folder of runs, e.g. runs/)")
    text, outcomes = build_report(args.runs, _table_numbers(args.table), args.name)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        matched = sum(1 for o in outcomes if o.fills)
        print(f"wrote {args.out}: {matched} of {len(outcomes)} runs matched")
    else:
        print(text, end="")
    return 0
