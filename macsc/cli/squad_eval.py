"""``macsc squad-eval`` (also ``python -m macsc.cli.squad_eval``): the official SQuAD v1.1 / v2.0
evaluation scripts' command line, with their flags, over :mod:`macsc.squad.metric`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError, DataError, MacscError
from macsc.squad.files import (
    _EXPECTED_KINDS,
    _mapping_file,
    _version_of,
    check_file_order,
    gold_answers,
    ids_excerpt,
    json_kind,
    read_data,
    read_json,
)
from macsc.squad.metric import VERSIONS, missing_ids, precision_recall_curves, score_v1, score_v2
from macsc.squad.plots import write_images

EPILOG = """\
A drop-in for the official scripts: the arguments of evaluate-v1.1.py and evaluate-v2.0.py
(DATA_JSON PRED_JSON) and v2.0's flags -o -n -t -p -v. The scoring rules follow the data file's
'version' field (override with --version). The metrics are printed as one JSON object, last on
stdout, with the official keys: v1.1 exact_match, f1; v2.0 exact, f1, total, HasAns_*, NoAns_*,
with -n best_exact, best_exact_thresh, best_f1, best_f1_thresh, with -n and -p pr_exact_ap,
pr_f1_ap, pr_oracle_ap. Warnings and -v details go to stderr.

Where the official scripts differ or fail:
  - a question missing from PRED_JSON is an error naming the first ids; --missing-as-wrong
    scores it 0 instead, with a warning (official v1.1 does that; v2.0 crashes). In v2.0 it is
    wrong at every no-answer threshold (best_* too) and, without a probability in -n, the
    precision-recall curves answer it last;
  - a question id that appears twice in DATA_JSON is an error (v1.1 scores every occurrence,
    v2.0 keeps the last);
  - -o writes the metrics to the file and still prints them;
  - -p without -n draws nothing, as the official script, but says so on stderr.
DATA_JSON may also be JSON Lines of flat examples ({"id", "answers": {"text": [...]}} per line).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc squad-eval",
        description="Score SQuAD predictions exactly as the official v1.1 / v2.0 scripts do.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data_file", metavar="DATA_JSON", help="official SQuAD JSON (dev set)")
    parser.add_argument("pred_file", metavar="PRED_JSON", help="predictions {question id: text}")
    parser.add_argument(
        "-o",
        "--out-file",
        metavar="FILE",
        help="also write the metrics JSON to FILE (the official v2.0 script writes it instead)",
    )
    parser.add_argument(
        "-n",
        "--na-prob-file",
        metavar="NA_PROB_JSON",
        help="v2.0: no-answer probabilities {question id: number}; adds the best_* keys",
    )
    parser.add_argument(
        "-t",
        "--na-prob-thresh",
        type=float,
        default=None,
        metavar="T",
        help="v2.0: predict no answer where the no-answer probability is above T (default 1.0)",
    )
    parser.add_argument(
        "-p",
        "--out-image-dir",
        metavar="DIR",
        help="v2.0 with -n: save the precision-recall curves (pr_exact/pr_f1/pr_oracle.png, "
        "adding their *_ap keys) and na-prob histograms (na_prob_hist_hasAns/noAns.png) to DIR",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="say what was read and written, on stderr"
    )
    parser.add_argument(
        "--missing-as-wrong",
        action="store_true",
        help="score a question missing from PRED_JSON 0 (warning on stderr) instead of stopping",
    )
    parser.add_argument(
        "--version",
        choices=VERSIONS,
        default=None,
        help="evaluation script to follow (default: the data file's 'version' field, else 2.0)",
    )
    return parser


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _check_options(args: argparse.Namespace, version: str) -> None:
    if version == "2.0":
        return
    for given, flag in (
        (args.na_prob_file, "-n/--na-prob-file"),
        (args.na_prob_thresh is not None, "-t/--na-prob-thresh"),
        (args.out_image_dir, "-p/--out-image-dir"),
    ):
        if given:
            raise ConfigError(f"{flag} applies to SQuAD v2.0 only; drop it or use --version 2.0")


