"""MC-PTM baselines (SPEC 13; paper Table 4 "+None" rows of CLIP, AudioCLIP, CLIP-ViP): the text
tower of a multimodal contrastive model as the encoder that MaCSC fine-tunes.

The tower is built and loaded exactly as the prototype extractor of the same ``kind`` builds it
(:mod:`macsc.prototypes`: open_clip, AudioCLIP, CLIP-ViP; strict loading), then taken out of the
extractor and trained with the heads. :class:`TextTowerEncoder` presents the part of a Hugging
Face encoder the network reads (``config.hidden_size``, ``config.model_type``,
``config.is_encoder_decoder``, ``forward(...).last_hidden_state``), so the heads, the objective
and the optimiser treat it like any backbone.

Decisions:

- ``H^t`` is every position's final state after the tower's final LayerNorm **and its text
  projection** (``projection: true``, the default): the same per-token features the prototypes
  are (SPEC 1 step 5), whose EOT row is what CLIP's ``encode_text`` returns. Widths: CLIP
  ViT-B/32 512, AudioCLIP 1024, CLIP-ViP 512. ``projection: false`` gives the transformer width.
- The sentence position is the last real token (``text_pooling: auto`` is ``last``), which is
  the final EOT: CLIP's pooled EOT for a single text, and for a pair (``SOT a EOT EOT b EOT``)
  the only position a causal tower lets see both texts. ``first`` (SOT) is refused: under the
  causal mask it sees nothing but itself.
- Text is tokenised by the tower's own BPE (open_clip's bundled vocabulary) as a Hugging Face
  ``CLIPTokenizer`` (:func:`clip_hf_tokenizer`), which gives the data modules pair encoding,
  truncation and the offset mappings SQuAD needs; ids equal open_clip's for ordinary text
  (open_clip also unescapes HTML entities such as ``&amp;`` and fixes mojibake with ftfy; this
  tokenizer does not).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from macsc.errors import ConfigError, MacscError
from macsc.prototypes import build_extractor
from macsc.prototypes.clip_text import ClipTextExtractor, ClipTextTower
from macsc.prototypes.windowed import TokenPrototypeExtractor

#: the extractor kinds whose text tower can be the encoder
TEXT_TOWER_KINDS = ("open_clip", "audioclip", "clip_vip")
#: ``config.model_type`` of a text tower encoder
TEXT_TOWER_MODEL_TYPE = "clip_text_tower"
#: options of prototype selection, which mean nothing for an encoder
_SELECTION_OPTIONS = frozenset(
    name
    for name in inspect.signature(TokenPrototypeExtractor.__init__).parameters
    if name != "self"
)


@dataclass(frozen=True)
class TextTowerConfig:
    """What the network and the heads read of a backbone's config."""

    hidden_size: int
    model_type: str = TEXT_TOWER_MODEL_TYPE
    is_encoder_decoder: bool = False


@dataclass
class TextTowerOutput:
    """``last_hidden_state`` ``(B, l, hidden_size)``, as a Hugging Face encoder returns it."""

    last_hidden_state: Tensor


