"""Text-only prototypes from any Hugging Face encoder (paper Table 5: BERT, RoBERTa, T5 encoder).

The same selection as the CLIP family, in each model's own conventions: the scoring row is the
last special token the tokenizer appends (BERT's ``[SEP]``, RoBERTa's and T5's ``</s>``), the
leading specials (``[CLS]``, ``<s>``) are never candidates, and the prototypes are the final
hidden states (these encoders have no projection). Attention comes from the model's own
``output_attentions`` under eager attention. Encoder-decoder models (T5) load their encoder only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from macsc.errors import CheckpointError, ConfigError
from macsc.prototypes.base import register_extractor
from macsc.prototypes.published_weights import file_digest
from macsc.prototypes.windowed import TokenPrototypeExtractor

_PROBE = "prototype probe"


@register_extractor("hf")
class HuggingFaceExtractor(TokenPrototypeExtractor):
    """Options: ``model_name`` (hub name or local folder), ``revision``, ``context_length``
    (default: the tokenizer's ``model_max_length``, capped by the position table), and the
    options of :class:`TokenPrototypeExtractor`."""

    def __init__(
        self,
        model_name: str,
        *,
        revision: str | None = None,
        context_length: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            **options,
        )
        from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer

        from macsc.paths import resolve_pretrained

        location = resolve_pretrained(model_name)  # hub name, folder, or package:<module>
        try:
            config = AutoConfig.from_pretrained(location, revision=revision)
            self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
            model_class = AutoModelForTextEncoding if config.is_encoder_decoder else AutoModel
            model = model_class.from_pretrained(
                location, revision=revision, attn_implementation="eager"
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"cannot load the Hugging Face encoder {model_name!r}: "
                f"{str(error).splitlines()[0][:200]}. Offline? Run once online to fill the "
                "Hugging Face cache, or pass a local folder as the model name"
            ) from error
        self.encoder = model.float()
        self.model_name = model_name
        self.revision = revision
        self._weights = _weights_identity(location, revision)
        with_specials = self.tokenizer(_PROBE)["input_ids"]
        content = self.tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        start = _find(with_specials, content)
        limits = [
            value
            for value in (
                self.tokenizer.model_max_length,
                getattr(config, "max_position_embeddings", None),
            )
            if isinstance(value, int) and value < 1_000_000
        ]
        self._finish_setup(
            num_layers=config.num_hidden_layers,
            context_length=context_length or min(limits, default=512),
            prefix=with_specials[:start],
            suffix=with_specials[start + len(content) :],
            pad_id=self.tokenizer.pad_token_id or 0,
            pad_to_context=False,
        )

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "model_name": self.model_name, "weights": self._weights}

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _encode(self, tokens: Tensor, attention_mask: Tensor, eos: Tensor) -> tuple[Tensor, Tensor]:
        output = self.encoder(
            input_ids=tokens, attention_mask=attention_mask.long(), output_attentions=True
        )
        if output.attentions is None:
            raise ConfigError(
                f"the Hugging Face model {self.model_name!r} returns no attention weights, which "
                "the prototype scores need; choose an encoder with eager attention support"
            )
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        with torch.no_grad():
            scores = torch.stack(
                [
                    output.attentions[index][rows, :, eos].float().mean(dim=1)
                    for index in self.layers
                ]
            ).mean(dim=0)
        return output.last_hidden_state, scores


def _find(sequence: list[int], part: list[int]) -> int:
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start : start + len(part)] == part:
            return start
    raise ConfigError("the tokenizer's special tokens surround the text in a way not understood")


def _weights_identity(model_name: str, revision: str | None) -> str:
    """A local folder is named by its files' content; a hub model by its snapshot commit."""
    folder = Path(model_name)
    if not folder.is_dir():
        from transformers.utils import cached_file

        folder = Path(cached_file(model_name, "config.json", revision=revision)).parent
        if folder.parent.name == "snapshots":
            return f"hub:{model_name}@{folder.name}"
    files = sorted(path for path in folder.iterdir() if path.is_file())
    return "files:" + ",".join(f"{path.name}={file_digest(path)[:16]}" for path in files)
