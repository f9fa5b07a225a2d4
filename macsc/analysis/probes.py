"""Zero-shot visual-reasoning probes (paper Table 7; SPEC section 11).

A probe is a set of objects with a gold class (a colour, a shape), a set of candidate classes and
cloze templates. Three kinds of model answer them:

- a plain PLM scores every candidate with its own masked-LM head (:func:`masked_lm_scorer`);
- a MaCSC checkpoint scores with the MLM head of its backbone's pretrained checkpoint applied to
  its text representation ``mean_m Ĥ^t_m`` (:func:`macsc_scorer`, through the one adaptor
  :func:`macsc_text_states`);
- a CLIP-style text tower embeds every candidate-filled template and picks the one closest to the
  object phrase (:func:`clip_scorer`).

Masked-LM scoring: a candidate word of ``n`` word pieces gets ``n`` masks; its score is the mean
log-probability of its pieces at those masks; a class scores the sum of its words'
probabilities; the prediction is the top class among the candidates only. Accuracy is computed
per template, as the exact fraction correct / examples, and reported averaged over the templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from macsc.errors import CheckpointError, ConfigError, MacscError, first_line
from macsc.paths import load_tokenizer, resolve_pretrained

DESCRIPTOR, ITEM, MASK, SEP = "[DESCRIPTOR]", "[ITEM]", "[MASK]", "[SEP]"
#: the object phrase a CLIP-style tower compares the filled templates with
OBJECT_PHRASE = f"{DESCRIPTOR} {ITEM}"

#: texts -> (logits ``(B, l, V)``, input ids ``(B, l)``)
LogitsFn = Callable[[list[str]], tuple[Tensor, Tensor]]
#: texts -> (hidden ``(B, l, d)``, input ids ``(B, l)``, attention mask ``(B, l)``)
TextStates = Callable[[list[str]], tuple[Tensor, Tensor, Tensor]]
#: texts -> embeddings ``(B, d)``
EmbedFn = Callable[[list[str]], Tensor]


@dataclass(frozen=True)
class ProbeExample:
    """One object: ``item`` (``banana``), its gold class ``label`` and an optional
    ``descriptor`` (``the inside of a``)."""

    item: str
    label: str
    descriptor: str = ""


@dataclass
class Probe:
    """A probe data set with its protocol.

    classes: class name -> the words scored for it (the class name first; synonyms after it,
        e.g. ``round: (round, circle)``); a class scores the sum of its words' probabilities.
    templates: cloze templates with ``[DESCRIPTOR]``, ``[ITEM]``, one ``[MASK]`` and optionally
        ``[SEP]`` (see :func:`fill_template`).
    source: the file the examples were read from.
    """

    name: str
    examples: list[ProbeExample]
    classes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError(f"probe {self.name} has no examples")
        unknown = sorted({e.label for e in self.examples} - set(self.classes))
        if unknown:
            raise ValueError(f"probe {self.name}: labels {unknown} are not among its classes")
        for template in self.templates:
            if template.count(MASK) != 1:
                raise ConfigError(f"probe template {template!r} must hold exactly one {MASK}")


@dataclass
class ProbeResult:
    """Accuracy (0-1) of one probe under each template, the fraction ``correct / examples`` in
    float64 (1 of 12 is ``0.08333333333333333``), and the predicted class of every example under
    every template (``predictions[t][e]``)."""

    name: str
    source: str
    templates: list[str]
    accuracy: list[float]
    predictions: list[list[str]] = field(repr=False)

    @property
    def average(self) -> float:
        """The reported number: the accuracy averaged over the templates."""
        return math.fsum(self.accuracy) / len(self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "examples": len(self.predictions[0]) if self.predictions else 0,
            "templates": [
                {"template": t, "accuracy": a}
                for t, a in zip(self.templates, self.accuracy, strict=True)
            ],
            "average": self.average,
        }


# ----------------------------------------------------------------------------------- templates
def fill_template(
    template: str, item: str, descriptor: str = "", answer: str = MASK, sep: str = SEP
) -> str:
    """Fill a probe template (SPEC 11).

    ``[DESCRIPTOR]`` and ``[ITEM]`` take the object, ``[MASK]`` takes ``answer`` (the model's
    mask token(s), or a candidate word), ``[SEP]`` takes ``sep`` (the tokenizer's own separator).
    An empty descriptor drops ``"[DESCRIPTOR] "``; an empty ``sep`` drops ``"[SEP] "`` (a model
    without a separator token, such as a CLIP text tower).
    """
    text = template
    if not descriptor:
        text = text.replace(f"{DESCRIPTOR} ", "").replace(DESCRIPTOR, "")
    if not sep:
        text = text.replace(f"{SEP} ", "").replace(SEP, "")
    return (
        text.replace(DESCRIPTOR, descriptor)
        .replace(ITEM, item)
        .replace(SEP, sep)
        .replace(MASK, answer)
    )


def split_at_answer(template: str, example: ProbeExample, sep: str = SEP) -> tuple[str, str]:
    """The filled text before and after the ``[MASK]`` slot: ``before + answer + after`` is the
    template filled with ``answer``, so the answer's characters are known exactly."""
    head, tail = template.split(MASK)
    return (
        fill_template(head, example.item, example.descriptor, sep=sep),
        fill_template(tail, example.item, example.descriptor, sep=sep),
    )


def candidate_pieces(tokenizer: Any, before: str, word: str, after: str) -> list[int]:
    """Token ids of ``word`` as the tokenizer splits it inside ``before + word + after``
    (in context, so that a BPE word after a space gets its space-marked pieces).

    The pieces must cover exactly the word's characters (and at most the whitespace around
    them); a tokenizer that merges the word with its neighbours is an error.
    """
    text = before + word + after
    start, end = len(before), len(before) + len(word)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, spans = [], []
    for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if last > first and first < end and last > start:
            ids.append(int(token))
            spans.append((first, last))
    if not ids or text[spans[0][0] : start].strip() or text[end : spans[-1][1]].strip():
        raise ConfigError(
            f"the tokenizer does not split {text!r} at the candidate {word!r} (its pieces span "
            f"{[text[a:b] for a, b in spans]}); use a template with the answer set off by spaces"
        )
    return ids


def class_log_scores(word_scores: Tensor, word_class: list[int], classes: int) -> Tensor:
    """Log of each class's summed word probabilities: ``(..., W)`` log-scores -> ``(..., C)``.

    ``word_class[w]`` is the class of word ``w``; a class of one word keeps that word's score.
    """
    index = torch.tensor(word_class, device=word_scores.device)
    out = word_scores.new_full((*word_scores.shape[:-1], classes), float("-inf"))
    for c in range(classes):
        out[..., c] = torch.logsumexp(word_scores[..., index == c], dim=-1)
    return out


def _result(probe: Probe, class_scores: Tensor) -> ProbeResult:
    """``class_scores (T, E, C)`` -> accuracy per template (ties go to the first class)."""
    names = list(probe.classes)
    gold = torch.tensor([names.index(e.label) for e in probe.examples])
    predicted = class_scores.argmax(dim=-1).cpu()  # first maximum on ties
    # counted in integers and divided in Python: a float32 mean shows 1/12 as 0.0833333358...
    correct = (predicted == gold).sum(dim=1).tolist()
    return ProbeResult(
        name=probe.name,
        source=probe.source,
        templates=list(probe.templates),
        accuracy=[count / len(probe.examples) for count in correct],
        predictions=[[names[int(c)] for c in row] for row in predicted],
    )


def probe_words(probe: Probe) -> tuple[list[str], list[int]]:
    """Every candidate word of the probe, class by class, and the class index of each."""
    words, word_class = [], []
    for c, class_words in enumerate(probe.classes.values()):
        words += list(class_words)
        word_class += [c] * len(class_words)
    return words, word_class


# ----------------------------------------------------------------------------------- scoring
def masked_lm_word_scores(
    probe: Probe, tokenizer: Any, logits_fn: LogitsFn, batch_size: int = 64
) -> Tensor:
    """Masked-LM score of every candidate word, ``(T, E, W)`` for templates, examples and the
    words of :func:`probe_words` (SPEC 11).

    For every template, example and candidate word of ``n`` pieces, the template is filled with
    ``n`` mask tokens (``[SEP]`` is the tokenizer's own); the word's score is the mean
    log-probability of its pieces at the masks, from one forward of ``logits_fn``. Candidates
    with the same masked text share that forward.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"probing needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not"
        )
    if tokenizer.mask_token is None:
        raise ConfigError(f"the tokenizer {type(tokenizer).__name__} has no mask token")
    mask, sep = tokenizer.mask_token, tokenizer.sep_token or ""
    words, _ = probe_words(probe)
    texts: dict[str, int] = {}
    queries: dict[int, list[tuple[int, int, int, list[int]]]] = {}
    for t, template in enumerate(probe.templates):
        for e, example in enumerate(probe.examples):
            before, after = split_at_answer(template, example, sep)
            for w, word in enumerate(words):
                pieces = candidate_pieces(tokenizer, before, word, after)
                masked = before + " ".join([mask] * len(pieces)) + after
                index = texts.setdefault(masked, len(texts))
                queries.setdefault(index, []).append((t, e, w, pieces))

    scores = torch.full((len(probe.templates), len(probe.examples), len(words)), float("nan"))
    unique = list(texts)
    for start in range(0, len(unique), batch_size):
        logits, input_ids = logits_fn(unique[start : start + batch_size])
        at_masks = input_ids == tokenizer.mask_token_id
        # (masks in the batch, V), on the CPU at once: one transfer per batch, not per word
        log_probs = logits[at_masks].float().log_softmax(dim=-1).cpu()
        counts = at_masks.sum(dim=1).tolist()
        offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        for row in range(len(counts)):
            rows = log_probs[offsets[row] : offsets[row + 1]]
            for t, e, w, pieces in queries[start + row]:
                if len(pieces) != rows.shape[0]:
                    raise ConfigError(
                        f"the tokenizer read {rows.shape[0]} mask tokens in "
                        f"{unique[start + row]!r}, written for {len(pieces)}"
                    )
                scores[t, e, w] = rows[torch.arange(len(pieces)), pieces].mean()
    return scores


def score_masked_lm(
    probe: Probe, tokenizer: Any, logits_fn: LogitsFn, batch_size: int = 64
) -> ProbeResult:
    """Zero-shot masked-LM accuracy of ``probe``: :func:`masked_lm_word_scores`, a class
    scoring the sum of its words' probabilities, top-1 over the candidate classes."""
    scores = masked_lm_word_scores(probe, tokenizer, logits_fn, batch_size)
    return _result(probe, class_log_scores(scores, probe_words(probe)[1], len(probe.classes)))


def clip_word_scores(probe: Probe, embed_fn: EmbedFn, batch_size: int = 256) -> Tensor:
    """Cosine between the object phrase ``[DESCRIPTOR] [ITEM]`` and each candidate-filled
    template (``[SEP]`` dropped: the tower has no separator), ``(T, E, W)``."""
    words, _ = probe_words(probe)
    phrases = [fill_template(OBJECT_PHRASE, e.item, e.descriptor) for e in probe.examples]
    filled = [
        fill_template(t, e.item, e.descriptor, answer=w, sep="")
        for t in probe.templates
        for e in probe.examples
        for w in words
    ]
    unique = list(dict.fromkeys([*phrases, *filled]))
    vectors = torch.cat(
        [
            nn.functional.normalize(embed_fn(unique[i : i + batch_size]).float(), dim=-1).cpu()
            for i in range(0, len(unique), batch_size)
        ]
    )
    row = {text: i for i, text in enumerate(unique)}
    phrase_vectors = vectors[[row[p] for p in phrases]]  # (E, d)
    candidates = vectors[[row[text] for text in filled]].view(
        len(probe.templates), len(probe.examples), len(words), -1
    )
    return torch.einsum("tewd,ed->tew", candidates, phrase_vectors)


def score_clip(
    probe: Probe, embed_fn: EmbedFn, batch_size: int = 256, temperature: float = 0.01
) -> ProbeResult:
    """CLIP-style accuracy of ``probe`` (SPEC 11, Table 7's CLIP row): the candidate closest
    (cosine, :func:`clip_word_scores`) to the object phrase. For classes of several words
    (shape synonyms) the cosines become probabilities by a softmax over all candidate words at
    ``temperature`` (CLIP's own logit scale is 100) and a class sums its words'; with one word
    per class this is simply the closest candidate."""
    cosine = clip_word_scores(probe, embed_fn, batch_size)
    word_scores = (cosine / temperature).log_softmax(dim=-1)
    return _result(probe, class_log_scores(word_scores, probe_words(probe)[1], len(probe.classes)))


# ------------------------------------------------------------------------------------ models
def load_masked_lm(name: str) -> nn.Module:
    """``AutoModelForMaskedLM`` from a hub name, a folder or ``package:<module>``; a checkpoint
    without MLM head weights (a bare encoder, whose head would be random) is an error."""
    from transformers import AutoModelForMaskedLM

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            resolve_pretrained(name), output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot load the masked language model {name!r}: {first_line(error)} -- give a "
            "hub name or a local folder (save_pretrained layout) of a model with an MLM head"
        ) from error
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ConfigError(
            f"{name!r} has no masked-LM weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            ": its MLM head would be random; give a checkpoint saved with its MLM head "
            "(e.g. bert-base-uncased; offline, a random one: `macsc tiny-model bert-mlm DIR`)"
        )
    return model.eval()


