"""The CLIP-family extractors (open_clip, AudioCLIP, CLIP-ViP) on tiny checkpoints written in
each published layout: random weights under the real key names, width 128, 2 layers, 2 heads, the
real 77-token context and 49408-token vocabulary. Every prototype is compared with an independent
forward: plain functional CLIP (torch's reference multi-head attention with weights on) or the
Hugging Face module run with eager attention and ``output_attentions``."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from macsc.errors import CheckpointError, ConfigError
from macsc.prototypes import build_extractor

WIDTH, LAYERS, HEADS, OUT, CONTEXT, VOCAB = 128, 2, 2, 96, 77, 49408
TEXTS = [
    "a dog barks at the mailman while the kettle whistles",
    "rain on a tin roof",
    "",
    "Hello, World! Ünïcode & punctuation...",
]


def tiny_open_clip_config(heads: int = HEADS) -> dict:
    """An open_clip model config of the tiny test sizes (a small image tower included)."""
    return {
        "embed_dim": OUT,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {
            "context_length": CONTEXT,
            "vocab_size": VOCAB,
            "width": WIDTH,
            "heads": heads,
            "layers": LAYERS,
        },
    }


def tokenize(texts: list[str]) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(texts, context_length=CONTEXT)


def openai_text_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A text tower in OpenAI-CLIP key names, written out key by key (not via the code under
    test), with weights large enough to give peaked attention."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    state = {
        "token_embedding.weight": randn(VOCAB, WIDTH, std=1.0),
        "positional_embedding": randn(CONTEXT, WIDTH, std=0.1),
        "ln_final.weight": 1 + randn(WIDTH, std=0.1),
        "ln_final.bias": randn(WIDTH, std=0.1),
        "text_projection": randn(WIDTH, OUT),
    }
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        state.update(
            {
                p + "ln_1.weight": 1 + randn(WIDTH, std=0.1),
                p + "ln_1.bias": randn(WIDTH, std=0.1),
                p + "attn.in_proj_weight": randn(3 * WIDTH, WIDTH),
                p + "attn.in_proj_bias": randn(3 * WIDTH, std=0.1),
                p + "attn.out_proj.weight": randn(WIDTH, WIDTH, std=0.05),
                p + "attn.out_proj.bias": randn(WIDTH, std=0.05),
                p + "ln_2.weight": 1 + randn(WIDTH, std=0.1),
                p + "ln_2.bias": randn(WIDTH, std=0.1),
                p + "mlp.c_fc.weight": randn(4 * WIDTH, WIDTH, std=0.05),
                p + "mlp.c_fc.bias": randn(4 * WIDTH, std=0.05),
                p + "mlp.c_proj.weight": randn(WIDTH, 4 * WIDTH, std=0.05),
                p + "mlp.c_proj.bias": randn(WIDTH, std=0.05),
            }
        )
    return state


def reference_clip_forward(state, tokens, quick_gelu=True):
    """Functional OpenAI CLIP text forward. Returns the projected tokens (B, L, OUT) and every
    layer's attention probabilities (B, H, L, L) from ``F.multi_head_attention_forward``."""
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    attentions = []
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_1.weight"], state[p + "ln_1.bias"]).transpose(
            0, 1
        )
        out, weights = F.multi_head_attention_forward(
            h, h, h, WIDTH, HEADS,
            state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"],
            None, None, False, 0.0,
            state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"],
            training=False, need_weights=True, attn_mask=causal, average_attn_weights=False,
        )  # fmt: skip
        attentions.append(weights)
        x = x + out.transpose(0, 1)
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    return x @ state["text_projection"], attentions


