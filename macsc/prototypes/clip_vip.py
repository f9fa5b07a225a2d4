"""Video prototypes: the text tower of CLIP-ViP (SPEC 1; ``pretrain_clipvip_base_32.pt``).

The release file is the flat ``state_dict()`` of a wrapper that holds a Hugging Face CLIP model as
``clipmodel``: the text tower is ``clipmodel.text_model.*`` (a ``CLIPTextModel``) plus
``clipmodel.text_projection.weight`` (bias-free). Vision keys are dropped, a stale
``position_ids`` buffer too; every other key must fit. Sizes are read off the tensors
(heads = hidden // 64, QuickGELU as in ``openai/clip-vit-base-patch32``). Tokens come from CLIP's
BPE as bundled with open_clip: the same vocabulary and merges as that model's tokenizer, so
nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from macsc.errors import ConfigError
from macsc.prototypes.base import register_extractor
from macsc.prototypes.clip_text import ClipTextExtractor, HFClipTextTower, clip_tokenizer
from macsc.prototypes.published_weights import (
    block_count,
    checkpoint_path,
    file_digest,
    load_state_dict_file,
    load_strict,
    require_keys,
)

_TEXT = "clipmodel.text_model."
_PROJECTION = "clipmodel.text_projection.weight"
_DROPPED = ("clipmodel.vision_model.", "clipmodel.visual_projection.", "clipmodel.logit_scale")
_STALE = ("embeddings.position_ids",)
_DOWNLOAD_HINT = (
    "download pretrain_clipvip_base_32.pt (microsoft/XPretrain, folder CLIP-ViP) and pass its "
    "path as checkpoint=PATH"
)


@register_extractor("clip_vip")
class ClipVipExtractor(ClipTextExtractor):
    """Options: ``checkpoint`` (required), ``trust_checkpoint``, and the options of
    :class:`TokenPrototypeExtractor`."""

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        trust_checkpoint: bool = False,
        **options: Any,
    ) -> None:
        if checkpoint is None:
            raise ConfigError(
                f"the clip_vip prototype extractor needs checkpoint=PATH: {_DOWNLOAD_HINT}"
            )
        path = checkpoint_path(checkpoint, kind="clip_vip", hint=_DOWNLOAD_HINT)
        state = load_state_dict_file(path, trust_checkpoint=trust_checkpoint)
        stray = [
            key
            for key in state
            if not key.startswith(_TEXT) and key != _PROJECTION and not key.startswith(_DROPPED)
        ]
        require_keys(state, [_PROJECTION], source=path, layout="CLIP-ViP", stray=stray)
        text = {
            key[len(_TEXT) :]: value
            for key, value in state.items()
            if key.startswith(_TEXT) and key[len(_TEXT) :] not in _STALE
        }
        require_keys(
            text,
            [
                "embeddings.token_embedding.weight",
                "embeddings.position_embedding.weight",
                "encoder.layers.0.mlp.fc1.weight",
            ],
            source=path,
            layout=f"CLIP-ViP ({_TEXT}...)",
            stray=stray,
        )
        model = _text_model(text)
        projection_weight = state[_PROJECTION]
        projection = nn.Linear(projection_weight.shape[1], projection_weight.shape[0], bias=False)
        # transformers 4.x nests the modules under ``text_model.``; 5.x does not.
        prefix = (
            "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
        )
        load_strict(
            _WithProjection(model, projection),
            {
                **{f"model.{prefix}{key}": value for key, value in text.items()},
                "projection.weight": projection_weight,
                # Keys outside the layout stay in, so the strict load names them as unexpected.
                **{key: state[key] for key in stray},
            },
            source=path,
            layout="CLIP-ViP text tower",
        )
        super().__init__(
            HFClipTextTower(model, projection),
            clip_tokenizer(model.config.max_position_embeddings),
            **options,
        )
        self.checkpoint = path

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "checkpoint_sha256": file_digest(self.checkpoint)}


class _WithProjection(nn.Module):
    """Both parts under one root, so one strict load checks every key."""

    def __init__(self, model: nn.Module, projection: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.projection = projection


def _text_model(text: dict[str, Any]) -> nn.Module:
    """A ``CLIPTextModel`` whose sizes are those of the checkpoint's tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, hidden = text["embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=text["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=block_count(text, "encoder.layers."),
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=text["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextModel(config).eval()
