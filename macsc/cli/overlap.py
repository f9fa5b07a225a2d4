"""``macsc overlap RUN ...``: the overlap of correct predictions between runs (Eq. 15, Figure 4;
:mod:`macsc.analysis.overlap`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from macsc.analysis.overlap import (
    METRICS,
    compute_overlap,
    format_table,
    overlap_heatmap,
    write_csv,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc overlap",
        description="Overlap of correct predictions between runs (Eq. 15, Figure 4): "
        "O(M1, M2) = |S1 ∩ S2| / |S1|, row M1, column M2.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (runs/<name>/version_N)"
    )
    parser.add_argument("--name", action="append", metavar="RUN=LABEL", help="a run's label")
    parser.add_argument(
        "--split", help="the predictions-<split>.jsonl to read (default: the one the runs share)"
    )
    parser.add_argument("--csv", metavar="FILE", help="write the matrix as CSV")
    parser.add_argument("--png", metavar="FILE", help="write a heatmap like Figure 4")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="em",
        help="what counts as correct: em = the line's 'correct' (default), f1 = SQuAD F1 >= "
        "--f1-threshold",
    )
    parser.add_argument(
        "--f1-threshold", type=float, default=0.5, help="with --metric f1 (default 0.5)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    labels, sizes, total, matrix, split = compute_overlap(
        args.runs, args.name, args.split, args.metric, args.f1_threshold
    )
    rule = "correct" if args.metric == "em" else f"F1 >= {args.f1_threshold:g}"
    print(f"overlap of correct predictions on {split} ({total} ids, {rule}); row M1, column M2:")
    print(format_table(labels, matrix))
    print("|S|: " + ", ".join(f"{label} {size}" for label, size in zip(labels, sizes, strict=True)))
    for label, size in zip(labels, sizes, strict=True):
        if size == 0:
            print(f"note: {label} gets no id right, so its row is undefined (0/0) and shown as –")
    if args.csv:
        write_csv(args.csv, labels, matrix)
        print(f"wrote {args.csv}")
    if args.png:
        import matplotlib.pyplot as plt

        figure = overlap_heatmap(labels, matrix, f"Overlap of correct predictions ({split})")
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.png, dpi=150)
        plt.close(figure)
        print(f"wrote {args.png}")
    return 0