def reference_selection(projected, attentions, tokens, k, layers=(-1,), include_eot=True):
    """SPEC 1.3-1.5 written out per row: EOT-row attention averaged over heads and layers, top-k
    of the tokens after SOT up to EOT, kept in position order."""
    rows = []
    for b in range(len(tokens)):
        eot = int(tokens[b].argmax())  # EOT has the largest id
        score = torch.stack([attentions[i][b, :, eot].mean(0) for i in layers]).mean(0)
        candidates = list(range(1, eot + (1 if include_eot else 0)))
        best = sorted(sorted(candidates, key=lambda j: -float(score[j]))[:k])
        chosen = torch.zeros(k, projected.shape[-1])
        chosen[: len(best)] = projected[b, best]
        rows.append((chosen, [True] * len(best) + [False] * (k - len(best))))
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def audioclip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """AudioCLIP's flat layout: the text tower beside image/audio branches and three scales."""
    return {
        **openai_text_state(seed),
        "visual.conv1.weight": torch.randn(8, 3, 3, 3),
        "visual.attnpool.c_proj.weight": torch.randn(OUT, 8),
        "audio.fbsp.window": torch.randn(16),
        "audio.fc.weight": torch.randn(OUT, 8),
        "logit_scale": torch.tensor(4.6),
        "logit_scale_ai": torch.tensor(4.6),
        "logit_scale_at": torch.tensor(4.6),
    }


@pytest.fixture(scope="module")
def audioclip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audioclip") / "AudioCLIP-Full-Training.pt"
    torch.save(audioclip_state(), path)
    return path


def test_audioclip_prototypes_equal_the_reference_forward(audioclip_file):
    state = audioclip_state()
    tokens = tokenize(TEXTS)
    projected, attentions = reference_clip_forward(state, tokens)
    for layers, option in (((-1,), "last"), ((0, 1), "all"), ((0,), [0])):
        extractor = build_extractor(
            "audioclip", checkpoint=str(audioclip_file), k=5, attention_layers=option
        )
        out = extractor.extract(TEXTS)
        features, mask = reference_selection(projected, attentions, tokens, 5, layers)
        assert extractor.dim == OUT and out.features.shape == (len(TEXTS), 5, OUT)
        assert torch.equal(out.mask, mask)
        torch.testing.assert_close(out.features, features, atol=1e-4, rtol=1e-4)


def test_include_eot_false_never_selects_the_eot_row(audioclip_file):
    state = audioclip_state()
    tokens = tokenize(TEXTS[:2])
    projected, attentions = reference_clip_forward(state, tokens)
    out = build_extractor("audioclip", checkpoint=str(audioclip_file), k=4, include_eot=False)
    features, mask = reference_selection(projected, attentions, tokens, 4, include_eot=False)
    result = out.extract(TEXTS[:2])
    assert torch.equal(result.mask, mask)
    torch.testing.assert_close(result.features, features, atol=1e-4, rtol=1e-4)


def test_long_text_windows_compete_in_one_top_k(audioclip_file):
    import open_clip

    extractor = build_extractor("audioclip", checkpoint=str(audioclip_file), k=8)
    text = " ".join(f"word{i} of many" for i in range(60))  # about 250 BPE tokens
    ids = open_clip.SimpleTokenizer().encode(text)
    windows = [ids[start : start + CONTEXT - 2] for start in range(0, len(ids), CONTEXT - 2)]
    assert len(windows) == 4
    tokens = torch.zeros(len(windows), CONTEXT, dtype=torch.long)
    for row, piece in enumerate(windows):
        tokens[row, : len(piece) + 2] = torch.tensor([49406, *piece, 49407])
    projected, attentions = reference_clip_forward(audioclip_state(), tokens)
    scored = []
    for row, piece in enumerate(windows):
        score = attentions[-1][row, :, len(piece) + 1].mean(0)
        scored += [(float(score[j]), row, j) for j in range(1, len(piece) + 2)]
    best = sorted(sorted(scored, key=lambda item: -item[0])[:8], key=lambda item: item[1:])
    assert len({row for _, row, _ in best}) >= 2  # the winners really come from several windows
    expected = torch.stack([projected[row, j] for _, row, j in best])
    out = extractor.extract([text])
    assert out.mask.all()
    torch.testing.assert_close(out.features[0], expected, atol=1e-4, rtol=1e-4)


