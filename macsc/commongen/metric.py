"""CommonGen evaluation: BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE) with the COCO caption
toolkit, plus concept coverage; ``macsc commongen-eval`` prints them as JSON.

As the official CommonGen evaluation computes them (``INK-USC/CommonGen``,
``evaluation/Traditional/eval_metrics/eval.py`` for the toolkit's scores,
``evaluation/PivotScore/evaluate.py`` for coverage):

- grouping: one entry per concept set, its reference list holding every reference of the set,
  its hypothesis list the one prediction; every scorer sees the whole corpus at once (BLEU
  counts are summed over the sets; CIDEr's document frequencies come from the references of the
  sets being scored). BLEU-4 is ``Bleu(4)[0][3]``.
- tokens (``tokenizer="spacy"``, the default): spaCy's English tokenizer, token texts joined by
  spaces, case and punctuation kept. The tokenizer is rule-based: ``spacy.blank("en")`` holds
  the rules of ``en_core_web_sm``'s without a model download.
- coverage: the share of a set's distinct concepts equal to a spaCy lemma of the prediction,
  averaged over concept sets (0-1). A concept of several words needs each word (CommonGen's
  concepts are single words). Lemmas come from ``en_core_web_sm`` (tagger and rule lemmatizer,
  as the official script) when it is installed; otherwise from spaCy's English lookup table
  (``spacy-lookups-data``) applied to the lower-cased token, since the rule lemmatizer
  lower-cases every lemma but a proper noun's. Without a tagger the table gives one lemma per
  word ("leaves" -> leave, never leaf) and none for a word it lacks ("frisbees").

Differences from that evaluation: the lookup lemmatizer above when no English pipeline is
installed (the output names the lemmatizer used); spaCy 3 where the scripts were written for
spaCy 2 (tokens may differ in rare cases); ROUGE-L from the toolkit's ``Rouge`` (sentence-level
LCS F-measure, beta 1.2, averaged over the sets), where the CommonGen repository ran the Perl
ROUGE-1.5.5 through another script.

``tokenizer="ptb"``, a departure kept for comparison with earlier numbers: the COCO toolkit's
``PTBTokenizer`` (the Stanford tokenizer through Java: lower case, punctuation dropped) and
coverage by ``lemminflect``, where a word stands for every lemma it has under any part of speech
("leaves" -> leave, leaf) and a concept is covered when its lemmas and a token's lemmas meet.

SPICE needs Stanford CoreNLP jars that ``pycocoevalcap`` downloads on first use; it runs when
they are present and is skipped, with a one-line notice, when they are not.

Scales: as the toolkit returns them (BLEU, METEOR, ROUGE-L, SPICE in 0-1; CIDEr-D 0-10), and
coverage a fraction. The paper and the CommonGen leaderboard print BLEU, METEOR, ROUGE-L, SPICE
and coverage times 100 and CIDEr-D times 10.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from macsc.commongen.data import (
    concept_set_key,
)
from macsc.errors import ConfigError, DataError, first_line

METRICS = ("bleu_4", "meteor", "rouge_l", "cider", "coverage")
#: how predictions and references are tokenised and lemmatised (see the module docstring)
TOKENIZERS = ("spacy", "ptb")
#: the English pipeline of the official CommonGen scripts, used when installed
OFFICIAL_PIPELINE = "en_core_web_sm"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_spice_notice_shown = False


@dataclass
class GenerationEvaluationData:
    """The concept sets of one evaluation split, in item order: a batch's ``example_index``
    (``(B,)``) indexes these lists.

    ids: each set's id (the dataset's ``concept_set_idx``, else its concepts joined by ``#``).
    concepts: each set's concepts, in the dataset's order.
    references: each set's reference sentences (``[]`` for every set of an unlabelled split).
    """

    ids: list[str]
    concepts: list[list[str]]
    references: list[list[str]]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        """Whether every set has a reference (false for a split to predict on only)."""
        return all(self.references)

    def score(self, predictions: Mapping[int, str]) -> dict[str, float]:
        """:func:`score_commongen` of the sets that have a prediction (``example_index`` ->
        sentence), so a partial pass (sanity check, ``limit_val_batches``) scores what it saw."""
        order = sorted(predictions)
        return score_commongen(
            [self.concepts[i] for i in order],
            [predictions[i] for i in order],
            [self.references[i] for i in order],
        )

    def records(self, predictions: Mapping[int, str]) -> list[dict[str, Any]]:
        """The ``predictions-<split>.jsonl`` lines of the sets in ``predictions``, in order:
        ``{"id", "concepts", "gold", "prediction", "correct": null}``."""
        return [
            {
                "id": self.ids[i],
                "concepts": self.concepts[i],
                "gold": self.references[i],
                "prediction": predictions[i],
                "correct": None,
            }
            for i in sorted(predictions)
        ]


# --- scores ----------------------------------------------------------------------------------


def score_commongen(
    concepts: Sequence[Sequence[str]],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenizer: str = "spacy",
    spice: bool | None = None,
) -> dict[str, float]:
    """The CommonGen metrics of ``predictions`` (one sentence per concept set) against
    ``references`` (every reference of each set), with the COCO caption toolkit.

    Returns ``bleu_4``, ``meteor``, ``rouge_l``, ``cider``, ``coverage`` and, when SPICE ran,
    ``spice``. tokenizer: ``"spacy"`` (the official scripts' tokens and lemmas) or ``"ptb"``
    (the toolkit's PTB tokenizer and ``lemminflect`` coverage; see the module docstring).
    spice: None runs SPICE when its models are present (else a one-line notice on stderr), True
    requires it, False skips it. Java runs METEOR (and the PTB tokenizer).
    """
    if tokenizer not in TOKENIZERS:
        raise ConfigError(
            f"unknown CommonGen tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}"
        )
    if not len(concepts) == len(predictions) == len(references):
        raise ValueError(
            f"score_commongen needs one entry per concept set in each list, got "
            f"{len(concepts)} concept sets, {len(predictions)} predictions, "
            f"{len(references)} reference lists"
        )
    if not concepts:
        raise DataError("there are no concept sets to score")
    for number, refs in enumerate(references):
        if not refs:
            raise DataError(
                f"concept set {concept_set_key(concepts[number])!r} has no reference sentence; "
                "scoring needs at least one per set (the hub's test split has none)"
            )
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _meteor()  # its Java process loads its tables while the tokenizer runs
    if tokenizer == "spacy":
        english = english_pipeline()
        gts = {str(i): [english.tokens(text) for text in refs] for i, refs in enumerate(references)}
        res = {str(i): [english.tokens(text)] for i, text in enumerate(predictions)}
        covered = [
            concept_coverage(concepts[i], english.lemmas(text))
            for i, text in enumerate(predictions)
        ]
    else:
        gts, res = ptb_tokenize(references, predictions)
        covered = [
            inflection_coverage(concepts[i], res[str(i)][0].split())
            for i in range(len(predictions))
        ]
    scores = {
        "bleu_4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "meteor": _meteor_score(gts, res),
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
        "coverage": sum(covered) / len(covered),
    }
    if _should_run_spice(spice):
        spice_score = _spice_score(gts, res, required=bool(spice))
        if spice_score is not None:
            scores["spice"] = spice_score
    return {name: float(value) for name, value in scores.items()}


def scorer_names(tokenizer: str = "spacy") -> dict[str, str]:
    """What :func:`score_commongen` with ``tokenizer`` uses, with versions, for the output:
    ``{"tokenizer": ..., "lemmatizer": ...}``."""
    if tokenizer == "ptb":
        return {
            "tokenizer": f"ptb: the COCO caption toolkit's PTBTokenizer (pycocoevalcap "
            f"{_version('pycocoevalcap')}; lower case, punctuation dropped)",
            "lemmatizer": f"lemminflect {_version('lemminflect')}: every lemma of a word under "
            "any part of speech, concepts lemmatised too",
        }
    english = english_pipeline()
    return {"tokenizer": english.tokenizer_name, "lemmatizer": english.lemmatizer_name}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def ptb_tokenize(
    references: Sequence[Sequence[str]], predictions: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """References and predictions through the toolkit's ``PTBTokenizer`` in one Java run.

    Returns the toolkit's input dicts: set key -> tokenised references, and set key -> ``[the
    tokenised prediction]`` (keys ``"0"``, ``"1"``, ... in order).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # a newline would end a sentence early in the line-preserving tokenizer
    captions = {
        f"{kind}{i}": [{"caption": " ".join(text.split())} for text in texts]
        for kind, lists in (("ref", references), ("hyp", [[p] for p in predictions]))
        for i, texts in enumerate(lists)
    }
    with _java_errors("the PTB tokenizer") as log:
        tokens = PTBTokenizer().tokenize(captions)
    if any(len(tokens.get(key, ())) != len(texts) for key, texts in captions.items()):
        raise ConfigError(
            f"the COCO toolkit's PTB tokenizer (Java) returned fewer lines than it was given: "
            f"{log.text.strip()[:300] or 'no message'}"
        )
    gts = {str(i): tokens[f"ref{i}"] for i in range(len(references))}
    res = {str(i): tokens[f"hyp{i}"] for i in range(len(predictions))}
    return gts, res


@contextlib.contextmanager
def _java_errors(what: str) -> Iterator[SimpleNamespace]:
    """Runs a toolkit step with the process's stderr (file descriptor 2, which Java writes
    to) sent to a temporary file; yields a namespace whose ``text`` holds it afterwards, for
    error messages. A missing ``java`` is a ConfigError, found before the step starts: a
    ``Meteor()`` whose Java failed to start is left half built, and its ``__del__`` then prints
    a traceback at exit."""
    if shutil.which("java") is None:
        raise ConfigError(
            f"{what} of the COCO caption toolkit runs Java, and no 'java' command was found on "
            "PATH; install a Java runtime (8 or later)"
        )
    captured = SimpleNamespace(text="")
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield captured
        except PermissionError as error:  # it writes temporary files beside its jars
            raise ConfigError(
                f"{what} of the COCO caption toolkit could not write its temporary file "
                f"({error}); make the pycocoevalcap package folder writable"
            ) from error
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            captured.text = log.read()


@cache
def _meteor() -> Any:
    """One METEOR process (Java, ~10 s to start) kept for the life of this Python process."""
    from pycocoevalcap.meteor.meteor import Meteor

    with _java_errors("METEOR"):
        return Meteor()


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    meteor = _meteor()
    if meteor.meteor_p.poll() is not None:  # it stopped (killed, crashed): start a new one
        _meteor.cache_clear()
        meteor = _meteor()
    try:
        return meteor.compute_score(gts, res)[0]
    except (ValueError, BrokenPipeError) as error:  # it answered nothing, or garbage
        _meteor.cache_clear()
        if meteor.lock.locked():  # compute_score left it held; Meteor.__del__ takes it again
            meteor.lock.release()
        meteor.meteor_p.kill()
        message = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-300:]
        raise ConfigError(f"METEOR (Java) failed: {message or error}") from error


