"""The concept enhancer against Eq. 2-3 written out by hand: one attention over [H^t ; P_m] with
shared Q, K, V projections, the key-padding mask of both parts, then the residual and the
LayerNorm (SPEC 2). One modality's enhancer: the enhancers of all modalities run at once
(``tests/method/test_batched_enhancers.py`` shows that each is this one)."""

import math

import pytest
import torch
import torch.nn.functional as F

from macsc.method.fusion import ConceptEnhancers


def enhancer_of_one(width, prototype_dim, **options):
    """The enhancers of one modality, ``image``."""
    return ConceptEnhancers(["image"], width, [prototype_dim], **options)


def run_one(module, text, text_mask, prototypes, prototype_mask, text_rows=None):
    """``(Ĥ^t, Ĥ^m)`` of the single modality of ``module``."""
    text_m, proto_m, _ = module(text, text_mask, [prototypes], [prototype_mask], text_rows)
    return text_m[0], proto_m[0]


def eq2_by_hand(enhancer, text, text_mask, prototypes, prototype_mask):
    """``LayerNorm(E + out_proj(softmax(Q K^T / sqrt(d_h)) V))`` per head, ``E = [H^t ; P_m]``,
    ``P_m = Linear(H^m) + type_m``; padded keys get no weight."""
    p = enhancer.parameters_of("image")
    d = text.shape[-1]
    heads = enhancer.attention.num_heads
    head_dim = d // heads
    w_q, w_k, w_v = p["attention.in_proj_weight"].chunk(3)
    b_q, b_k, b_v = p["attention.in_proj_bias"].chunk(3)
    projected = prototypes @ p["project.weight"].T + p["project.bias"] + p["type_embedding"]
    rows = torch.cat([text, projected], dim=1)  # E
    keep = torch.cat([text_mask.bool(), prototype_mask.bool()], dim=1)
    out = torch.zeros_like(rows)
    for b in range(rows.shape[0]):
        mixed = []
        for h in range(heads):
            part = slice(h * head_dim, (h + 1) * head_dim)
            q = rows[b] @ w_q[part].T + b_q[part]
            k = rows[b] @ w_k[part].T + b_k[part]
            v = rows[b] @ w_v[part].T + b_v[part]
            scores = q @ k.T / math.sqrt(head_dim)
            scores[:, ~keep[b]] = float("-inf")
            mixed.append(torch.softmax(scores, dim=-1) @ v)
        attended = (
            torch.cat(mixed, dim=-1) @ p["attention.out_proj.weight"].T
            + p["attention.out_proj.bias"]
        )
        out[b] = F.layer_norm(rows[b] + attended, (d,), p["norm.weight"], p["norm.bias"])
    length = text.shape[1]
    return out[:, :length], out[:, length:]


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    text = torch.randn(2, 5, 16, dtype=torch.double)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    prototypes = torch.randn(2, 3, 6, dtype=torch.double)
    prototype_mask = torch.tensor([[True, True, False], [True, True, True]])
    return text, text_mask, prototypes, prototype_mask


def enhancer():
    torch.manual_seed(1)
    module = enhancer_of_one(16, 6, num_heads=4, dropout=0.0).double().eval()
    torch.nn.init.normal_(module.attention.in_proj_bias)
    return module


def test_enhancer_is_eq2_with_the_residual_and_layer_norm(inputs):
    module = enhancer()
    with torch.no_grad():
        text_m, proto_m = run_one(module, *inputs)
        want_text, want_proto = eq2_by_hand(module, *inputs)
    torch.testing.assert_close(text_m, want_text, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(proto_m, want_proto, rtol=1e-10, atol=1e-10)


def test_the_fast_rows_are_eq2_too(inputs):
    module = enhancer()
    rows = torch.tensor([[0], [2]])
    with torch.no_grad():
        text_m, proto_m = run_one(module, *inputs, text_rows=rows)
        want_text, want_proto = eq2_by_hand(module, *inputs)
    torch.testing.assert_close(text_m[:, 0], want_text[torch.arange(2), rows[:, 0]])
    torch.testing.assert_close(proto_m, want_proto)


def test_padded_keys_take_no_part(inputs):
    text, text_mask, prototypes, prototype_mask = inputs
    module = enhancer()
    noisy_text, noisy_prototypes = text.clone(), prototypes.clone()
    noisy_text[1, 3:] = 1e3  # padding rows of the text
    noisy_prototypes[0, 2] = -1e3  # a padded prototype
    with torch.no_grad():
        clean = run_one(module, text, text_mask, prototypes, prototype_mask)
        noisy = run_one(module, noisy_text, text_mask, noisy_prototypes, prototype_mask)
    torch.testing.assert_close(noisy[0][1, :3], clean[0][1, :3])
    torch.testing.assert_close(noisy[0][0], clean[0][0])
    torch.testing.assert_close(noisy[1][:, :2], clean[1][:, :2])


def test_masked_mean_follows_the_states_dtype_and_averages_real_rows():
    from macsc.method.fusion import masked_mean

    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mean(states, mask).tolist() == [[2.0, 3.0]]
    assert masked_mean(states.bfloat16(), mask).dtype == torch.bfloat16


def test_enhancer_defaults_and_its_parameters():
    torch.manual_seed(0)
    module = enhancer_of_one(256, 4)  # default 8 heads divide 256; default dropout 0.1
    assert module.dropout.p == 0.1 and module.attention.dropout == 0.1
    # the type embedding starts small, N(0, 0.02^2) as BERT's embeddings
    assert 0.015 < module.type_embedding.std().item() < 0.025
    # without the feed-forward block there is no norm of it either (nothing extra to train)
    assert not any(name.startswith("ff_") for name, _ in module.named_parameters())
    with pytest.raises(
        ValueError, match="model.enhancer.heads=8 must divide the backbone hidden size 20"
    ):
        enhancer_of_one(20, 4)


def test_sentence_positions_first_and_last_real_token():
    from macsc.method.fusion import sentence_positions

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert sentence_positions(mask, "first").tolist() == [[0], [0], [0]]
    assert sentence_positions(mask, "last").tolist() == [[2], [0], [3]]
    assert sentence_positions(mask, "mean") is None
    with pytest.raises(ValueError, match="text_pooling must be first, last, mean or auto"):
        sentence_positions(mask, "cls")