def test_eot_attention_equals_the_reference_modules(audioclip_file):
    """The recomputed EOT-row attention equals what the blocks' own attention modules return
    when asked for their weights (open_clip layout and Hugging Face CLIP layout)."""
    extractor = build_extractor("audioclip", checkpoint=str(audioclip_file))
    tower = extractor.tower
    x = torch.randn(3, CONTEXT, WIDTH)
    eos = torch.tensor([5, 76, 1])
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    for block in tower.blocks:
        h = block.ln_1(x)
        _, weights = block.attn(
            h, h, h, need_weights=True, attn_mask=causal, average_attn_weights=False
        )
        expected = weights[torch.arange(3), :, eos]
        torch.testing.assert_close(tower.eot_attention(block, x, eos), expected, atol=1e-5, rtol=0)

    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = CLIPTextModel(config).eval()
    from macsc.prototypes.clip_text import HFClipTextTower

    hf_tower = HFClipTextTower(model, torch.nn.Linear(WIDTH, OUT, bias=False))
    tokens = tokenize(TEXTS[:2])
    eos = tokens.argmax(dim=1)
    inputs = {}
    handles = [
        block.register_forward_pre_hook(
            lambda module, args, i=i: inputs.__setitem__(i, args[0].detach())
        )
        for i, block in enumerate(hf_tower.blocks)
    ]
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True).attentions
    for handle in handles:
        handle.remove()
    for i, block in enumerate(hf_tower.blocks):
        expected = attentions[i][torch.arange(2), :, eos]
        actual = hf_tower.eot_attention(block, inputs[i], eos)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def clip_vip_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """CLIP-ViP's flat layout: an HF CLIP model held as ``clipmodel`` (text and vision)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
        initializer_factor=8.0,
    )  # fmt: skip
    text = CLIPTextModel(config).state_dict()
    core = {k.removeprefix("text_model."): v for k, v in text.items()}
    state = {f"clipmodel.text_model.{key}": value for key, value in core.items()}
    state["clipmodel.text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]  # stale
    state["clipmodel.text_projection.weight"] = torch.randn(OUT, WIDTH) * 0.1
    state["clipmodel.vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 4, 4)
    state["clipmodel.vision_model.embeddings.added_cls"] = torch.randn(2, 8)
    state["clipmodel.visual_projection.weight"] = torch.randn(OUT, 8)
    state["clipmodel.logit_scale"] = torch.tensor(4.6)
    return state


def reference_clip_vip(state, tokens):
    """The same weights in a fresh Hugging Face module with eager attention and weights on."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = CLIPTextModel(config).eval()
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    model.load_state_dict(
        {
            prefix + key.removeprefix("clipmodel.text_model."): value
            for key, value in state.items()
            if key.startswith("clipmodel.text_model.") and not key.endswith("position_ids")
        }
    )
    with torch.no_grad():
        out = model(input_ids=tokens, output_attentions=True)
    return out.last_hidden_state @ state["clipmodel.text_projection.weight"].T, out.attentions


@pytest.fixture(scope="module")
def clip_vip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clipvip") / "pretrain_clipvip_base_32.pt"
    torch.save(clip_vip_state(), path)
    return path


