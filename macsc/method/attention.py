"""The enhancers' multi-head attention (Eq. 2), one set of weights per modality, all modalities
at once; and, for the few rows a pooled head reads, attention without projecting the keys and
values of every row, with a hand-written backward (:func:`few_query_attention`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from macsc.method.stacked import StackedLinear, as_dtype, compute_dtype, stacked_linear


class StackedAttention(nn.Module):
    """Multi-head attention with one set of weights per slice of the leading axis (``M``
    modalities, or 1 shared), laid out as ``nn.MultiheadAttention``'s: ``in_proj_weight``
    ``(M, 3d, d)`` (Q, K, V), ``in_proj_bias`` ``(M, 3d)``, ``out_proj``; its dropout acts on
    the attention probabilities."""

    def __init__(self, blocks: int, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.zeros(blocks, 3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(blocks, 3 * width))
        self.out_proj = StackedLinear(blocks, width, width, initialise=False)

    def forward(self, query: Tensor, context: Tensor, padding: Tensor) -> Tensor:
        """Every row of ``context`` attends (``query is context``), or a few rows do
        (:func:`few_query_attention`). query ``(M, B, r, d)``, context ``(M, B, L, d)``, padding
        ``(M, B, L)`` bool (True = ignored) -> ``(M, B, r, d)``."""
        if query is not context:
            return few_query_attention(self, query, context, padding)
        models, batch, length, width = context.shape
        heads = self.num_heads
        qkv = stacked_linear(context, self.in_proj_weight, self.in_proj_bias)  # (M, B, L, 3d)
        q, k, v = (
            part.reshape(models * batch, length, heads, width // heads).transpose(1, 2)
            for part in qkv.chunk(3, dim=-1)
        )  # (M*B, H, L, d_h) each
        keep = ~padding.view(models * batch, 1, 1, length)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )  # (M*B, H, L, d_h)
        attended = attended.transpose(1, 2).reshape(models, batch, length, width)
        return self.out_proj(attended)


def few_query_attention(
    attention: StackedAttention, query: Tensor, context: Tensor, padding: Tensor
) -> Tensor:
    """``attention(query, context, context, key_padding_mask=padding)`` for a few query rows,
    without projecting the keys and values of every context row.

    query ``(M, B, r, d)``, context ``(M, B, L, d)``, padding ``(M, B, L)`` bool (True =
    ignored); returns ``(M, B, r, d)``, each slice ``m`` with its own weights. Per head ``h``:
    ``q_h . (W_k^h c_j + b_k^h) = (W_k^h' q_h) . c_j + q_h . b_k^h``, and the last term, the same
    for every ``j``, leaves the softmax unchanged; and ``sum_j a_j (W_v^h c_j + b_v^h) =
    W_v^h (sum_j a_j c_j) + b_v^h sum_j a_j`` (the attention dropout makes ``sum_j a_j`` differ
    from one, so it is kept). The same function, with the same parameters and dropout, for about
    ``r H / 2d`` of the key and value projections' work (a tenth for ``r = 9`` rows, ``H = 8``
    heads, ``d = 384``). Its backward is written out (:class:`FewQueryAttention`): autograd's
    would launch three times as many operators for the chain of products.
    """
    dtype = compute_dtype(query)
    out_proj = attention.out_proj
    return FewQueryAttention.apply(
        as_dtype(query, dtype),
        as_dtype(context, dtype),
        padding,
        as_dtype(attention.in_proj_weight, dtype),
        as_dtype(attention.in_proj_bias, dtype),
        as_dtype(out_proj.weight, dtype),
        as_dtype(out_proj.bias, dtype),
        attention.num_heads,
        attention.dropout if attention.training else 0.0,
    )


def _summed_to(gradient: Tensor, blocks: int) -> Tensor:
    """A weight's gradient ``(M, ...)`` summed over the modalities when they share the weight."""
    return gradient.sum(0, keepdim=True) if blocks == 1 and gradient.shape[0] > 1 else gradient


