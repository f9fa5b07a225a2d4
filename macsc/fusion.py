"""Semantic concept enhancement (paper Section 2.3, Eq. 2-3; SPEC section 2) and pooling."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConceptEnhancer(nn.Module):
    """Fuses one modality's prototypes with the PLM's token states.

    ``P_m = Linear_m(H^m) + type_m``; ``E = [H^t ; P_m]``; multi-head self-attention over ``E``
    with shared Q, K, V projections for both parts (Eq. 2), then a residual connection and
    LayerNorm, and an optional feed-forward block. With ``enhancement=False`` (the paper's
    "w/o Concept Enhancement") the attention is skipped: ``H^t_m = H^t`` and ``H^m = P_m``.
    """

    def __init__(
        self,
        hidden_size: int,
        prototype_dim: int,
        num_heads: int = 8,
        dropout: float = 0.1,
        feed_forward: bool = False,
        enhancement: bool = True,
    ) -> None:
        super().__init__()
        if enhancement and hidden_size % num_heads:
            raise ValueError(
                f"enhancer_heads={num_heads} must divide the backbone hidden size {hidden_size}"
            )
        self.project = nn.Linear(prototype_dim, hidden_size)
        self.type_embedding = nn.Parameter(torch.zeros(hidden_size))
        nn.init.normal_(self.type_embedding, std=0.02)
        self.enhancement = enhancement
        if enhancement:
            self.attention = nn.MultiheadAttention(
                hidden_size, num_heads, dropout=dropout, batch_first=True
            )
            self.dropout = nn.Dropout(dropout)
            self.norm = nn.LayerNorm(hidden_size)
            self.feed_forward = (
                nn.Sequential(
                    nn.Linear(hidden_size, 4 * hidden_size),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(4 * hidden_size, hidden_size),
                )
                if feed_forward
                else None
            )
            self.ff_norm = nn.LayerNorm(hidden_size) if feed_forward else None

    def forward(
        self, text: Tensor, text_mask: Tensor, prototypes: Tensor, prototype_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """text ``(B, l, d)``, text_mask ``(B, l)``, prototypes ``(B, n, d_m)``,
        prototype_mask ``(B, n)`` (True/1 = real). Returns ``(H^t_m (B, l, d), H^m (B, n, d))``.
        """
        projected = self.project(prototypes.to(self.project.weight.dtype)) + self.type_embedding
        if not self.enhancement:
            return text, projected
        stacked = torch.cat([text, projected.to(text.dtype)], dim=1)
        padding = ~torch.cat([text_mask.bool(), prototype_mask.bool()], dim=1)
        attended, _ = self.attention(
            stacked, stacked, stacked, key_padding_mask=padding, need_weights=False
        )
        fused = self.norm(stacked + self.dropout(attended))
        if self.feed_forward is not None:
            fused = self.ff_norm(fused + self.dropout(self.feed_forward(fused)))
        length = text.shape[1]
        return fused[:, :length], fused[:, length:]


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean over the rows where ``mask`` is true: ``(B, n, d)``, ``(B, n)`` -> ``(B, d)``.

    A fully masked sample (no real prototype) gives a zero vector rather than NaN.
    """
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def sentence_pool(states: Tensor, attention_mask: Tensor, position: str) -> Tensor:
    """The backbone's own sentence position: ``(B, l, d)`` -> ``(B, d)``.

    ``first`` is [CLS] (BERT, RoBERTa); ``last`` is the last real token (XLNet, which pads on
    the left, so it is the last position; right-padded models get their last non-pad token);
    ``mean`` is the masked mean.
    """
    if position == "first":
        return states[:, 0]
    if position == "last":
        positions = torch.arange(states.shape[1], device=states.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), last]
    if position == "mean":
        return masked_mean(states, attention_mask)
    raise ValueError(f"text_pooling must be first, last, mean or auto; got {position!r}")
