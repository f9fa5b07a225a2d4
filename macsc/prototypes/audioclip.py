"""Audio prototypes: the text branch of AudioCLIP (SPEC 1; ``AudioCLIP-Full-Training.pt``).

AudioCLIP's release files are one flat state dict of ``class AudioCLIP(CLIP)``: the text tower
under OpenAI-CLIP names (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``) beside ``visual.*``,
``audio.*`` and ``logit_scale*``. The text tower's sizes are read off its tensors as OpenAI's
``build_model`` does, it is built as open_clip's ``TextTransformer`` with QuickGELU, and loaded
strictly (the upstream loader's ``strict=False`` hid mismatches; here they are errors).
"""

from __future__ import annotations

from typing import Any

from macsc.errors import ConfigError
from macsc.prototypes.base import register_extractor
from macsc.prototypes.clip_text import ClipTextExtractor, OpenClipTextTower, clip_tokenizer
from macsc.prototypes.published_weights import (
    block_count,
    checkpoint_path,
    file_digest,
    load_state_dict_file,
    load_strict,
    require_keys,
)

_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")
_OTHER_PREFIXES = ("visual.", "audio.", "logit_scale")
_DOWNLOAD_HINT = (
    "download AudioCLIP-Full-Training.pt (or AudioCLIP-Partial-Training.pt) from "
    "https://github.com/AndreyGuzhov/AudioCLIP/releases and pass its path as checkpoint=PATH"
)


@register_extractor("audioclip")
class AudioClipExtractor(ClipTextExtractor):
    """Options: ``checkpoint`` (required), ``trust_checkpoint``, and the options of
    :class:`TokenPrototypeExtractor`."""

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        trust_checkpoint: bool = False,
        **options: Any,
    ) -> None:
        from open_clip.transformer import QuickGELU, TextTransformer

        if checkpoint is None:
            raise ConfigError(
                f"the audioclip prototype extractor needs checkpoint=PATH: {_DOWNLOAD_HINT}"
            )
        path = checkpoint_path(checkpoint, kind="audioclip", hint=_DOWNLOAD_HINT)
        state = load_state_dict_file(path, trust_checkpoint=trust_checkpoint)
        text = {key: value for key, value in state.items() if _is_text_key(key)}
        # Keys of no AudioCLIP branch stay in, so the strict load names them as unexpected.
        stray = [
            key for key in state if not _is_text_key(key) and not key.startswith(_OTHER_PREFIXES)
        ]
        required = [
            "token_embedding.weight",
            "positional_embedding",
            "ln_final.weight",
            "text_projection",
        ]
        require_keys(text, required, source=path, layout="AudioCLIP", stray=stray)
        text.update({key: state[key] for key in stray})
        width = text["ln_final.weight"].shape[0]
        tower = TextTransformer(
            context_length=text["positional_embedding"].shape[0],
            vocab_size=text["token_embedding.weight"].shape[0],
            width=width,
            heads=max(width // 64, 1),
            layers=block_count(text, "transformer.resblocks."),
            output_dim=text["text_projection"].shape[1],
            act_layer=QuickGELU,
        )
        load_strict(tower, text, source=path, layout="AudioCLIP text tower")
        super().__init__(
            OpenClipTextTower(tower),
            clip_tokenizer(tower.context_length),
            **options,
        )
        self.checkpoint = path

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "checkpoint_sha256": file_digest(self.checkpoint)}


def _is_text_key(key: str) -> bool:
    return key.startswith(_TEXT_PREFIXES) or key == "text_projection"