class FewQueryAttention(torch.autograd.Function):
    """:func:`few_query_attention` with its output projection, forward and backward by hand.

    Inputs in one dtype (the compute dtype; autocast is off inside), the softmax and its
    backward in float32 when that dtype is half precision. Shapes: ``M`` modalities, ``A``
    weight blocks (``M``, or 1 when shared), ``B`` batch, ``R`` query rows, ``L`` context
    rows, ``H`` heads of width ``e``, ``d = H e``.
    """

    @staticmethod
    def forward(ctx, query, context, padding, weight, bias, out_weight, out_bias, heads, dropout):
        models, batch, rows, width = query.shape
        blocks, head_dim = weight.shape[0], width // heads
        with torch.autocast(query.device.type, enabled=False):
            w_q, w_k, w_v = weight.view(blocks, 3, heads, head_dim, width).unbind(1)
            b_q, _, b_v = bias.view(blocks, 1, 1, 3, heads, head_dim).unbind(3)
            q = torch.einsum("mbrd,mhed->mbrhe", query, w_q).add_(b_q).mul_(head_dim**-0.5)
            q_keys = torch.einsum("mbrhe,mhed->mbhrd", q, w_k)  # W_k^h' q_h: (M, B, H, R, d)
            scores = torch.einsum("mbhrd,mbld->mbhrl", q_keys, context)  # (M, B, H, R, L)
            scores.masked_fill_(padding[:, :, None, None, :], float("-inf"))
            probabilities = torch.softmax(scores, -1, dtype=_softmax_dtype(query))
            keep = None
            if dropout > 0:  # the mask F.dropout would draw, scaled
                keep = torch.empty_like(probabilities).bernoulli_(1 - dropout).div_(1 - dropout)
            weights = as_dtype(probabilities if keep is None else probabilities * keep, query.dtype)
            mixed = torch.einsum("mbhrl,mbld->mbhrd", weights, context)  # Σ_j a_j c_j
            mass = weights.sum(-1).transpose(2, 3)  # Σ_j a_j: (M, B, R, H)
            values = torch.einsum("mbhrd,mhed->mbrhe", mixed, w_v).addcmul_(b_v, mass[..., None])
            values = values.reshape(models, batch, rows, width)  # (M, B, R, d)
            out = torch.einsum("mbrd,mod->mbro", values, out_weight)
            out = out.add_(out_bias.view(blocks, 1, 1, width))  # (M, B, R, d)
        ctx.heads = heads
        ctx.save_for_backward(query, weight, bias, out_weight)
        # the intermediates are held on ctx, not saved with save_for_backward, so that the
        # backward can drop each one once used: it runs while the backbone's activations are
        # all alive, and what it holds adds to the step's peak memory (autograd's backward of
        # the same chain freed them node by node)
        ctx.intermediates = {
            "context": context, "q": q, "q_keys": q_keys, "probabilities": probabilities, "keep": keep,
            "weights": weights, "mixed": mixed, "mass": mass, "values": values,
        }  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):
        query, weight, bias, out_weight = ctx.saved_tensors
        held = _intermediates(ctx)
        # eager: each intermediate dropped once used (a compiled backward plans its own memory)
        take = held.__getitem__ if torch.compiler.is_compiling() else held.pop
        models, batch, rows, width = query.shape
        blocks, heads = weight.shape[0], ctx.heads
        head_dim = width // heads
        with torch.autocast(query.device.type, enabled=False):
            grad = as_dtype(grad, query.dtype)
            w_q, w_k, w_v = weight.view(blocks, 3, heads, head_dim, width).unbind(1)
            b_v = bias.view(blocks, 3, heads, head_dim)[:, 2]  # (A, H, e)
            # out = values W_o^T + b_o
            g_out_weight = _summed_to(torch.einsum("mbro,mbrd->mod", grad, take("values")), blocks)
            g_out_bias = _summed_to(grad.sum((1, 2)), blocks)
            g_values = torch.einsum("mbro,mod->mbrd", grad, out_weight)
            g_values = g_values.reshape(models, batch, rows, heads, head_dim)
            # values = W_v^h mixed_h + b_v^h mass_h
            g_w_v = _summed_to(torch.einsum("mbrhe,mbhrd->mhed", g_values, take("mixed")), blocks)
            g_b_v = _summed_to(torch.einsum("mbrhe,mbrh->mhe", g_values, take("mass")), blocks)
            g_mixed = torch.einsum("mbrhe,mhed->mbhrd", g_values, w_v)  # (M, B, H, R, d)
            # mixed = Σ_j a_j c_j, mass = Σ_j a_j
            context = take("context")
            g_weights = torch.einsum("mbhrd,mbld->mbhrl", g_mixed, context)
            g_weights += torch.einsum("mbrhe,mhe->mbhr", g_values, b_v).unsqueeze(-1)
            g_context = torch.einsum("mbhrl,mbhrd->mbld", take("weights"), g_mixed)  # (M, B, L, d)
            del g_mixed  # each large gradient freed once used: the backbone's activations are
            # all alive while this runs, so what it holds adds to the step's peak
            # a = dropout(softmax(scores))
            probabilities, keep = take("probabilities"), take("keep")
            g_probabilities = as_dtype(g_weights, probabilities.dtype)
            if keep is not None:
                g_probabilities = g_probabilities.mul_(keep)
            del g_weights, keep
            g_scores = torch._softmax_backward_data(
                g_probabilities, probabilities, -1, probabilities.dtype
            )
            del g_probabilities, probabilities
            g_scores = as_dtype(g_scores, query.dtype)  # (M, B, H, R, L); 0 where padded
            # scores = q_keys . c
            g_q_keys = torch.einsum("mbhrl,mbld->mbhrd", g_scores, context)
            g_context += torch.einsum("mbhrl,mbhrd->mbld", g_scores, take("q_keys"))
            del g_scores, context
            # q_keys = W_k^h' q_h, q = (W_q query + b_q) / sqrt(e)
            g_w_k = _summed_to(torch.einsum("mbrhe,mbhrd->mhed", take("q"), g_q_keys), blocks)
            g_q = torch.einsum("mbhrd,mhed->mbrhe", g_q_keys, w_k).mul_(head_dim**-0.5)
            g_b_q = _summed_to(g_q.sum((1, 2)), blocks)
            g_w_q = _summed_to(torch.einsum("mbrhe,mbrd->mhed", g_q, query), blocks)
            g_query = torch.einsum("mbrhe,mhed->mbrd", g_q, w_q)
            # the key bias takes no part (module docstring of few_query_attention)
            g_weight = torch.stack([g_w_q, g_w_k, g_w_v], 1).view(weight.shape)
            g_bias = torch.stack([g_b_q, torch.zeros_like(g_b_q), g_b_v], 1).view(bias.shape)
        return g_query, g_context, None, g_weight, g_bias, g_out_weight, g_out_bias, None, None


def _intermediates(ctx) -> dict[str, Tensor | None]:
    """What :class:`FewQueryAttention`'s forward held on ``ctx`` for the backward, taken off it
    (in eager mode) so that the backward frees each one once used."""
    if torch.compiler.is_compiling():
        return ctx.intermediates
    held, ctx.intermediates = ctx.intermediates, None
    if held is None:
        raise RuntimeError(
            "the enhancers' few-query attention frees its intermediates in its backward: a "
            "second backward through the same forward (retain_graph=True) is not supported"
        )
    return held


def _softmax_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision scores, else their own dtype."""
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