def _warn_missing(golds: Mapping[str, Any], predictions: Mapping[str, Any], verbose: bool) -> None:
    missing = missing_ids(golds, predictions)
    if missing:
        shown = ", ".join(map(repr, missing)) if verbose else ids_excerpt(missing)
        _note(
            f"macsc: warning: the predictions miss {len(missing)} of {len(golds)} question ids "
            f"({shown}); they score 0 (--missing-as-wrong)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``macsc squad-eval DATA_JSON PRED_JSON [-o FILE] [-n NA_PROB_JSON] [-t T] [-p DIR] [-v]
    [--missing-as-wrong] [--version 2.0|1.1]``: print the official JSON to stdout and return 0.

    Bad input raises :class:`MacscError` (DataError / ConfigError) with a one-line message naming
    the file, the field or the question ids, and quoting at most :data:`EXCERPT_CHARS` characters
    of any file.
    """
    args = build_parser().parse_args(argv)
    files = {
        "DATA_JSON": (args.data_file, read_data(args.data_file)),
        "PRED_JSON": (args.pred_file, read_json(args.pred_file, "predictions")),
    }
    if args.na_prob_file:
        files["NA_PROB_JSON"] = (
            args.na_prob_file,
            read_json(args.na_prob_file, "no-answer probabilities"),
        )
    squad = files["DATA_JSON"][1]
    if json_kind(squad) not in _EXPECTED_KINDS["DATA_JSON"]:
        check_file_order(files)  # e.g. the predictions first: say so before parsing them as data
    golds = gold_answers(squad, args.data_file)
    check_file_order(files)
    predictions = _mapping_file(args.pred_file, files["PRED_JSON"][1], "predictions", str)
    version = _version_of(squad, args.version)
    _check_options(args, version)
    na_probs = None
    if args.na_prob_file:
        na_probs = _mapping_file(
            args.na_prob_file, files["NA_PROB_JSON"][1], "no-answer probabilities", (int, float)
        )
    if args.verbose:
        answerable = sum(1 for answers in golds.values() if answers)
        extra = sum(1 for qid in predictions if qid not in golds)
        _note(
            f"squad-eval: v{version} rules; {len(golds)} questions ({answerable} answerable, "
            f"{len(golds) - answerable} unanswerable) in {args.data_file!r}; "
            f"{len(predictions)} predictions in {args.pred_file!r} ({extra} not in the data, "
            f"ignored)"
        )
    if args.missing_as_wrong:
        _warn_missing(golds, predictions, args.verbose)
    try:
        if version == "1.1":
            metrics = score_v1(golds, predictions, missing_as_wrong=args.missing_as_wrong)
            text = json.dumps(metrics)
        else:
            metrics = _score_v2_command(args, golds, predictions, na_probs)
            text = json.dumps(metrics, indent=2)
    except DataError as err:
        raise DataError(f"scoring {args.pred_file}: {err}") from err
    if args.out_file:
        try:
            Path(args.out_file).write_text(text + "\n", encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"-o/--out-file {args.out_file!r} cannot be written: {err}") from err
        if args.verbose:
            _note(f"squad-eval: wrote the metrics to {args.out_file!r}")
    print(text)
    return 0


def _score_v2_command(
    args: argparse.Namespace,
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None,
) -> dict[str, float]:
    """v2.0 metrics, plus the ``pr_*_ap`` keys and the images for ``-p`` (which needs ``-n``)."""
    threshold = 1.0 if args.na_prob_thresh is None else args.na_prob_thresh
    missing_as_wrong = args.missing_as_wrong
    metrics = score_v2(golds, predictions, na_probs, threshold, missing_as_wrong=missing_as_wrong)
    if not args.out_image_dir:
        return metrics
    if na_probs is None:
        _note(
            "macsc: warning: -p/--out-image-dir needs -n/--na-prob-file (the curves rank the "
            "questions by no-answer probability); no images written"
        )
        return metrics
    curves = precision_recall_curves(
        golds, predictions, na_probs, missing_as_wrong=missing_as_wrong
    )
    metrics.update({f"{name}_ap": curve.average_precision for name, curve in curves.items()})
    written = write_images(args.out_image_dir, curves, golds, na_probs)
    if args.verbose:
        _note(
            f"squad-eval: wrote {', '.join(path.name for path in written)} to {args.out_image_dir!r}"
        )
    return metrics


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MacscError as error:
        print(f"macsc: error: {error}", file=sys.stderr)
        sys.exit(2)
