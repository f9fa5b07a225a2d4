"""The enhancers of all modalities computed at once (issue 20) equal one enhancer per modality
written out here with torch's own multi-head attention (SPEC 2, Eq. 2-3), in float64, values and
gradients: each modality keeps its own parameters, and the numbers stay the same."""

import pytest
import torch
import torch.nn.functional as F

from macsc.method.fusion import ConceptEnhancers

WIDTH, HEADS = 16, 4
MODALITIES = ["image", "audio", "video"]
DIMS = [6, 10, 6]  # the widths differ, as CLIP's 512 and AudioCLIP's 1024 do
ROWS = [3, 5, 3]  # and so may the prototype rows (a modality with other options)


def per_modality_reference(module, text, text_mask, prototypes, masks, text_rows=None):
    """One modality at a time, from its own parameters (``parameters_of``): ``P_m = H^m W_m^T +
    b_m + type_m``, ``E = [H^t ; P_m]``, torch's multi-head attention over ``E`` with the key
    padding of both parts, the residual and LayerNorm, then the optional feed-forward block;
    the rows ``text_rows`` of the text part. Returns lists over the modalities."""
    enhanced, projected_all = [], []
    for name, features, mask in zip(MODALITIES, prototypes, masks, strict=True):
        p = module.parameters_of(name)
        projected = features @ p["project.weight"].T + p["project.bias"] + p["type_embedding"]
        if not module.enhancement:
            rows = text if text_rows is None else text[torch.arange(len(text))[:, None], text_rows]
            enhanced.append(rows)
            projected_all.append(projected)
            continue
        rows_e = torch.cat([text, projected], dim=1)  # E: (B, l + n_m, d)
        padding = ~torch.cat([text_mask.bool(), mask], dim=1)
        attended, _ = F.multi_head_attention_forward(
            rows_e.transpose(0, 1),
            rows_e.transpose(0, 1),
            rows_e.transpose(0, 1),
            WIDTH,
            HEADS,
            p["attention.in_proj_weight"],
            p["attention.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            p["attention.out_proj.weight"],
            p["attention.out_proj.bias"],
            training=False,
            key_padding_mask=padding,
            need_weights=False,
        )
        fused = F.layer_norm(
            rows_e + attended.transpose(0, 1), (WIDTH,), p["norm.weight"], p["norm.bias"]
        )
        if "feed_forward.0.weight" in p:
            hidden = F.gelu(fused @ p["feed_forward.0.weight"].T + p["feed_forward.0.bias"])
            out = hidden @ p["feed_forward.3.weight"].T + p["feed_forward.3.bias"]
            fused = F.layer_norm(fused + out, (WIDTH,), p["ff_norm.weight"], p["ff_norm.bias"])
        length = text.shape[1]
        text_part = fused[:, :length]
        if text_rows is not None:
            text_part = text_part[torch.arange(len(text))[:, None], text_rows]
        enhanced.append(text_part)
        projected_all.append(fused[:, length:])
    return enhanced, projected_all


def inputs():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    text = randn(3, 7, WIDTH).requires_grad_()
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    # the prototypes take gradients too (a trainable extractor's do)
    prototypes = [randn(3, n, d).requires_grad_() for n, d in zip(ROWS, DIMS, strict=True)]
    masks = [torch.ones(3, n, dtype=torch.bool) for n in ROWS]
    masks[0][1, 2] = False  # a padded prototype
    masks[1][2, 3:] = False
    return text, text_mask, prototypes, masks


def build(**options):
    torch.manual_seed(1)
    module = ConceptEnhancers(MODALITIES, WIDTH, DIMS, num_heads=HEADS, dropout=0.1, **options)
    module = module.double().eval()
    with torch.no_grad():  # every parameter away from its initial value (biases, norms)
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module


def gradients(module, inputs):
    grads = [x.grad.clone() for x in inputs] + [p.grad.clone() for p in module.parameters()]
    for x in inputs:
        x.grad = None
    module.zero_grad(set_to_none=True)
    return grads


OPTIONS = {
    "separate": {},
    "shared": {"shared": True},
    "feed_forward": {"feed_forward": True},
    "shared_feed_forward": {"shared": True, "feed_forward": True},
    "no_enhancement": {"enhancement": False},
}


@pytest.mark.parametrize("rows", ["few", "all"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_batched_enhancers_equal_the_per_modality_reference(options, rows):
    module = build(**OPTIONS[options])
    text, text_mask, prototypes, masks = inputs()
    text_rows = torch.tensor([[0], [3], [5]]) if rows == "few" else None
    weights = [torch.randn(1, 1, WIDTH, dtype=torch.float64) * (i + 1) for i in range(3)]

    want_text, want_prototypes = per_modality_reference(
        module, text, text_mask, prototypes, masks, text_rows
    )
    loss = sum(
        ((t * w).sin().sum() + (p * w).cos().sum())
        for t, p, w in zip(want_text, want_prototypes, weights, strict=True)
    )
    loss.backward()
    want_grads = gradients(module, [text, *prototypes])

    got_text, got_prototypes, got_masks = module(text, text_mask, prototypes, masks, text_rows)
    assert got_text.shape == (3, 3, 1 if rows == "few" else 7, WIDTH)
    assert got_prototypes.shape == (3, 3, max(ROWS), WIDTH)  # rows padded to the longest
    loss = sum(
        ((got_text[i] * w).sin().sum() + (got_prototypes[i, :, :n] * w).cos().sum())
        for i, (n, w) in enumerate(zip(ROWS, weights, strict=True))
    )
    loss.backward()
    got_grads = gradients(module, [text, *prototypes])

    for i, n in enumerate(ROWS):
        torch.testing.assert_close(got_text[i], want_text[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            got_prototypes[i, :, :n], want_prototypes[i], rtol=1e-6, atol=1e-6
        )
        assert torch.equal(got_masks[i, :, :n], masks[i]) and not got_masks[i, :, n:].any()
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_each_modality_keeps_its_own_parameters_and_shared_means_one_set():
    separate, shared = build(), build(shared=True)
    assert separate.attention.in_proj_weight.shape == (3, 3 * WIDTH, WIDTH)
    assert shared.attention.in_proj_weight.shape == (1, 3 * WIDTH, WIDTH)
    for module in (separate, shared):
        # projections and type embeddings are every modality's own, shared or not
        assert module.project.weight.shape == (WIDTH, sum(DIMS))
        assert module.type_embedding.shape == (3, WIDTH)
        image, audio = module.parameters_of("image"), module.parameters_of("audio")
        assert image["project.weight"].shape == (WIDTH, 6)
        assert audio["project.weight"].shape == (WIDTH, 10)
        assert image.keys() == audio.keys()
        # views: a change to the stacked parameter is a change to the modality's
        assert image["type_embedding"].data_ptr() == module.type_embedding.data_ptr()
    same = separate.parameters_of("image")["attention.in_proj_weight"]
    other = separate.parameters_of("video")["attention.in_proj_weight"]
    assert not torch.equal(same, other)
    assert torch.equal(
        shared.parameters_of("image")["norm.weight"], shared.parameters_of("video")["norm.weight"]
    )


def test_in_training_mode_the_attention_dropout_acts():
    module = build()
    module.train()
    text, text_mask, prototypes, masks = inputs()
    rows = torch.tensor([[0], [3], [5]])
    first = module(text, text_mask, prototypes, masks, rows)[0]
    second = module(text, text_mask, prototypes, masks, rows)[0]
    assert not torch.allclose(first, second)
    module.eval()
    torch.testing.assert_close(
        module(text, text_mask, prototypes, masks, rows)[0],
        module(text, text_mask, prototypes, masks, rows)[0],
    )
