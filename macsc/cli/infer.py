"""``macsc infer DIR --text "..."``: an exported model (``macsc export``) on raw inputs, one JSON
line per input on stdout (:meth:`macsc.inference.MaCSC.predict`). A command of its own:
LightningCLI's ``predict`` already owns ``--model``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from macsc.errors import DataError, first_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc infer",
        description="Run an exported MaCSC model on raw inputs; prints one JSON line per input "
        "(its prediction; a classifier's probabilities).",
    )
    parser.add_argument("folder", metavar="DIR", help="the folder `macsc export` wrote")
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="an input of a one-segment model (a sentence; CommonGen: concepts separated by "
        "spaces); repeat it for more",
    )
    parser.add_argument(
        "--pair",
        action="append",
        default=[],
        nargs=2,
        metavar=("FIRST", "SECOND"),
        help="an input of a pair model (a sentence pair; SQuAD: QUESTION CONTEXT); repeatable",
    )
    parser.add_argument(
        "--input",
        metavar="FILE.jsonl",
        help="inputs, one JSON value per line: an object with the model's fields (macsc.json's "
        'inputs, e.g. {"sentence": ...} or {"question": ..., "context": ...}, and an optional '
        '"id"), a list of one string per field, or a string',
    )
    parser.add_argument("--batch-size", type=int, metavar="N", help="inputs per forward pass")
    parser.add_argument(
        "--device", metavar="DEVICE", help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    parser.add_argument(
        "--branches", action="store_true", help="add each modality's own prediction"
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the prototype cache (default: $MACSC_CACHE or ~/.cache/macsc)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="compute the prototypes in memory, store none"
    )
    return parser


def read_inputs(path: Path) -> list[Any]:
    """The inputs of a JSON Lines file (blank lines skipped); a DataError names a bad line."""
    if not path.is_file():
        raise DataError(f"--input {str(path)!r} does not exist")
    inputs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            inputs.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path} line {number}: not valid JSON ({first_line(error)}); write one value "
                "per line"
            ) from error
    return inputs


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs: list[Any] = [*args.text, *(list(pair) for pair in args.pair)]
    if args.input:
        inputs += read_inputs(Path(args.input))
    if not inputs:
        parser.error("give inputs: --text TEXT, --pair FIRST SECOND or --input FILE.jsonl")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    import torch

    from macsc.inference.model import MaCSC

    model = MaCSC.from_pretrained(args.folder)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = model.predict(
        inputs,
        batch_size=args.batch_size,
        device=device,
        branches=args.branches,
        cache_dir=False if args.no_cache else args.cache_dir,
    )
    for record in records:
        print(json.dumps(record, ensure_ascii=False))
    return 0
