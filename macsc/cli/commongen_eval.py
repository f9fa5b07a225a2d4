"""``macsc commongen-eval REFERENCES PREDICTIONS``: CommonGen scores as the official scripts compute
them (:mod:`macsc.commongen.metric`), printed as one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from macsc.commongen.data import (
    concept_set_key,
    read_predictions,
    read_references,
)
from macsc.commongen.metric import TOKENIZERS, score_commongen, scorer_names
from macsc.errors import DataError


def evaluate_files(references: str, predictions: str, tokenizer: str = "spacy") -> dict[str, float]:
    """The scores of a PREDICTIONS file against a REFERENCES source (see :func:`main`)."""
    sets = read_references(references)
    predicted = read_predictions(predictions)
    keys = {concept_set_key(s.concepts) for s in sets}
    for key, (_, where) in predicted.items():
        if key not in keys:
            raise DataError(
                f"{where}: concept set {key!r} is not in REFERENCES {references}; predictions "
                "and references should come from the same split"
            )
    missing = [s for s in sets if concept_set_key(s.concepts) not in predicted]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(sets)} concept sets of REFERENCES {references} have "
            f"no prediction in {predictions} (first: {'#'.join(missing[0].concepts)!r}, "
            f"{missing[0].where})"
        )
    return score_commongen(
        [list(s.concepts) for s in sets],
        [predicted[concept_set_key(s.concepts)][0] for s in sets],
        [list(s.references) for s in sets],
        tokenizer=tokenizer,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc commongen-eval",
        description=(
            "Score CommonGen sentences as the CommonGen leaderboard does (COCO caption toolkit: "
            "BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE when installed) plus concept coverage; "
            "prints one JSON object on the last line, which names the tokenizer and lemmatizer "
            "used."
        ),
    )
    parser.add_argument(
        "references",
        metavar="REFERENCES",
        help="JSON Lines {concepts, references | target} (lines of one concept set are "
        "grouped), release commongen.*.src_alpha.txt with its .tgt.txt, or a hub split "
        "NAME:SPLIT such as allenai/common_gen:validation",
    )
    parser.add_argument(
        "predictions", metavar="PREDICTIONS", help="JSON Lines {concepts, prediction}"
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="spacy",
        help="spacy (default): as the official CommonGen scripts, spaCy's English tokenizer "
        "(case and punctuation kept) and coverage by exact match with a spaCy lemma "
        "(en_core_web_sm's when installed, else spaCy's lookup table); ptb: a departure, the "
        "COCO toolkit's PTB tokenizer (lower case, punctuation dropped) and coverage by "
        "lemminflect lemmas, as earlier versions of this command scored",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``macsc commongen-eval REFERENCES PREDICTIONS [--tokenizer spacy|ptb]``: print the
    scores, the tokenizer and the lemmatizer as one JSON line (last, so the toolkit's own output
    above it does not get in the way) and return 0."""
    args = build_parser().parse_args(argv)
    scores = evaluate_files(args.references, args.predictions, args.tokenizer)
    sys.stdout.flush()
    print(json.dumps({**scores, **scorer_names(args.tokenizer)}))
    return 0
