"""The concept enhancer's other modes (SPEC 2) against Eq. 2 written by hand: training mode with
attention dropout on the few-query path, the optional feed-forward block, and
``enhancement=False`` with and without the rows a head reads. Found by mutation testing."""

import math

import pytest
import torch
import torch.nn.functional as F

from macsc.method.attention import StackedAttention, few_query_attention
from macsc.method.fusion import masked_mean, select_rows
from tests.method.test_enhancement_eq2 import enhancer_of_one, eq2_by_hand, run_one


def stacked_copy(attention: torch.nn.MultiheadAttention) -> StackedAttention:
    """A one-block :class:`StackedAttention` with ``attention``'s weights and dropout."""
    width = attention.embed_dim
    stacked = StackedAttention(1, width, attention.num_heads, attention.dropout)
    stacked = stacked.to(attention.in_proj_weight.dtype).train(attention.training)
    with torch.no_grad():
        stacked.in_proj_weight[0] = attention.in_proj_weight
        stacked.in_proj_bias[0] = attention.in_proj_bias
        stacked.out_proj.weight[0] = attention.out_proj.weight
        stacked.out_proj.bias[0] = attention.out_proj.bias
    return stacked


def few_query_of_one(attention, query, context, padding):
    """:func:`few_query_attention` with ``attention``'s weights, for one modality."""
    return few_query_attention(stacked_copy(attention), query[None], context[None], padding[None])[
        0
    ]


