"""The MaCSC network: backbone, conceptual prototypes and their enhancement (SPEC 1-2, Eq. 2-3).

A plain ``nn.Module`` with no Lightning in it: it turns a batch into the branch representations
(:class:`BranchRepresentations`) that the task heads read.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from macsc.errors import ConfigError, MacscError
from macsc.method.fusion import ConceptEnhancers, masked_mean, sentence_pool, sentence_positions
from macsc.method.options import EnhancerOptions
from macsc.method.text_tower import TEXT_TOWER_MODEL_TYPE, build_text_tower
from macsc.paths import resolve_pretrained
from macsc.prototypes import PrototypeExtractor, Prototypes, build_extractor

#: backbones whose sentence position is their last real token
LAST_TOKEN_MODELS = ("xlnet", TEXT_TOWER_MODEL_TYPE)

#: SPEC section 1: the paper's extractor for each non-text modality
DEFAULT_PROTOTYPES: dict[str, dict[str, Any]] = {
    "image": {"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": "openai"},
    "audio": {"kind": "audioclip", "checkpoint": "checkpoints/AudioCLIP-Full-Training.pt"},
    "video": {"kind": "clip_vip", "checkpoint": "checkpoints/pretrain_clipvip_base_32.pt"},
}


@dataclass
class BranchRepresentations:
    """What the network gives the heads for one batch; ``M'`` non-text modalities, in
    ``modalities`` order, stacked along the leading axis.

    text: ``H^t`` ``(B, l, d)``. mask: the text attention mask ``(B, l)``.
    enhanced_text: ``Ĥ^t_m`` ``(M', B, l, d)``, or ``(M', B, r, d)`` when only ``rows`` were
        computed; None without a non-text modality.
    prototypes, prototype_masks: ``Ĥ^m`` ``(M', B, n, d)`` and its mask ``(M', B, n)`` bool
        (a modality with fewer than ``n`` prototype rows has masked padding rows); None without
        a non-text modality.
    rows: ``(B, r)`` the positions of ``H^t`` that ``enhanced_text`` holds, None for all.
    pooling: the backbone's sentence position (``first``, ``last`` or ``mean``).
    """

    text: Tensor
    mask: Tensor
    enhanced_text: Tensor | None
    prototypes: Tensor | None
    prototype_masks: Tensor | None
    rows: Tensor | None
    pooling: str

    @property
    def text_branch(self) -> Tensor:
        """The text branch (SPEC 2): the mean over modalities of ``Ĥ^t_m``; ``H^t`` alone
        when the run has no other modality."""
        return self.text if self.enhanced_text is None else self.enhanced_text.mean(0)

    def token_branches(self) -> Tensor:
        """``(M, B, l, d)``: what each branch's token-level head reads, ``H^t`` for the text
        branch, then ``Ĥ^t_m`` per modality (SPEC 3, extractive QA)."""
        if self.enhanced_text is None:
            return self.text.unsqueeze(0)
        return torch.cat([self.text.unsqueeze(0), self.enhanced_text.to(self.text.dtype)])

    def sentence(self, states: Tensor) -> Tensor:
        """``(..., B, d)``: ``states`` ``(..., B, l, d)`` read at the sentence position. A
        tensor of all ``l`` rows is pooled there (:func:`macsc.method.fusion.sentence_pool`);
        one already cut to ``rows`` holds only that row."""
        if self.rows is not None and states.shape[-2] == self.rows.shape[1]:
            return states.select(-2, 0)
        return sentence_pool(states, self.mask, self.pooling)

    def pooled_prototypes(self) -> Tensor | None:
        """The masked mean of each modality's enhanced prototypes ``Ĥ^m``: ``(M', B, d)``."""
        if self.prototypes is None:
            return None
        return masked_mean(self.prototypes, self.prototype_masks).to(self.text.dtype)

    def pooled(self) -> Tensor:
        """``(M, B, d)``: every branch's pooled representation (SPEC 3), the text branch at the
        backbone's sentence position, then each modality's :meth:`pooled_prototypes`."""
        text = self.sentence(self.text_branch).unsqueeze(0)  # (1, B, d)
        prototypes = self.pooled_prototypes()
        return text if prototypes is None else torch.cat([text, prototypes])


class MaCSCNetwork(nn.Module):
    """Backbone + prototype sources + one concept enhancer per non-text modality.

    Args:
        backbone: Hugging Face name or folder, or ``package:<module>`` (:mod:`macsc.paths`);
            None when ``text_tower`` is the encoder.
        modalities: ``text`` first.
        prototypes: the source of each non-text modality (options of
            :func:`macsc.prototypes.build_extractor`); unlisted ones use the paper's.
        auto_class: the ``transformers`` auto class that loads the backbone (``AutoModel``;
            ``AutoModelForSeq2SeqLM`` for generation, whose encoder then gives ``H^t``).
        enhancer: the concept enhancement's options (:class:`macsc.method.options.EnhancerOptions`).
        text_pooling: ``auto`` (first token; last for XLNet and text towers), ``first``,
            ``last``, ``mean``.
        dropout: of the enhancers (default: the backbone's).
        backbone_kwargs: extra keyword arguments of ``from_pretrained``.
        text_tower: a multimodal model's text tower as the encoder instead of ``backbone``
            (SPEC 13, the MC-PTM baselines; :func:`macsc.method.text_tower.build_text_tower`).
    """

    def __init__(
        self,
        backbone: str | None,
        modalities: list[str],
        prototypes: dict[str, dict[str, Any]] | None = None,
        auto_class: str = "AutoModel",
        enhancer: EnhancerOptions = EnhancerOptions(),
        text_pooling: str = "auto",
        dropout: float | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        text_tower: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        prototypes = copy.deepcopy(prototypes or {})
        check_modalities(modalities, prototypes)
        self.modalities = list(modalities)
        # from_pretrained returns eval mode, and Lightning keeps modules' modes: dropout must be on
        self.backbone = load_encoder(backbone, text_tower, auto_class, backbone_kwargs).train()
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # unused (we pool ourselves); DDP rejects unused parameters
        config = self.backbone.config
        self.hidden_size = config.hidden_size if hasattr(config, "hidden_size") else config.d_model
        if dropout is None:
            names = ("hidden_dropout_prob", "dropout", "dropout_rate")  # BERT, XLNet, T5
            dropout = next((getattr(config, n) for n in names if hasattr(config, n)), 0.1) or 0.1
        self.dropout_rate = float(dropout)
        self.text_pooling = (
            ("last" if config.model_type in LAST_TOKEN_MODELS else "first")
            if text_pooling == "auto"
            else text_pooling
        )
        sentence_positions(torch.ones(1, 1), self.text_pooling)  # validates the option
        if config.model_type == TEXT_TOWER_MODEL_TYPE and self.text_pooling == "first":
            raise ConfigError(
                "model.text_pooling 'first' reads the SOT token of a causal text tower, which "
                "sees nothing but itself; use auto (the last real token, the EOT) or mean"
            )

        self._frozen_extractors: dict[str, PrototypeExtractor] = {}
        self.trainable_extractors = nn.ModuleDict()
        self.sources: dict[str, str] = {}
        built: dict[str, PrototypeExtractor] = {}
        for name in self.modalities[1:]:
            # a source given in the config replaces the default one whole (options differ by kind)
            source = prototypes.get(name) or DEFAULT_PROTOTYPES[name]
            origin = "model.prototypes" if prototypes.get(name) else "the paper's default"
            self.sources[name] = f"{name} <- {_options_text(source)} ({origin})"
            shared = _options_text(effective_source(name, source))
            try:
                extractor = built.get(shared) or build_source(name, source)
            except MacscError as error:
                if prototypes.get(name):
                    raise
                raise ConfigError(
                    f"model.prototypes has no entry for {name!r}, so the paper's extractor "
                    f"{_options_text(source)} is used, and: {error} (note: "
                    f"--model.prototypes '{{...}}' replaces the whole dict; "
                    f"--model.prototypes.{name} '{{kind: ...}}' sets one modality)"
                ) from error
            if extractor.trainable:
                self.trainable_extractors[name] = extractor
            else:
                # modalities with the same frozen source (Table 5: one PLM for all three) share
                # one copy of its weights
                built[shared] = extractor
                self._frozen_extractors[name] = extractor.eval()
        # one enhancer per non-text modality, stacked (SPEC 2): None for a text-only run
        self.enhancers = (
            ConceptEnhancers(
                self.modalities[1:],
                self.hidden_size,
                [self.extractors[name].dim for name in self.modalities[1:]],
                num_heads=enhancer.heads,
                dropout=self.dropout_rate,
                feed_forward=enhancer.feed_forward,
                enhancement=enhancer.enabled,
                shared=enhancer.shared,
            )
            if len(self.modalities) > 1
            else None
        )

    @property
    def extractors(self) -> dict[str, PrototypeExtractor]:
        """The prototype source of every non-text modality, in ``modalities`` order."""
        return {
            m: self._frozen_extractors.get(m) or self.trainable_extractors[m]
            for m in self.modalities[1:]
        }

    @property
    def tokenizer(self) -> Any:
        """A text tower's own tokenizer object; None for a Hugging Face backbone, whose
        tokenizer the data module loads from the backbone's name."""
        return getattr(self.backbone, "tokenizer", None) if self.is_text_tower else None

    @property
    def is_text_tower(self) -> bool:
        return self.backbone.config.model_type == TEXT_TOWER_MODEL_TYPE

    @property
    def encoder(self) -> nn.Module:
        """What gives ``H^t``: the backbone, or the encoder of an encoder-decoder backbone."""
        return (
            self.backbone.get_encoder()
            if self.backbone.config.is_encoder_decoder
            else self.backbone
        )

    def sentence_rows(self, attention_mask: Tensor) -> Tensor | None:
        """``(B, 1)`` the backbone's sentence position in each sample; None for ``mean``."""
        return sentence_positions(attention_mask, self.text_pooling)

    def prototypes_of(self, batch: dict, name: str) -> Prototypes:
        """Modality ``name``'s prototypes of the batch: the cached ones the data module put in
        it, or extracted now from the raw segments (trainable extractors)."""
        stored = batch.get("prototypes", {}).get(name)
        if stored is not None:
            return Prototypes(stored["features"], stored["mask"])
        if "segments" not in batch:
            raise ConfigError(
                f"the batch has no prototypes for modality {name!r} and no raw 'segments' to "
                "extract them from; use a macsc data module (tasks.*) connected to this model"
            )
        device = batch["input_ids"].device
        parts = [self.extractors[name].extract(list(texts)) for texts in batch["segments"]]
        features = torch.cat([p.features for p in parts], dim=1).to(device)
        return Prototypes(features, torch.cat([p.mask for p in parts], dim=1).to(device))

    def forward(self, batch: dict, rows: Tensor | None = None) -> BranchRepresentations:
        """Branch representations of ``batch``; ``rows`` ``(B, r)``: the only positions of
        ``Ĥ^t_m`` the caller reads (the enhancers then query only those rows and the prototype
        rows, :func:`macsc.method.fusion.few_query_attention`), None for every position."""
        return self.enhance(self.encode(batch), batch, rows)

    def encode(self, batch: dict) -> Tensor:
        """``H^t`` ``(B, l, d)``: the backbone's (or its encoder's) last hidden states."""
        inputs = {
            k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch
        }
        return self.encoder(**inputs).last_hidden_state  # H^t: (B, l, d)

    def enhance(
        self, text: Tensor, batch: dict, rows: Tensor | None = None
    ) -> BranchRepresentations:
        """The branch representations from the backbone's output ``text`` ``(B, l, d)``: every
        modality's enhancer at once (:class:`macsc.method.fusion.ConceptEnhancers`)."""
        mask = batch["attention_mask"]  # (B, l)
        if self.enhancers is None:
            return BranchRepresentations(text, mask, None, None, None, rows, self.text_pooling)
        sources = [self.prototypes_of(batch, name) for name in self.modalities[1:]]
        # H^m: (B, n_m, d_m) and its mask (B, n_m) per modality
        enhanced_text, prototypes, masks = self.enhancers(
            text, mask, [s.features for s in sources], [s.mask for s in sources], text_rows=rows
        )  # Ĥ^t_m: (M', B, l, d), or (M', B, r, d) for the rows asked; Ĥ^m: (M', B, n, d)
        return BranchRepresentations(
            text, mask, enhanced_text, prototypes, masks, rows, self.text_pooling
        )


def _options_text(source: dict[str, Any]) -> str:
    options = ", ".join(f"{key}: {value}" for key, value in source.items())
    return "{" + options + "}"


def check_modalities(modalities: list[str], prototypes: dict[str, dict[str, Any]]) -> None:
    if not modalities or modalities[0] != "text":
        raise ConfigError(
            f"model.modalities must start with 'text' (e.g. [text, image, audio, video]); "
            f"got {modalities}"
        )
    if len(set(modalities)) != len(modalities):
        raise ConfigError(f"model.modalities lists a modality twice: {modalities}")
    unknown = [m for m in modalities[1:] if m not in prototypes and m not in DEFAULT_PROTOTYPES]
    if unknown:
        raise ConfigError(
            f"unknown modality {unknown[0]!r} in model.modalities: known ones are "
            f"{['text', *DEFAULT_PROTOTYPES]}; for a new one give its source in "
            f"model.prototypes.{unknown[0]} (e.g. {{kind: gaussian, dim: 512}})"
        )


def effective_source(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The options modality ``name``'s source is built from: Gaussian noise gets the modality's
    own stream, so two modalities with the same options still get independent noise."""
    spec = dict(spec)
    if spec.get("kind") == "gaussian":
        spec.setdefault("stream", name)
    return spec


def build_source(name: str, spec: dict[str, Any]) -> PrototypeExtractor:
    """The prototype extractor of modality ``name`` from its config entry."""
    spec = effective_source(name, spec)
    kind = spec.pop("kind", None)
    if not kind:
        raise ConfigError(
            f"model.prototypes.{name} needs a 'kind' (e.g. open_clip, audioclip, clip_vip, hf, gaussian)"
        )
    try:
        return build_extractor(kind, **spec)
    except TypeError as error:
        raise ConfigError(f"model.prototypes.{name}: {error}") from error


def load_encoder(
    backbone: str | None,
    text_tower: dict[str, Any] | None,
    auto_class: str,
    backbone_kwargs: dict[str, Any] | None,
) -> nn.Module:
    """The module that gives ``H^t``: the Hugging Face ``backbone``, or ``text_tower``."""
    if text_tower is None:
        if not backbone:
            raise ConfigError(
                "model.backbone is not set: give a Hugging Face model name or folder (or "
                "model.text_tower: {kind: open_clip, ...} for an MC-PTM baseline)"
            )
        return load_backbone(backbone, auto_class, backbone_kwargs or {})
    if backbone:
        raise ConfigError(
            f"model.backbone {backbone!r} and model.text_tower are both set; with a text tower "
            "the tower is the encoder: set model.backbone: null (the overlays "
            "lightning_configs/tables/*_text.yaml do; give them after any config that sets a "
            "backbone)"
        )
    if backbone_kwargs:
        raise ConfigError(
            "model.backbone_kwargs apply to a Hugging Face backbone, not a text tower"
        )
    return build_text_tower(text_tower)


#: set inside :func:`backbone_architecture_only`
_ARCHITECTURE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "macsc_backbone_architecture_only", default=False
)


@contextlib.contextmanager
def backbone_architecture_only() -> Iterator[None]:
    """Within this block, a Hugging Face backbone is built from its folder's ``config.json``
    alone, with freshly initialised weights, for a state dict holding every weight to be loaded
    into it afterwards (an exported model, :mod:`macsc.inference`): the folder needs no weights
    file, and none is read twice. Prototype sources and text towers load as usual."""
    token = _ARCHITECTURE_ONLY.set(True)
    try:
        yield
    finally:
        _ARCHITECTURE_ONLY.reset(token)


def load_backbone(name: str, auto_class: str, kwargs: dict[str, Any]) -> nn.Module:
    import transformers

    try:
        path = resolve_pretrained(name)
    except ConfigError as error:
        raise ConfigError(f"model.backbone: {error}") from error
    try:
        if _ARCHITECTURE_ONLY.get():
            config = transformers.AutoConfig.from_pretrained(path)
            model = getattr(transformers, auto_class).from_config(config, **kwargs)
            if os.path.isfile(os.path.join(path, "generation_config.json")):
                model.generation_config = transformers.GenerationConfig.from_pretrained(path)
            return model
        return getattr(transformers, auto_class).from_pretrained(path, **kwargs)
    except OSError as error:
        raise ConfigError(
            f"cannot load the backbone {name!r}: {str(error).splitlines()[0]} -- give a local "
            "folder (save_pretrained layout) or a hub name, and run online once (or set "
            "HF_HOME to a cache that has it) before using HF_HUB_OFFLINE=1"
        ) from error
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        found = re.search(r"configuration class (?:<class ')?([\w.]+)", str(error))
        kind = found.group(1).split(".")[-1] if found else "its configuration"
        if auto_class == "AutoModelForSeq2SeqLM":
            raise ConfigError(
                f"model.backbone {name!r} is an encoder-only model ({kind}), and "
                "generation (CommonGen) needs an encoder-decoder: give --model.backbone t5-base "
                "(or t5-small), or offline a small random one: `macsc tiny-model t5 DIR`, then "
                "--model.backbone DIR"
            ) from error
        raise ConfigError(
            f"model.backbone {name!r} ({kind}) cannot be loaded as {auto_class} for this task; "
            "give a backbone of a kind transformers' AutoModel family lists"
        ) from error