def test_clip_vip_prototypes_equal_the_reference_forward(clip_vip_file):
    state = clip_vip_state()
    tokens = tokenize(TEXTS)
    projected, attentions = reference_clip_vip(state, tokens)
    extractor = build_extractor("clip_vip", checkpoint=str(clip_vip_file), k=6)
    out = extractor.extract(TEXTS)
    features, mask = reference_selection(projected, attentions, tokens, 6)
    assert extractor.dim == OUT
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.features, features, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory) -> tuple[str, Path]:
    """A tiny open_clip architecture (registered by config, as open_clip's own JSON configs
    are) and a whole-model checkpoint of it, image tower included."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    name = "macsc-test-tiny"
    _MODEL_CONFIGS[name] = tiny_open_clip_config()
    model = open_clip.create_model(name)
    state = {**model.state_dict(), **openai_text_state(seed=2)}
    path = tmp_path_factory.mktemp("open_clip") / "tiny.pt"
    torch.save(state, path)
    return name, path


def test_open_clip_checkpoint_prototypes_equal_the_reference_forward(open_clip_file, tmp_path):
    from safetensors.torch import save_file

    name, path = open_clip_file
    state = torch.load(path, weights_only=True)
    tokens = tokenize(TEXTS)
    projected, attentions = reference_clip_forward(state, tokens)
    features, mask = reference_selection(projected, attentions, tokens, 4)
    safetensors_path = tmp_path / "tiny.safetensors"
    save_file(state, str(safetensors_path))
    for checkpoint in (path, safetensors_path):
        extractor = build_extractor(
            "open_clip", model_name=name, pretrained=None, checkpoint=str(checkpoint), k=4
        )
        out = extractor.extract(TEXTS)
        assert torch.equal(out.mask, mask)
        torch.testing.assert_close(out.features, features, atol=1e-4, rtol=1e-4)


def test_open_clip_offline_download_failure_says_how_to_supply_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="checkpoint=PATH"):
        build_extractor(
            "open_clip", model_name="ViT-B-32", pretrained="openai", download_dir=str(tmp_path)
        )
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        build_extractor("open_clip", model_name="ViT-B-32", pretrained="nope")


@pytest.mark.parametrize(
    ("kind", "old", "new"),
    [
        ("audioclip", "transformer.resblocks.1.ln_2.weight", "transformer.resblocks.1.ln2.weight"),
        ("audioclip", "ln_final.weight", None),
        (
            "clip_vip",
            "clipmodel.text_model.encoder.layers.1.self_attn.k_proj.weight",
            "clipmodel.text_model.encoder.layers.1.self_attn.key.weight",
        ),
        ("clip_vip", "clipmodel.text_projection.weight", None),
        ("clip_vip", "clipmodel.text_model.final_layer_norm.bias", "clipmodel.final_ln.bias"),
    ],
)
def test_renamed_or_missing_key_is_named(kind, old, new, tmp_path):
    state = audioclip_state() if kind == "audioclip" else clip_vip_state()
    value = state.pop(old)
    if new is not None:
        state[new] = value
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        build_extractor(kind, checkpoint=str(path))
    message = str(error.value)
    assert str(path) in message
    stripped = old.removeprefix("clipmodel.text_model.")
    assert stripped in message or old in message
    if new is not None:
        assert new.removeprefix("clipmodel.text_model.") in message


def test_checkpoint_that_would_run_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "AudioCLIP-Full-Training.pt"
    torch.save({"state_dict": audioclip_state(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        build_extractor("audioclip", checkpoint=str(path))
    assert not marker.exists()
    extractor = build_extractor("audioclip", checkpoint=str(path), trust_checkpoint=True)
    assert marker.exists()  # trusting really did run the file's code
    assert extractor.extract(["ok"]).features.shape == (1, 8, OUT)


def test_user_errors_are_one_clear_line(audioclip_file, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*checkpoint=PATH"):
        build_extractor("audioclip", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="needs checkpoint=PATH"):
        build_extractor("clip_vip")
    with pytest.raises(ConfigError, match="k=100"):
        build_extractor("audioclip", checkpoint=str(audioclip_file), k=100)
    with pytest.raises(ConfigError, match="attention_layers"):
        build_extractor("audioclip", checkpoint=str(audioclip_file), attention_layers=[2])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(audioclip_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        build_extractor("audioclip", checkpoint=str(truncated))


def test_frozen_extractor_has_no_gradients_and_stays_in_eval_mode(audioclip_file):
    extractor = build_extractor("audioclip", checkpoint=str(audioclip_file))
    extractor.train()
    assert not extractor.training and not extractor.tower.training
    assert not any(p.requires_grad for p in extractor.parameters())
    assert extractor.cacheable
    assert extractor.extract(["a cat"]).features.grad_fn is None
    extractor.trainable = True  # switching later unfreezes the weights too
    assert all(p.requires_grad for p in extractor.parameters()) and not extractor.cacheable


@pytest.mark.parametrize("kind", ["audioclip", "clip_vip"])
def test_trainable_extractor_passes_gradients_to_the_tower(kind, audioclip_file, clip_vip_file):
    path = audioclip_file if kind == "audioclip" else clip_vip_file
    extractor = build_extractor(kind, checkpoint=str(path), trainable=True)
    extractor.train()
    assert extractor.training and not extractor.cacheable
    out = extractor.extract(["a dog barks", "rain"])
    (out.features**2).sum().backward()
    named = dict(extractor.named_parameters())
    embedding = next(p for n, p in named.items() if n.endswith("token_embedding.weight"))
    first_block = [p for n, p in named.items() if ".0." in n and p.dim() == 2]
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    assert first_block and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block)