def attention_by_hand(attention, query, context, padding, generator_seed=None):
    """``out_proj(dropout(softmax(Q K^T / sqrt(d_h))) V)`` with full K and V projections; the
    dropout draws its mask from the seeded generator, as the module's own call would."""
    batch, rows, width = query.shape
    heads = attention.num_heads
    head_dim = width // heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

    def split(x, w, b):
        return (x @ w.T + b).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, n, d_h)

    q, k, v = split(query, w_q, b_q), split(context, w_k, b_k), split(context, w_v, b_v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
        probabilities = F.dropout(probabilities, attention.dropout, True)
    mixed = (probabilities @ v).transpose(1, 2).reshape(batch, rows, width)
    return attention.out_proj(mixed)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_few_query_attention_in_training_mode_is_eq2_with_its_dropout(dropout):
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True).double()
    torch.nn.init.normal_(
        attention.in_proj_bias
    )  # the value bias matters when rows do not sum to 1
    attention.train()
    query, context = torch.randn(2, 3, 8).double(), torch.randn(2, 6, 8).double()
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    torch.manual_seed(7)
    got = few_query_of_one(attention, query, context, padding)
    want = attention_by_hand(attention, query, context, padding, generator_seed=7)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_few_query_attention_gradients_in_training_mode_are_eq2s(dropout):
    """The hand-written backward (intermediates freed as used) against autograd's backward of
    Eq. 2, with the same dropout mask: inputs and every weight."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True).double()
    torch.nn.init.normal_(attention.in_proj_bias)
    attention.train()
    stacked = stacked_copy(attention)
    query = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    torch.manual_seed(7)
    got = few_query_attention(stacked, query[None], context[None], padding[None])[0]
    upstream = torch.randn_like(got)
    mine = [stacked.in_proj_weight, stacked.in_proj_bias, *stacked.out_proj.parameters()]
    got_grads = torch.autograd.grad((got * upstream).sum(), [query, context, *mine])
    want = attention_by_hand(attention, query, context, padding, generator_seed=7)
    theirs = [attention.in_proj_weight, attention.in_proj_bias, *attention.out_proj.parameters()]
    want_grads = torch.autograd.grad((want * upstream).sum(), [query, context, *theirs])
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(
            got_grad.reshape(want_grad.shape), want_grad, rtol=1e-10, atol=1e-10
        )


def test_a_second_backward_through_the_few_query_attention_is_one_clear_error():
    attention = stacked_copy(torch.nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True))
    query = torch.randn(1, 2, 3, 8, requires_grad=True)
    context = torch.randn(1, 2, 6, 8)
    out = few_query_attention(attention, query, context, torch.zeros(1, 2, 6, dtype=torch.bool))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"frees its intermediates .* \(retain_graph=True\)"):
        out.sum().backward()


def test_the_feed_forward_block_follows_the_attention():
    torch.manual_seed(1)
    module = enhancer_of_one(16, 6, num_heads=4, dropout=0.0, feed_forward=True).double().eval()
    torch.nn.init.normal_(module.attention.in_proj_bias)
    text, prototypes = torch.randn(2, 5, 16).double(), torch.randn(2, 3, 6).double()
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    prototype_mask = torch.tensor([[True, True, False], [True, True, True]])
    p = module.parameters_of("image")
    with torch.no_grad():
        text_m, proto_m = run_one(module, text, text_mask, prototypes, prototype_mask)
        after_attention = eq2_by_hand(module, text, text_mask, prototypes, prototype_mask)
        for got, fused in zip((text_m, proto_m), after_attention, strict=True):
            hidden = F.gelu(fused @ p["feed_forward.0.weight"].T + p["feed_forward.0.bias"])
            out = hidden @ p["feed_forward.3.weight"].T + p["feed_forward.3.bias"]
            want = F.layer_norm(fused + out, (16,), p["ff_norm.weight"], p["ff_norm.bias"])
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_without_enhancement_the_text_is_untouched_and_prototypes_projected():
    torch.manual_seed(2)
    module = enhancer_of_one(8, 5, num_heads=3, enhancement=False)  # no attention: any heads
    text, prototypes = torch.randn(2, 4, 8), torch.randn(2, 3, 5)
    mask = torch.ones(2, 4)
    p = module.parameters_of("image")
    projected = prototypes @ p["project.weight"].T + p["project.bias"] + p["type_embedding"]
    text_m, proto_m = run_one(module, text, mask, prototypes, torch.ones(2, 3))
    assert torch.equal(text_m, text)
    torch.testing.assert_close(proto_m, projected)
    rows = torch.tensor([[3], [1]])
    text_rows, _ = run_one(module, text, mask, prototypes, torch.ones(2, 3), text_rows=rows)
    assert torch.equal(text_rows, torch.stack([text[0, 3:4], text[1, 1:2]]))


def test_select_rows_and_masked_mean_by_hand():
    states = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    rows = torch.tensor([[2, 0], [3, 3]])
    want = torch.stack([states[0, [2, 0]], states[1, [3, 3]]])
    assert torch.equal(select_rows(states, rows), want)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    got = masked_mean(states, mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], (states[0, 0] + states[0, 2]) / 2)
    assert torch.equal(got[1], torch.zeros(3, dtype=torch.float64))  # no real row: zeros
    one = masked_mean(states, torch.tensor([[False, True, False, False]] * 2))
    torch.testing.assert_close(one, states[:, 1])


def test_under_bf16_autocast_the_few_query_attention_runs_in_bf16_with_float32_gradients():
    """What a GPU step runs: the inputs and weights cast once to autocast's dtype, the result in
    that dtype, close to the float32 computation; the weights' gradients in their own float32."""
    torch.manual_seed(0)
    stacked = stacked_copy(torch.nn.MultiheadAttention(16, 2, batch_first=True).eval())
    query = torch.randn(1, 2, 3, 16, requires_grad=True)
    context = torch.randn(1, 2, 7, 16, requires_grad=True)
    padding = torch.tensor([[[False] * 7, [False] * 5 + [True] * 2]])
    want = few_query_attention(stacked, query, context, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = few_query_attention(stacked, query, context, padding)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.03, atol=0.03)
    got.float().square().sum().backward()
    for tensor in (query, context, stacked.in_proj_weight, stacked.out_proj.weight):
        assert tensor.grad.dtype == torch.float32 and torch.isfinite(tensor.grad).all()
    assert stacked.in_proj_weight.grad.abs().sum() > 0
