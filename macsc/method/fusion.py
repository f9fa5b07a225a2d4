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
                f"model.enhancer.heads={num_heads} must divide the backbone hidden size {hidden_size}"
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
        self,
        text: Tensor,
        text_mask: Tensor,
        prototypes: Tensor,
        prototype_mask: Tensor,
        text_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """text ``(B, l, d)``, text_mask ``(B, l)``, prototypes ``(B, n, d_m)``,
        prototype_mask ``(B, n)`` (True/1 = real). Returns ``(H^t_m (B, l, d), H^m (B, n, d))``.

        text_rows: ``(B, r)`` positions of the only rows of ``H^t_m`` the caller reads (the
        sentence position when the head pools, see :func:`sentence_positions`); ``H^t_m`` is
        then ``(B, r, d)``, those rows of the full result: only those rows and the prototype
        rows are queried (:func:`few_query_attention`), which is most of the module's cost.
        """
        projected = self.project(prototypes.to(self.project.weight.dtype)) + self.type_embedding
        if not self.enhancement:
            return (text if text_rows is None else select_rows(text, text_rows)), projected
        projected = projected.to(text.dtype)
        stacked = torch.cat([text, projected], dim=1)
        padding = ~torch.cat([text_mask.bool(), prototype_mask.bool()], dim=1)
        if text_rows is None:
            query = stacked
            attended, _ = self.attention(
                query, stacked, stacked, key_padding_mask=padding, need_weights=False
            )
        else:
            query = torch.cat([select_rows(text, text_rows), projected], dim=1)
            attended = few_query_attention(self.attention, query, stacked, padding)
        fused = self.norm(query + self.dropout(attended))
        if self.feed_forward is not None:
            fused = self.ff_norm(fused + self.dropout(self.feed_forward(fused)))
        length = query.shape[1] - projected.shape[1]
        return fused[:, :length], fused[:, length:]


def few_query_attention(
    attention: nn.MultiheadAttention, query: Tensor, context: Tensor, padding: Tensor
) -> Tensor:
    """``attention(query, context, context, key_padding_mask=padding)`` for a few query rows,
    without projecting the keys and values of every context row.

    query ``(B, r, d)``, context ``(B, L, d)``, padding ``(B, L)`` bool (True = ignored);
    returns ``(B, r, d)``. For the module :class:`ConceptEnhancer` builds (batch first, one
    width, biases). Per head ``h``: ``q_h . (W_k^h c_j + b_k^h) = (W_k^h' q_h) . c_j + q_h . b_k^h``,
    and the last term, the same for every ``j``, leaves the softmax unchanged; and
    ``sum_j a_j (W_v^h c_j + b_v^h) = W_v^h (sum_j a_j c_j) + b_v^h sum_j a_j`` (the attention
    dropout makes ``sum_j a_j`` differ from one, so it is kept). The same function, with the
    same parameters and dropout, for about ``r H / 2d`` of the key and value projections' work
    (a tenth for ``r = 9`` rows, ``H = 8`` heads, ``d = 384``).
    """
    batch, rows, width = query.shape
    heads = attention.num_heads
    head_dim = width // heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, _, b_v = attention.in_proj_bias.chunk(3)
    q = nn.functional.linear(query, w_q, b_q).view(batch, rows, heads, head_dim)
    q_keys = torch.einsum("brhe,hed->bhrd", q * head_dim**-0.5, w_k.view(heads, head_dim, width))
    scores = torch.einsum("bhrd,bld->bhrl", q_keys, context)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    weights = nn.functional.dropout(
        torch.softmax(scores, dim=-1), attention.dropout, attention.training
    )
    mixed = torch.einsum("bhrl,bld->bhrd", weights, context)
    values = torch.einsum("bhrd,hed->brhe", mixed, w_v.view(heads, head_dim, width))
    values = values + b_v.view(heads, head_dim) * weights.sum(-1).transpose(1, 2).unsqueeze(-1)
    return attention.out_proj(values.reshape(batch, rows, width))


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean over the rows where ``mask`` is true: ``(B, n, d)``, ``(B, n)`` -> ``(B, d)``.

    A fully masked sample (no real prototype) gives a zero vector rather than NaN.
    """
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def select_rows(states: Tensor, rows: Tensor) -> Tensor:
    """``states[b, rows[b, j]]``: ``(B, l, d)``, ``(B, r)`` long -> ``(B, r, d)``."""
    return states.gather(1, rows.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def sentence_positions(attention_mask: Tensor, position: str) -> Tensor | None:
    """Where :func:`sentence_pool` reads each sample, ``(B, 1)`` long; None for ``mean``,
    which reads every row."""
    if position == "first":
        return torch.zeros(
            attention_mask.shape[0], 1, dtype=torch.long, device=attention_mask.device
        )
    if position == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return (attention_mask.bool() * positions).argmax(dim=1, keepdim=True)
    if position == "mean":
        return None
    raise ValueError(f"text_pooling must be first, last, mean or auto; got {position!r}")


def sentence_pool(states: Tensor, attention_mask: Tensor, position: str) -> Tensor:
    """The backbone's own sentence position: ``(B, l, d)`` -> ``(B, d)``.

    ``first`` is [CLS] (BERT, RoBERTa); ``last`` is the last real token (XLNet, which pads on
    the left, so it is the last position; right-padded models get their last non-pad token);
    ``mean`` is the masked mean.
    """
    rows = sentence_positions(attention_mask, position)
    if rows is None:
        return masked_mean(states, attention_mask)
    return select_rows(states, rows)[:, 0]