def mlm_head(model: nn.Module, name: str) -> nn.Module:
    """The masked-LM head of an ``AutoModelForMaskedLM``: hidden states -> vocabulary logits."""
    for attribute in ("cls", "lm_head", "predictions"):
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigError(
        f"{name!r} ({type(model).__name__}) has no MLM head module named cls, lm_head or "
        "predictions; use a BERT-, RoBERTa- or ALBERT-style model"
    )


def masked_lm_scorer(name: str, device: str | torch.device) -> tuple[Any, LogitsFn]:
    """A plain PLM: its tokenizer and ``texts -> (logits, input_ids)`` with its own MLM head."""
    model = load_masked_lm(name).to(device)
    tokenizer = load_tokenizer(resolve_pretrained(name))

    def logits_fn(texts: list[str]) -> tuple[Tensor, Tensor]:
        encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            return model(**encoded).logits, encoded["input_ids"]

    return tokenizer, logits_fn


def without_special_tokens(text: str, tokenizer: Any) -> str:
    """The probe sentence as plain words: the backbone tokenizer's special tokens (``[MASK]``,
    ``[SEP]``) removed, since a prototype extractor's tokenizer does not know them."""
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        text = text.replace(token, " ")
    return " ".join(text.split())


def macsc_text_states(model: Any, tokenizer: Any) -> TextStates:
    """The one adaptor between the probes and a MaCSC model: ``texts -> (mean_m Ĥ^t_m, input
    ids, attention mask)``, the text representation of SPEC 2 at every token.

    Runs the model's network (:class:`macsc.method.network.MaCSCNetwork`) on the tokenised probe
    sentences with every text row enhanced; each modality's prototypes are extracted from the
    sentence without its special tokens (the batch's ``segments``). With ``modalities: [text]``
    the representation is ``H^t``.
    """
    device = next(model.network.backbone.parameters()).device

    def text_states(texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        batch = dict(encoded)
        batch["segments"] = [[without_special_tokens(t, tokenizer) for t in texts]]
        representations = model.network(batch, rows=None)
        return representations.text_branch, encoded["input_ids"], encoded["attention_mask"]

    return text_states


def load_macsc(path: str | Path, trust_checkpoint: bool = False) -> Any:
    """``MaCSC.load_from_checkpoint`` (safe by default) with one-line errors."""
    from macsc.training.module import MaCSC

    try:
        return MaCSC.load_from_checkpoint(
            path, map_location="cpu", trust_checkpoint=trust_checkpoint
        ).eval()
    except MacscError:
        raise
    except Exception as error:  # Lightning's KeyError/TypeError/... for a file of another kind
        raise CheckpointError(
            f"{str(path)!r} does not load as a MaCSC checkpoint ({type(error).__name__}: "
            f"{first_line(error)[:200]}); give a checkpoint written by `macsc fit`"
        ) from error


def macsc_scorer(
    path: str | Path,
    device: str | torch.device,
    trust_checkpoint: bool = False,
    head_from: str | None = None,
) -> tuple[Any, LogitsFn, dict[str, Any]]:
    """A MaCSC checkpoint: its backbone's tokenizer, ``texts -> (logits, input_ids)`` with the
    MLM head of ``head_from`` (default: the backbone's pretrained checkpoint) applied to
    ``mean_m Ĥ^t_m``, and a description of what was loaded."""
    model = load_macsc(path, trust_checkpoint).to(device)
    for extractor in model.extractors.values():
        extractor.to(device)
    head_name = head_from or model.backbone_name
    width = model.network.hidden_size
    try:
        masked_lm = load_masked_lm(head_name)
    except ConfigError as error:
        if head_from is not None:
            raise
        raise ConfigError(
            f"the checkpoint's backbone {model.hparams.backbone!r} has no masked-LM head to "
            f"score with ({first_line(error)[:120]}...); pass --mlm-head with a masked LM of "
            f"width {width} and the backbone's vocabulary, or offline a random one (its scores "
            f"mean nothing): `macsc tiny-model bert-mlm DIR --hidden-size {width}`, then "
            "--mlm-head DIR"
        ) from error
    head = mlm_head(masked_lm, head_name).to(device)
    head_width = next(p for p in head.parameters() if p.dim() == 2).shape[1]
    if head_width != width:
        raise ConfigError(
            f"the MLM head of {head_name!r} reads width {head_width}, the checkpoint's text "
            f"representation has width {width}; pass the head of its own backbone"
        )
    tokenizer = load_tokenizer(model.backbone_name)
    text_states = macsc_text_states(model, tokenizer)

    def logits_fn(texts: list[str]) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            states, input_ids, _ = text_states(texts)
            return head(states), input_ids

    description = {
        "checkpoint": str(path),
        "backbone": model.hparams.backbone,
        "modalities": list(model.modalities),
        "mlm_head": head_name,
    }
    return tokenizer, logits_fn, description


def clip_scorer(options: dict[str, Any], device: str | torch.device) -> EmbedFn:
    """A CLIP-family text tower (``{kind: open_clip|audioclip|clip_vip, ...}``, the extractor
    options and strict checkpoint loading of :mod:`macsc.prototypes`): ``texts -> (B, d)``."""
    from macsc.prototypes import build_extractor
    from macsc.prototypes.clip_text import ClipTextExtractor

    options = dict(options)
    kind = options.pop("kind", None)
    if not kind:
        raise ConfigError(
            "--clip needs a 'kind' (open_clip, audioclip or clip_vip), e.g. "
            "'{kind: open_clip, model_name: ViT-B-32, pretrained: openai}'"
        )
    extractor = build_extractor(kind, **options)
    if not isinstance(extractor, ClipTextExtractor):
        raise ConfigError(
            f"--clip kind {kind!r} is not a CLIP text tower; use open_clip, audioclip or clip_vip"
        )
    extractor.to(device)

    def embed(texts: list[str]) -> Tensor:
        with torch.inference_mode():
            return extractor.embed(texts)

    return embed


# ------------------------------------------------------------------------------------ report
def format_table(results: list[ProbeResult]) -> str:
    """One row per probe and template, then the probe's average; accuracy in percent."""
    width = max([len("template"), *(len(t) for r in results for t in r.templates)])
    lines = [f"{'probe':<14} {'template':<{width}} {'accuracy (%)':>12}"]
    for result in results:
        for template, accuracy in zip(result.templates, result.accuracy, strict=True):
            lines.append(f"{result.name:<14} {template:<{width}} {100 * accuracy:>12.2f}")
        lines.append(f"{result.name:<14} {'average':<{width}} {100 * result.average:>12.2f}")
    return "\n".join(lines)


def report(model: dict[str, Any], results: list[ProbeResult]) -> dict[str, Any]:
    """The JSON report: the model, then per probe its file, example count, accuracy (0-1) per
    template and the average over templates."""
    return {"model": model, "probes": {r.name: r.to_dict() for r in results}}
