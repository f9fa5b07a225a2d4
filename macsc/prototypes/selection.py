"""Token windows and top-k prototype selection (SPEC 1, steps 3-6), as pure functions.

Every token-selecting extractor (the CLIP family and the Hugging Face encoders) goes through the
same three steps here: cut each text's token ids into windows that fit the encoder's context
(:func:`build_windows`), score the tokens of every window by the attention their EOS row pays them
(the extractor's job), then let the candidates of all windows of a text compete in one top-k
(:func:`select_top_k` on :func:`per_text_view`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from macsc.errors import ConfigError


def attention_layer_indices(option: str | int | Sequence[int], num_layers: int) -> list[int]:
    """The transformer blocks whose EOS-row attention is averaged (SPEC 1.3).

    ``option``: ``"last"``, ``"all"``, one index or a list of indices (negative counts from the
    end). Returns sorted, distinct, non-negative indices.
    """
    if option == "last":
        return [num_layers - 1]
    if option == "all":
        return list(range(num_layers))
    if isinstance(option, str) or isinstance(option, bool):
        raise ConfigError(
            f"prototype option attention_layers={option!r} is not understood; use 'last', 'all' "
            "or a list of block indices"
        )
    indices = [option] if isinstance(option, int) else list(option)
    if not indices:
        raise ConfigError("prototype option attention_layers is an empty list; name >= 1 block")
    resolved = set()
    for index in indices:
        if not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ConfigError(
                f"prototype option attention_layers has {index!r}, but the text encoder has "
                f"{num_layers} blocks; use indices in [-{num_layers}, {num_layers - 1}]"
            )
        resolved.add(index % num_layers)
    return sorted(resolved)


@dataclass
class Windows:
    """Token windows of a batch of ``T`` texts, ``W`` windows in all.

    tokens: ``(W, L)`` long, each window ``prefix + piece + suffix`` then padding.
    attention_mask: ``(W, L)`` bool, True on real tokens (specials included).
    eos: ``(W,)`` long, position of the row whose attention scores the tokens (the last suffix
        token: CLIP's EOT, BERT's [SEP], T5's ``</s>``; the last token when there is no suffix).
    candidates: ``(W, L)`` bool, the tokens that may become prototypes.
    slots: ``(T, S)`` long, the windows of each text in order, ``-1`` past a text's last window.
    truncated: number of texts that had more than ``max_windows`` windows of content.
    """

    tokens: Tensor
    attention_mask: Tensor
    eos: Tensor
    candidates: Tensor
    slots: Tensor
    truncated: int = 0


def build_windows(
    token_ids: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int],
    suffix: Sequence[int],
    context_length: int,
    pad_id: int,
    include_eos: bool = True,
    max_windows: int = 16,
    pad_to_context: bool = True,
) -> Windows:
    """Cut each text's content ids (no special tokens) into consecutive windows (SPEC 1.6).

    Each window holds at most ``context_length - len(prefix) - len(suffix)`` content tokens and
    gets its own specials; an empty text still gets one window. Candidates are the content tokens
    plus, with ``include_eos``, the EOS row itself; prefix tokens (SOT, [CLS]) and padding never.
    ``pad_to_context`` pads every window to ``context_length`` (CLIP's absolute positions and
    causal mask are built for it); otherwise to the longest window of the batch.
    """
    capacity = context_length - len(prefix) - len(suffix)
    if capacity < 1:
        raise ConfigError(
            f"context_length={context_length} leaves no room for text between the "
            f"{len(prefix) + len(suffix)} special tokens"
        )
    rows: list[list[int]] = []
    owners: list[int] = []
    content: list[tuple[int, int]] = []
    truncated = 0
    for text_index, ids in enumerate(token_ids):
        pieces = [list(ids[start : start + capacity]) for start in range(0, len(ids), capacity)]
        if len(pieces) > max_windows:
            truncated += 1
            pieces = pieces[:max_windows]
        for piece in pieces or [[]]:
            rows.append([*prefix, *piece, *suffix])
            owners.append(text_index)
            content.append((len(prefix), len(prefix) + len(piece)))

    width = context_length if pad_to_context else max(len(row) for row in rows)
    count = len(rows)
    tokens = torch.full((count, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(count, width, dtype=torch.bool)
    candidates = torch.zeros(count, width, dtype=torch.bool)
    eos = torch.empty(count, dtype=torch.long)
    for window, row in enumerate(rows):
        tokens[window, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[window, : len(row)] = True
        start, stop = content[window]
        candidates[window, start:stop] = True
        eos[window] = len(row) - 1
        if include_eos:
            candidates[window, len(row) - 1] = True

    texts = len(token_ids)
    per_text = torch.bincount(torch.tensor(owners, dtype=torch.long), minlength=texts)
    slots = torch.full((texts, int(per_text.max()) if texts else 0), -1, dtype=torch.long)
    first = torch.cumsum(per_text, 0) - per_text
    for text_index in range(texts):
        n = int(per_text[text_index])
        slots[text_index, :n] = torch.arange(int(first[text_index]), int(first[text_index]) + n)
    return Windows(tokens, attention_mask, eos, candidates, slots, truncated)


def per_text_view(values: Tensor, slots: Tensor, fill: float | bool = 0) -> Tensor:
    """Lay each text's windows end to end: ``(W, L, ...)`` -> ``(T, S * L, ...)``.

    Positions of the result run through window 0, then window 1, ..., so sorting them keeps the
    original token order; slots of ``-1`` (a text with fewer windows) are filled with ``fill``.
    """
    texts, slot_count = slots.shape
    gathered = values[slots.clamp(min=0)]
    absent = (slots < 0).view(texts, slot_count, *([1] * (values.dim() - 1)))
    gathered = gathered.masked_fill(absent, fill)
    return gathered.reshape(texts, slot_count * values.shape[1], *values.shape[2:])


def select_top_k(scores: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` candidates by score, returned in their original order (SPEC 1.5).

    scores: ``(B, L)`` float, candidates: ``(B, L)`` bool. Returns ``indices (B, k)`` long,
    ascending within each row, and ``mask (B, k)`` bool; rows with fewer than ``k`` candidates
    are padded with index 0 and mask False. Ties go to the earlier position (a stable sort), so
    the choice does not depend on the device.
    """
    batch, length = scores.shape
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
    chosen = candidates.gather(1, order)
    # Positions of non-candidates move past every real position, so an ascending sort puts
    # the real picks first, in text order, and the padding last.
    beyond = length + torch.arange(order.shape[1], device=scores.device).expand_as(order)
    positions = torch.sort(torch.where(chosen, order, beyond), dim=1).values
    mask = positions < length
    indices = torch.where(mask, positions, torch.zeros_like(positions))
    if indices.shape[1] < k:
        missing = k - indices.shape[1]
        indices = torch.cat([indices, indices.new_zeros(batch, missing)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(batch, missing)], dim=1)
    return indices, mask
