"""The extraction pipeline shared by every text-encoder source (SPEC 1, steps 1-6).

:class:`TokenPrototypeExtractor` tokenizes, cuts windows, runs the encoder in batches, lets the
candidates of all windows of a text compete in one top-k, and returns the chosen tokens' final
states. A subclass supplies only what differs between encoders: its tokenizer and special tokens
(:meth:`_token_ids`), one encoder pass that returns hidden states and EOS-row attention scores
(:meth:`_encode`), and the map from hidden states to prototype width (:meth:`_project`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from macsc.errors import ConfigError
from macsc.prototypes.base import PrototypeExtractor, Prototypes
from macsc.prototypes.selection import (
    attention_layer_indices,
    build_windows,
    per_text_view,
    select_top_k,
)

# Bump when the selection or pooling logic changes, so old cache entries stop matching.
ALGORITHM_VERSION = 1


class TokenPrototypeExtractor(PrototypeExtractor):
    """Top-k tokens of a text encoder, ranked by the attention of the EOS row.

    Options shared by every kind:
      k: prototypes per segment.
      attention_layers: ``"last"`` | ``"all"`` | list of block indices whose EOS-row attention is
        averaged.
      include_eot: whether the EOS/EOT token itself may be chosen.
      trainable: fine-tune the encoder (paper Table 6); the prototype cache is then off.
      max_windows: windows kept per segment; content beyond ``max_windows`` windows is dropped
        (a cap for very long texts, with a warning).
      batch_size: windows per encoder forward inside one :meth:`extract` call.
    """

    def __init__(
        self,
        *,
        k: int = 8,
        attention_layers: str | int | Sequence[int] = "last",
        include_eot: bool = True,
        trainable: bool = False,
        max_windows: int = 16,
        batch_size: int = 256,
    ) -> None:
        super().__init__(k=k, trainable=trainable)
        for name, value in (("max_windows", max_windows), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"prototype option {name} must be an integer >= 1, got {value!r}")
        self.attention_layers = attention_layers
        self.include_eot = bool(include_eot)
        self.max_windows = max_windows
        self.batch_size = batch_size
        self._warned_truncation = False

    def _finish_setup(
        self,
        *,
        num_layers: int,
        context_length: int,
        prefix: list[int],
        suffix: list[int],
        pad_id: int,
        pad_to_context: bool,
    ) -> None:
        """Fix the token layout once the encoder is loaded, and freeze it unless trainable."""
        self.layers = attention_layer_indices(self.attention_layers, num_layers)
        self.context_length = context_length
        self.prefix, self.suffix, self.pad_id = list(prefix), list(suffix), pad_id
        self.pad_to_context = pad_to_context
        offer = context_length - len(prefix) - len(suffix) + int(self.include_eot and bool(suffix))
        if self.k > offer:
            raise ConfigError(
                f"prototype option k={self.k} is larger than the {offer} tokens one "
                f"{context_length}-token window of the {self.kind} encoder can offer; choose "
                f"k <= {offer}"
            )
        self.requires_grad_(self.trainable)
        self.train(self.training)

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "algorithm": ALGORITHM_VERSION,
            "attention_layers": self.layers,
            "include_eot": self.include_eot,
            "max_windows": self.max_windows,
            "context_length": self.context_length,
        }

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Content token ids of each text, without special tokens and without truncation."""
        raise NotImplementedError

    def _encode(self, tokens: Tensor, attention_mask: Tensor, eos: Tensor) -> tuple[Tensor, Tensor]:
        """One encoder pass over windows ``(W, L)``.

        Returns hidden states ``(W, L, width)`` (after the final norm) and scores ``(W, L)``:
        the attention from row ``eos`` to each token, averaged over heads and ``self.layers``.
        """
        raise NotImplementedError

    def _project(self, hidden: Tensor) -> Tensor:
        """``(..., width)`` -> ``(..., dim)``; identity unless the encoder has a projection."""
        return hidden

    def _extract(self, texts: list[str]) -> Prototypes:
        windows = build_windows(
            self._token_ids(texts),
            prefix=self.prefix,
            suffix=self.suffix,
            context_length=self.context_length,
            pad_id=self.pad_id,
            include_eos=self.include_eot,
            max_windows=self.max_windows,
            pad_to_context=self.pad_to_context,
        )
        if windows.truncated and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"{windows.truncated} text(s) are longer than max_windows={self.max_windows} "
                f"windows of {self.context_length} tokens; the {self.kind} prototypes only see "
                "their beginning (raise the extractor option max_windows to see more)",
                stacklevel=3,
            )
        device = self.device
        hidden_parts, score_parts = [], []
        for start in range(0, len(windows.tokens), self.batch_size):
            part = slice(start, start + self.batch_size)
            hidden, scores = self._encode(
                windows.tokens[part].to(device),
                windows.attention_mask[part].to(device),
                windows.eos[part].to(device),
            )
            hidden_parts.append(hidden)
            score_parts.append(scores)
        hidden = torch.cat(hidden_parts)
        scores = torch.cat(score_parts)
        slots = windows.slots.to(device)
        length = windows.tokens.shape[1]
        indices, mask = select_top_k(
            per_text_view(scores, slots),
            per_text_view(windows.candidates.to(device), slots, fill=False),
            self.k,
        )
        window = slots.gather(1, indices // length).clamp(min=0)
        chosen = hidden[window, indices % length]
        features = self._project(chosen).masked_fill(~mask.unsqueeze(-1), 0.0)
        return Prototypes(features, mask)
