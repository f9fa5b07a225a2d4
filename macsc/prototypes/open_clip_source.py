"""Image prototypes: the text tower of an open_clip model (SPEC 1, default ``ViT-B-32``/``openai``).

Weights come from the open_clip pretrained tag (downloaded once into the Hugging Face cache) or
from a local file given as ``checkpoint=PATH``, which then stands in for the tag's download. Only
the text tower is built; the image tower's keys in the file are dropped, every other key must fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from macsc.errors import CheckpointError, ConfigError
from macsc.prototypes.base import register_extractor
from macsc.prototypes.clip_text import ClipTextExtractor, OpenClipTextTower
from macsc.prototypes.published_weights import (
    checkpoint_path,
    file_digest,
    load_state_dict_file,
    load_strict,
)

# Entries of a full open_clip / OpenAI CLIP state dict that do not belong to the text tower
# (OpenAI's TorchScript files also store three sizes as tensors).
_NON_TEXT_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


def text_tower_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The text tower's entries of a whole-model state dict, named as in ``TextTransformer``.

    ``CLIP`` keeps the text modules at the top level; ``CustomTextCLIP`` under ``text.``. Keys
    that are neither image tower nor known scalars stay in, so a strict load reports them.
    """
    if any(key.startswith("text.") for key in state):
        return {
            key[len("text.") :]: value for key, value in state.items() if key.startswith("text.")
        }
    return {
        key: value
        for key, value in state.items()
        if not key.startswith("visual.") and key not in _NON_TEXT_KEYS
    }


@register_extractor("open_clip")
class OpenClipExtractor(ClipTextExtractor):
    """Options: ``model_name`` (an open_clip architecture), ``pretrained`` (its tag),
    ``checkpoint`` (a local weights file instead of the tag's download), ``trust_checkpoint``,
    ``quick_gelu`` (default: what the model config or the tag says), ``download_dir`` (open_clip's
    download cache), and the options of :class:`TokenPrototypeExtractor`."""

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        checkpoint: str | None = None,
        *,
        trust_checkpoint: bool = False,
        quick_gelu: bool | None = None,
        download_dir: str | None = None,
        **options: Any,
    ) -> None:
        import open_clip
        from open_clip.model import _build_text_tower

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ConfigError(
                f"open_clip has no model {model_name!r}; see open_clip.list_models() for names"
            )
        text_cfg = model_cfg["text_cfg"]
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            raise ConfigError(
                f"open_clip model {model_name!r} uses a Hugging Face text tower; use a CLIP-style "
                "model (e.g. ViT-B-32) or the hf extractor kind"
            )
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        if checkpoint is not None:
            path = checkpoint_path(
                checkpoint,
                kind="open_clip",
                hint="pass the path of a local open_clip or OpenAI CLIP weights file",
            )
        elif pretrained:
            if not tag_cfg:
                raise ConfigError(
                    f"open_clip model {model_name!r} has no pretrained tag {pretrained!r}; tags: "
                    f"{open_clip.list_pretrained_tags_by_model(model_name)}"
                )
            path = _download(open_clip, tag_cfg, model_name, pretrained, download_dir)
        else:
            raise ConfigError(
                "the open_clip prototype extractor needs weights: set pretrained (a tag such as "
                "'openai') or checkpoint=PATH"
            )
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
        text = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu)
        state = text_tower_state(load_state_dict_file(path, trust_checkpoint=trust_checkpoint))
        load_strict(text, state, source=path, layout=f"open_clip {model_name} text tower")
        tokenizer = open_clip.get_tokenizer(model_name)
        if not isinstance(tokenizer, open_clip.SimpleTokenizer):
            raise ConfigError(
                f"open_clip model {model_name!r} uses a {type(tokenizer).__name__}; this extractor "
                "reads CLIP's BPE (SimpleTokenizer) models"
            )
        super().__init__(
            OpenClipTextTower(text),
            tokenizer,
            **options,
        )
        self.model_name = model_name
        self.pretrained = pretrained
        self.quick_gelu = quick_gelu
        self.checkpoint = path if checkpoint is not None else None

    def identity(self) -> dict[str, Any]:
        weights = (
            {"checkpoint_sha256": file_digest(self.checkpoint)}
            if self.checkpoint is not None
            else {"pretrained": self.pretrained}
        )
        return {
            **super().identity(),
            "model_name": self.model_name,
            "quick_gelu": self.quick_gelu,
            **weights,
        }


def _download(
    open_clip: Any, tag_cfg: dict, model_name: str, pretrained: str, download_dir: str | None
) -> Path:
    try:
        return Path(open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=download_dir))
    except Exception as error:  # hub, network and file errors all mean "no weights here"
        raise CheckpointError(
            f"could not get the open_clip weights {model_name}/{pretrained}: "
            f"{str(error).splitlines()[0][:200]}. Offline? Download the weights file once while "
            "online (open_clip caches it), or pass the extractor option checkpoint=PATH to a "
            "local copy"
        ) from error