class TextTowerEncoder(nn.Module):
    """A causal CLIP text tower as a trainable encoder.

    tower: the layout adapter the extractor built (:class:`ClipTextTower`), weights loaded.
    tokenizer: the Hugging Face tokenizer of the tower's BPE (:func:`clip_hf_tokenizer`).
    projection: apply the tower's text projection to every position (module docstring).
    description: the options it was built from, for messages.
    """

    def __init__(
        self, tower: ClipTextTower, tokenizer: Any, projection: bool, description: str
    ) -> None:
        super().__init__()
        self.tower = tower.requires_grad_(True)
        self.tokenizer = tokenizer
        self.projection = bool(projection)
        if not self.projection:
            # unused then: frozen, or DDP would stop on a parameter that never gets a gradient
            for name, parameter in tower.named_parameters():
                if "text_projection" in name:
                    parameter.requires_grad_(False)
        self.context_length = tower.context_length
        self.description = description
        self.config = TextTowerConfig(tower.output_dim if self.projection else tower.width)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextTowerOutput:
        """``input_ids`` ``(B, l)``, right-padded, ``l <= context_length``: every position's
        state ``(B, l, hidden_size)``. The attention mask is not needed: under the causal mask
        no real token sees the padding after it."""
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ConfigError(
                f"the text tower {self.description} reads at most {self.context_length} tokens, "
                f"got {length}; set data.init_args.max_length: {self.context_length}"
            )
        # open_clip's towers take exactly their context (their causal mask is not cut to l)
        tokens = nn.functional.pad(
            input_ids, (0, self.context_length - length), value=self.tokenizer.pad_token_id
        )
        hidden = self.tower.hidden_states(tokens)[:, :length]
        return TextTowerOutput(self.tower.project(hidden) if self.projection else hidden)


def build_text_tower(options: dict[str, Any]) -> TextTowerEncoder:
    """The encoder of ``model.text_tower``: ``kind`` (one of :data:`TEXT_TOWER_KINDS`), the
    options that load that kind's weights (as in ``model.prototypes``: ``model_name``,
    ``pretrained``, ``checkpoint``, ``trust_checkpoint``, ...), and ``projection`` (default
    true)."""
    options = dict(options or {})
    description = "{" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}"
    kind = options.pop("kind", None)
    projection = options.pop("projection", True)
    if kind not in TEXT_TOWER_KINDS:
        raise ConfigError(
            f"model.text_tower kind {kind!r} is not a text tower; choose one of "
            f"{list(TEXT_TOWER_KINDS)} (a Hugging Face encoder is model.backbone)"
        )
    selection = sorted(set(options) & _SELECTION_OPTIONS)
    if selection:
        raise ConfigError(
            f"model.text_tower has no option {selection[0]!r}: that option selects prototypes, "
            "and the tower here is the encoder; give only the options that load its weights"
        )
    try:
        extractor = build_extractor(kind, **options)
    except MacscError as error:
        raise type(error)(f"model.text_tower: {error}") from error
    if not isinstance(extractor, ClipTextExtractor):
        raise ConfigError(f"model.text_tower kind {kind!r} built no CLIP text tower")
    tokenizer = clip_hf_tokenizer(extractor.tokenizer, extractor.tower.context_length)
    return TextTowerEncoder(extractor.tower, tokenizer, projection, description)


def clip_hf_tokenizer(simple_tokenizer: Any, context_length: int) -> Any:
    """open_clip's CLIP BPE tokenizer as a Hugging Face ``CLIPTokenizer``: the same vocabulary,
    merges and ``SOT``/``EOT`` ids; pairs as ``SOT a EOT EOT b EOT``; padding with EOT;
    ``model_max_length`` the tower's context. Nothing is downloaded."""
    from transformers import CLIPTokenizer

    clean = getattr(simple_tokenizer.clean_fn, "__name__", "")
    if clean != "_clean_lower" or getattr(simple_tokenizer, "reduction_fn", None) is not None:
        raise ConfigError(
            f"the text tower's tokenizer cleans text with {clean or 'a custom function'} (or "
            "reduces the text); as an encoder only CLIP's own lower-casing BPE is supported"
        )
    merges = [pair for pair, _ in sorted(simple_tokenizer.bpe_ranks.items(), key=lambda x: x[1])]
    start = simple_tokenizer.decoder[simple_tokenizer.sot_token_id]
    end = simple_tokenizer.decoder[simple_tokenizer.eot_token_id]
    return CLIPTokenizer(
        vocab=dict(simple_tokenizer.encoder),
        merges=merges,
        bos_token=start,
        eos_token=end,
        unk_token=end,
        pad_token=end,
        model_max_length=context_length,
    )
