"""Hugging Face encoders as prototype sources (paper Table 5) and the Gaussian noise source.

The reference is the model itself run the ordinary way (its tokenizer with special tokens, eager
attention with ``output_attentions``), with SPEC 1's selection written out per row: the [SEP] row
scores, [CLS] and padding are never chosen."""

import pytest
import torch

from macsc.errors import ConfigError
from macsc.prototypes import build_extractor
from tests.conftest import minilm_path

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "", "a b c d e f g h i"]


def reference(model_dir, texts, k, include_eot=True, layers=(-1,)):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    features = torch.zeros(len(texts), k, model.config.hidden_size)
    mask = torch.zeros(len(texts), k, dtype=torch.bool)
    for b in range(len(texts)):
        sep = int(batch["attention_mask"][b].sum()) - 1
        assert int(batch["input_ids"][b, sep]) == tokenizer.sep_token_id
        score = torch.stack([out.attentions[i][b, :, sep].mean(0) for i in layers]).mean(0)
        candidates = list(range(1, sep + (1 if include_eot else 0)))
        best = sorted(sorted(candidates, key=lambda j: -float(score[j]))[:k])
        features[b, : len(best)] = out.last_hidden_state[b, best]
        mask[b, : len(best)] = True
    return features, mask


@pytest.mark.parametrize(
    ("options", "layers"),
    [({}, (-1,)), ({"include_eot": False}, (-1,)), ({"attention_layers": "all"}, range(6))],
)
def test_bert_prototypes_equal_the_reference(options, layers):
    path = str(minilm_path())
    extractor = build_extractor(f"hf:{path}", k=5, **options)
    out = extractor.extract(TEXTS)
    features, mask = reference(path, TEXTS, 5, options.get("include_eot", True), layers)
    assert extractor.dim == 384
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.features, features, atol=1e-4, rtol=1e-4)


def test_long_text_is_split_into_windows_with_their_own_cls_and_sep(tiny_backbone):
    from transformers import AutoModel, AutoTokenizer

    extractor = build_extractor("hf", model_name=tiny_backbone, k=6, context_length=12)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    model = AutoModel.from_pretrained(tiny_backbone, attn_implementation="eager").eval()
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [ids[start : start + 10] for start in range(0, len(ids), 10)]
    assert len(pieces) == 2
    scored, states = [], {}
    for w, piece in enumerate(pieces):
        window = torch.tensor([[tokenizer.cls_token_id, *piece, tokenizer.sep_token_id]])
        with torch.no_grad():
            out = model(input_ids=window, output_attentions=True)
        sep = window.shape[1] - 1
        score = out.attentions[-1][0, :, sep].mean(0)
        for j in range(1, sep + 1):
            scored.append((float(score[j]), w, j))
            states[(w, j)] = out.last_hidden_state[0, j]
    best = sorted(sorted(scored, key=lambda item: -item[0])[:6], key=lambda item: item[1:])
    expected = torch.stack([states[(w, j)] for _, w, j in best])
    result = extractor.extract([text])
    torch.testing.assert_close(result.features[0], expected, atol=1e-4, rtol=1e-4)


def test_an_encoder_decoder_model_gives_the_prototypes_of_its_encoder(tiny_t5):
    """Table 5's T5-3b source, on a tiny T5: only the encoder is loaded, and the prototypes are
    the seq2seq model's own encoder run the ordinary way."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    extractor = build_extractor("hf", model_name=tiny_t5, k=4)
    assert extractor.dim == 32
    assert not [name for name, _ in extractor.named_parameters() if "decoder" in name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5, attn_implementation="eager")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().encoder(**batch, output_attentions=True)
    result = extractor.extract(TEXTS)
    for b in range(len(TEXTS)):
        last = int(batch["attention_mask"][b].sum()) - 1  # the closing special token
        score = out.attentions[-1][b, :, last].mean(0)
        best = sorted(sorted(range(1, last + 1), key=lambda j: -float(score[j]))[:4])
        assert result.mask[b].tolist() == [True] * len(best) + [False] * (4 - len(best))
        torch.testing.assert_close(
            result.features[b, : len(best)], out.last_hidden_state[b, best], atol=1e-4, rtol=1e-4
        )


def test_identity_names_the_weights_by_content(tiny_backbone):
    extractor = build_extractor("hf", model_name=tiny_backbone)
    identity = extractor.identity()
    assert identity["weights"].startswith("files:") and "model.safetensors=" in identity["weights"]
    assert identity["context_length"] == 512


def test_trainable_encoder_receives_gradients(tiny_backbone):
    extractor = build_extractor("hf", model_name=tiny_backbone, k=3, trainable=True)
    out = extractor.extract(["a b c d", "e f"])
    out.features.sum().backward()
    grads = [p.grad for p in extractor.encoder.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_missing_model_folder_says_it_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"the folder .*no-such-model' does not exist"):
        build_extractor("hf", model_name=str(tmp_path / "no-such-model"))


def test_gaussian_noise_is_a_fixed_function_of_the_text():
    noise = build_extractor("gaussian", dim=16, k=3, seed=1)
    first = noise.extract(["a", "b", "a"])
    assert first.features.shape == (3, 3, 16) and first.mask.all()
    torch.testing.assert_close(first.features[0], first.features[2])
    assert not torch.allclose(first.features[0], first.features[1])
    torch.testing.assert_close(noise.extract(["b"]).features[0], first.features[1])
    other_seed = build_extractor("gaussian", dim=16, k=3, seed=2).extract(["a"])
    assert not torch.allclose(other_seed.features[0], first.features[0])