def spice_available() -> bool:
    """Whether SPICE's Stanford CoreNLP jars are in ``pycocoevalcap/spice/lib`` (fetched on
    first use online; ``python -m pycocoevalcap.spice.get_stanford_models`` fetches them)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "spice" / "lib"
    return all((lib / jar).is_file() for jar in SPICE_JARS)


def _spice_score(
    gts: dict[str, list[str]], res: dict[str, list[str]], required: bool
) -> float | None:
    """SPICE of the corpus; when its Java run fails, None and a one-line notice (an error
    when it was required): SPICE 1.0 is known to need an old Java on some systems."""
    from pycocoevalcap.spice.spice import Spice

    failure = None
    with _java_errors("SPICE") as log:
        try:
            return Spice().compute_score(gts, res)[0]
        except subprocess.CalledProcessError as error:
            failure = error
    lines = log.text.strip().splitlines()
    reason = f"exit {failure.returncode}: {lines[-1] if lines else 'no message'}"
    if required:
        raise ConfigError(f"SPICE (Java) failed ({reason})") from failure
    print(f"macsc: SPICE skipped: it failed ({reason})", file=sys.stderr)
    return None


def _should_run_spice(requested: bool | None) -> bool:
    global _spice_notice_shown
    if requested is False:
        return False
    if spice_available():
        return True
    if requested:
        raise ConfigError(
            "SPICE was asked for, but its Stanford CoreNLP models are not installed; run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once online"
        )
    if not _spice_notice_shown:
        _spice_notice_shown = True
        print(
            "macsc: SPICE skipped: its Stanford CoreNLP models are not installed (run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once online to add it)",
            file=sys.stderr,
        )
    return False


# --- spaCy's tokens and lemmas, and concept coverage -----------------------------------------


@dataclass(frozen=True)
class EnglishPipeline:
    """spaCy's English tokenizer and a lemmatizer, as the official CommonGen scripts use them.

    nlp: ``en_core_web_sm`` (tagger and rule lemmatizer) when installed, else
    ``spacy.blank("en")`` (the same tokenizer rules, no model). lemma_table: spaCy's English
    lookup table (``spacy-lookups-data``) when ``nlp`` has no lemmatizer, else None.
    tokenizer_name, lemmatizer_name: what was used, with versions, for the output.
    """

    nlp: Any
    lemma_table: Any
    tokenizer_name: str
    lemmatizer_name: str

    def tokens(self, text: str) -> str:
        """``text`` tokenised: the token texts joined by single spaces, case and punctuation
        kept (spaces and newlines are not tokens: the scorers split on whitespace)."""
        return " ".join(token.text for token in self.nlp.tokenizer(text) if not token.is_space)

    def lemmas(self, text: str) -> frozenset[str]:
        """The lemmas of ``text``'s tokens: the pipeline's, or the lookup table's entry for
        the lower-cased token (the token itself, lower-cased, when the table lacks it)."""
        if self.lemma_table is None:
            return frozenset(token.lemma_ for token in self.nlp(text))
        return frozenset(
            self.lemma_table.get(token.lower_, token.lower_) for token in self.nlp.tokenizer(text)
        )


@cache
def english_pipeline() -> EnglishPipeline:
    """The :class:`EnglishPipeline` of this process, built on first use (~0.2 s without
    ``en_core_web_sm``; importing spaCy takes ~2 s more)."""
    try:
        import spacy
        from spacy.lookups import load_lookups
    except ImportError as error:
        raise ConfigError(
            f"CommonGen scoring with tokenizer 'spacy' (the default) needs spaCy ({error}); "
            "run `pip install 'spacy>=3.7' spacy-lookups-data`, or pass --tokenizer ptb"
        ) from error
    if spacy.util.is_package(OFFICIAL_PIPELINE):
        try:
            nlp = spacy.load(OFFICIAL_PIPELINE, exclude=["parser", "ner"])
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{OFFICIAL_PIPELINE} is installed but spaCy {spacy.__version__} cannot load it "
                f"({first_line(error)}); install the {OFFICIAL_PIPELINE} release for this spaCy, "
                "or uninstall it to lemmatise with spaCy's lookup table"
            ) from error
        model = f"{OFFICIAL_PIPELINE} {nlp.meta.get('version', '')}".strip()
        return EnglishPipeline(
            nlp,
            None,
            tokenizer_name=f"spacy {spacy.__version__} English tokenizer ({model})",
            lemmatizer_name=f"{model}: tagger and rule lemmatizer (as the official script)",
        )
    try:
        table = load_lookups("en", ["lemma_lookup"]).get_table("lemma_lookup")
    except (ValueError, ImportError) as error:
        raise ConfigError(
            f"CommonGen coverage needs spaCy's English lemma tables ({first_line(error)}); run "
            "`pip install spacy-lookups-data`, or pass --tokenizer ptb"
        ) from error
    return EnglishPipeline(
        spacy.blank("en"),
        table,
        tokenizer_name=f'spacy {spacy.__version__} English tokenizer (spacy.blank("en"), the '
        f"rules of {OFFICIAL_PIPELINE}'s)",
        lemmatizer_name=f"spaCy's English lookup table (spacy-lookups-data "
        f"{_version('spacy-lookups-data')}) on the lower-cased token; a departure: "
        f"{OFFICIAL_PIPELINE}'s tagger and rule lemmatizer are not installed",
    )


def concept_coverage(concepts: Sequence[str], lemmas: Collection[str]) -> float:
    """The share of the distinct ``concepts`` found among ``lemmas`` (a sentence's lemmas),
    exact match; a concept of several words needs each of them."""
    if not concepts:
        raise ValueError("concept_coverage needs at least one concept")
    distinct = set(concepts)
    return sum(all(word in lemmas for word in concept.split()) for concept in distinct) / len(
        distinct
    )


@cache
def word_lemmas(word: str) -> frozenset[str]:
    """The lower-cased ``word`` and every lemma ``lemminflect`` gives it under any part of
    speech; for a word it does not know, its rule-based noun and verb lemmas."""
    import lemminflect

    word = word.lower()
    found = lemminflect.getAllLemmas(word) or {
        **lemminflect.getAllLemmasOOV(word, "NOUN"),
        **lemminflect.getAllLemmasOOV(word, "VERB"),
    }
    return frozenset({word, *(lemma.lower() for lemmas in found.values() for lemma in lemmas)})


def inflection_coverage(concepts: Sequence[str], tokens: Sequence[str]) -> float:
    """Coverage as ``tokenizer="ptb"`` counts it: the share of ``concepts`` that appear,
    lemmatised by ``lemminflect``, among the lemmas of ``tokens`` (a sentence's tokens). A
    concept of several words needs each of them."""
    if not concepts:
        raise ValueError("inflection_coverage needs at least one concept")
    present = frozenset().union(*(word_lemmas(token) for token in tokens))
    covered = [all(word_lemmas(word) & present for word in concept.split()) for concept in concepts]
    return sum(covered) / len(concepts)


# --- command line ----------------------------------------------------------------------------
