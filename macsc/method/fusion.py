"""Semantic concept enhancement (paper Section 2.3, Eq. 2-3; SPEC section 2) and pooling.

Every non-text modality has its own enhancer parameters (SPEC 2); they are stored stacked along
a leading modality axis, so that the enhancers of all modalities run as one batched computation
(one chain of batched products) instead of one module call each: on a GPU a training step is
bound by how many operators the host launches, not by their arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from macsc.method.attention import StackedAttention
from macsc.method.stacked import BlockProjection, StackedLayerNorm, StackedLinear, as_dtype


class ConceptEnhancers(nn.Module):
    """Fuses each non-text modality's prototypes with the PLM's token states, all modalities at
    once.

    For modality ``m``: ``P_m = Linear_m(H^m) + type_m``; ``E = [H^t ; P_m]``; multi-head
    self-attention over ``E`` with shared Q, K, V projections for both parts (Eq. 2), then a
    residual connection and LayerNorm, and an optional feed-forward block. With
    ``enhancement=False`` (the paper's "w/o Concept Enhancement") the attention is skipped:
    ``H^t_m = H^t`` and ``H^m = P_m``. ``shared``: one attention block (attention, norms,
    feed-forward) for every modality, each modality keeping its projection and type embedding.

    Parameters: ``project`` (:class:`macsc.method.stacked.BlockProjection`: the weights
    ``(d, d_m)`` of all modalities side by side, ``(d, Σ d_m)``, and their biases ``(M, d)``),
    ``type_embedding`` ``(M, d)``, ``attention`` (:class:`macsc.method.attention.StackedAttention`),
    ``norm``, and with ``feed_forward`` ``feed_forward.0``, ``feed_forward.3`` and ``ff_norm``,
    each stacked along a leading axis of ``M`` modalities (1 when ``shared``).
    :meth:`parameters_of` gives one modality's, by name, as the per-modality modules of earlier
    versions named them (:data:`macsc.training.legacy` reads their checkpoints). Each is
    initialised as those modules initialised theirs (``nn.Linear``, ``nn.MultiheadAttention``),
    drawing the random numbers in the same order.
    """

    def __init__(
        self,
        modalities: list[str],
        hidden_size: int,
        prototype_dims: list[int],
        num_heads: int = 8,
        dropout: float = 0.1,
        feed_forward: bool = False,
        enhancement: bool = True,
        shared: bool = False,
    ) -> None:
        super().__init__()
        if enhancement and hidden_size % num_heads:
            raise ValueError(
                f"model.enhancer.heads={num_heads} must divide the backbone hidden size {hidden_size}"
            )
        self.modalities = list(modalities)
        self.enhancement = enhancement
        self.shared = shared and enhancement
        count, width = len(modalities), hidden_size
        blocks = 1 if self.shared else count
        self.project = BlockProjection(prototype_dims, width)
        self.type_embedding = nn.Parameter(torch.zeros(count, width))
        if enhancement:
            self.attention = StackedAttention(blocks, width, num_heads, dropout)
            self.dropout = nn.Dropout(dropout)
            self.norm = StackedLayerNorm(blocks, width)
            self.feed_forward = (
                nn.Sequential(
                    StackedLinear(blocks, width, 4 * width, initialise=False),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    StackedLinear(blocks, 4 * width, width, initialise=False),
                )
                if feed_forward
                else None
            )
            self.ff_norm = StackedLayerNorm(blocks, width) if feed_forward else None
        for index in range(count):
            self._initialise(index, index if index < blocks else None, feed_forward)

    @torch.no_grad()
    def _initialise(self, index: int, block: int | None, feed_forward: bool) -> None:
        """Modality ``index``'s projection and type embedding and (into slice ``block``; None:
        the shared block is the first modality's) its attention block, with the draws of
        earlier versions."""
        projection = nn.Linear(self.project.in_features[index], self.project.weight.shape[0])
        self.project.weight[:, self.project.block(index)] = projection.weight
        self.project.bias[index] = projection.bias
        nn.init.normal_(self.type_embedding[index], std=0.02)
        if not self.enhancement:
            return
        width = self.type_embedding.shape[1]
        out_proj = nn.Linear(width, width)  # nn.MultiheadAttention's: its bias then set to 0
        in_proj = nn.init.xavier_uniform_(torch.empty(3 * width, width))
        ff = (nn.Linear(width, 4 * width), nn.Linear(4 * width, width)) if feed_forward else ()
        if block is None:
            return
        self.attention.in_proj_weight[block] = in_proj
        self.attention.out_proj.weight[block] = out_proj.weight
        self.attention.out_proj.bias[block] = 0.0
        if ff:
            for layer, linear in zip((self.feed_forward[0], self.feed_forward[3]), ff, strict=True):
                layer.weight[block], layer.bias[block] = linear.weight, linear.bias

    def parameters_of(self, name: str) -> dict[str, Tensor]:
        """Modality ``name``'s parameters (views of the stacked ones), keyed as one module per
        modality named them: ``project.weight``, ``type_embedding``,
        ``attention.in_proj_weight``, ``norm.weight``, ..."""
        index = self.modalities.index(name)
        out = {
            key: value[index if value.shape[0] > 1 else 0] for key, value in self.named_parameters()
        }
        out["project.weight"] = self.project.weight[:, self.project.block(index)]
        return out

    def forward(
        self,
        text: Tensor,
        text_mask: Tensor,
        prototypes: list[Tensor],
        prototype_masks: list[Tensor],
        text_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """text ``(B, l, d)``, text_mask ``(B, l)``, prototypes ``(B, n_m, d_m)`` and their
        masks ``(B, n_m)`` (True/1 = real) per modality, in ``modalities`` order.

        Returns ``Ĥ^t`` ``(M, B, l, d)``, ``Ĥ^m`` ``(M, B, n, d)`` and its mask ``(M, B, n)``
        bool, ``n = max n_m`` (a modality with fewer prototype rows is padded with masked rows).
        text_rows: ``(B, r)`` positions of the only rows of ``Ĥ^t`` the caller reads (the
        sentence position when the head pools, see :func:`sentence_positions`); ``Ĥ^t`` is
        then ``(M, B, r, d)``, those rows of the full result: only those rows and the prototype
        rows are queried (:func:`few_query_attention`), which is most of the module's cost.
        """
        count, rows = len(self.modalities), max(p.shape[1] for p in prototypes)
        projected = self.project(prototypes, rows, self.type_embedding)  # P: (M, B, n, d)
        prototype_mask = torch.stack(
            [_pad_rows(as_dtype(m, torch.bool), rows) for m in prototype_masks]
        )  # (M, B, n)
        queried = text if text_rows is None else select_rows(text, text_rows)  # (B, l or r, d)
        if not self.enhancement:
            return queried.expand(count, *queried.shape), projected, prototype_mask
        projected = as_dtype(projected, text.dtype)
        context = torch.cat([text.expand(count, *text.shape), projected], 2)  # E: (M, B, l+n, d)
        text_mask = as_dtype(text_mask, torch.bool)
        padding = ~torch.cat([text_mask.expand(count, *text_mask.shape), prototype_mask], 2)
        query = (
            context
            if text_rows is None
            else torch.cat([queried.expand(count, *queried.shape), projected], 2)
        )  # (M, B, l + n, d), or (M, B, r + n, d) for the rows asked
        fused = self.norm(query + self.dropout(self.attention(query, context, padding)))
        if self.feed_forward is not None:
            fused = self.ff_norm(fused + self.dropout(self.feed_forward(fused)))
        split = queried.shape[1]
        return fused[:, :, :split], fused[:, :, split:], prototype_mask


def _pad_rows(states: Tensor, rows: int) -> Tensor:
    """``(B, n, ...)`` padded with zero rows to ``(B, rows, ...)`` (False for a bool mask)."""
    missing = rows - states.shape[1]
    if not missing:
        return states
    return torch.cat([states, states.new_zeros(states.shape[0], missing, *states.shape[2:])], 1)


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean over the rows where ``mask`` is true: ``(..., n, d)``, ``(..., n)`` -> ``(..., d)``.

    A fully masked sample (no real prototype) gives a zero vector rather than NaN.
    """
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(-2) / weights.sum(-2).clamp_min(1.0)


def select_rows(states: Tensor, rows: Tensor) -> Tensor:
    """``states[..., b, rows[b, j], :]``: ``(..., B, l, d)``, ``(B, r)`` long -> ``(..., B, r, d)``."""
    index = rows.unsqueeze(-1).expand(*states.shape[:-3], -1, -1, states.shape[-1])
    return states.gather(-2, index)


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
    """The backbone's own sentence position: ``(..., B, l, d)`` -> ``(..., B, d)``.

    ``first`` is [CLS] (BERT, RoBERTa); ``last`` is the last real token (XLNet, which pads on
    the left, so it is the last position; right-padded models get their last non-pad token);
    ``mean`` is the masked mean.
    """
    rows = sentence_positions(attention_mask, position)
    if rows is None:
        return masked_mean(states, attention_mask)
    return select_rows(states, rows).squeeze(-2)
