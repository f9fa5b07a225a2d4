"""Every option of every prototype extractor either changes its cache entry or provably leaves
the prototypes unchanged (SPEC 8), so an ablation that changes an option (the attention layers,
``include_eot``, the checkpoint, ...) is never served the prototypes of the run before it.

Parametrised over the options each registered kind declares (:func:`extractor_options`): an
option added later is covered at once, and fails here until it has an alternative value below
(one that changes the prototypes) or a reason in :data:`NO_EFFECT`. The expectation is
independent of how the key is computed: prototypes read from the cache must equal the same
extractor's prototypes computed without it.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from macsc.errors import ConfigError
from macsc.prototypes import (
    available_extractors,
    build_extractor,
    build_prototype_cache,
    extractor_options,
    prototype_table,
)
from macsc.prototypes.cache import index_texts, storage_dtype
from tests.prototypes.test_clip import (
    HEADS,
    audioclip_state,
    clip_vip_state,
    openai_text_state,
    tiny_open_clip_config,
)

# a short text (fewer candidates than k, so the EOS candidate shows), and one longer than every
# window used here (so max_windows, the context length and the attention layers all show)
TEXTS = [
    "a dog barks",
    "the quick brown fox jumps over the lazy dog near a quiet river bank " * 7,
    "rain on a tin roof",
]
K = 6

#: alternative values of the options every token-selecting extractor shares (base in brackets)
TOKEN_ALTERNATIVES = {
    "k": K - 1,  # [K]
    "attention_layers": [0],  # ["last"] of two blocks
    "include_eot": False,  # [True]
    "max_windows": 1,  # [16]
}

#: options that legitimately do not change a prototype, with the reason; the test checks the
#: claim (same prototypes) and that such an option shares the cache entry
NO_EFFECT = {
    "batch_size": "windows per encoder forward: each window is encoded on its own",
    "trust_checkpoint": "only allows unpickling a file that may run code; the weights read are "
    "the same, and their content hash is in the identity",
    "download_dir": "where open_clip keeps the downloaded file; the tag names the weights",
    "revision": "ignored for a local folder; a hub model's weights identity is the snapshot "
    "commit the revision resolves to, which the identity holds",
}

#: options under which nothing is cached at all, with the reason
NEVER_CACHED = {"trainable": "a fine-tuned extractor's prototypes change as it trains"}


@dataclass
class Source:
    base: dict[str, Any]
    alternatives: dict[str, Any]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, request):
    """``source(kind)``: a base configuration and alternative values of the kind's own options,
    its files written on first use. open_clip's pretrained tags are registered for two tiny
    architectures (which differ only in their number of heads), and its download is served
    from local files: nothing is fetched."""
    import open_clip
    import open_clip.pretrained
    from open_clip.factory import _MODEL_CONFIGS

    folder = tmp_path_factory.mktemp("cache_key_sources")

    def saved(name: str, state: dict) -> str:
        torch.save(state, folder / name)
        return str(folder / name)

    def open_clip_source() -> Source:
        for tag, seed in (("a", 3), ("b", 4)):
            tags[f"weights_{tag}"]["url"] = saved(f"{tag}.pt", openai_text_state(seed))
        return Source(
            {"model_name": "macsc-key-tiny", "pretrained": "weights_a", "k": K},
            {
                "model_name": "macsc-key-tiny-4heads",
                "pretrained": "weights_b",
                "checkpoint": saved("open_clip.pt", openai_text_state(5)),
                "quick_gelu": False,
            },
        )

    def hf_source() -> Source:
        from transformers import BertModel

        backbone = request.getfixturevalue("tiny_backbone")
        other = folder / "other_bert"
        shutil.copytree(backbone, other)
        model = BertModel.from_pretrained(backbone)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(other)
        return Source(
            {"model_name": backbone, "context_length": 16, "k": K},
            {"model_name": str(other), "context_length": 10},
        )

    makers = {
        "gaussian": lambda: Source(
            {"dim": 8, "k": 3}, {"dim": 6, "k": 2, "seed": 1, "std": 2.0, "stream": "image"}
        ),
        "audioclip": lambda: Source(
            {"checkpoint": saved("audioclip.pt", audioclip_state(0)), "k": K},
            {"checkpoint": saved("audioclip-other.pt", audioclip_state(1))},
        ),
        "clip_vip": lambda: Source(
            {"checkpoint": saved("clipvip.pt", clip_vip_state(1)), "k": K},
            {"checkpoint": saved("clipvip-other.pt", clip_vip_state(2))},
        ),
        "open_clip": open_clip_source,
        "hf": hf_source,
    }
    made: dict[str, Source] = {}

    def source(kind: str) -> Source:
        if kind not in made:
            made[kind] = makers[kind]()
        return made[kind]

    tags = {"weights_a": {"url": ""}, "weights_b": {"url": ""}}
    with pytest.MonkeyPatch.context() as patch:
        for name, heads in (("macsc-key-tiny", HEADS), ("macsc-key-tiny-4heads", 2 * HEADS)):
            patch.setitem(_MODEL_CONFIGS, name, tiny_open_clip_config(heads))
            patch.setitem(open_clip.pretrained._PRETRAINED, name, tags)
        patch.setattr(
            open_clip.pretrained, "download_pretrained", lambda tag, cache_dir=None: tag["url"]
        )
        yield source


def _table(extractor, cache_dir):
    return prototype_table(extractor, TEXTS, progress=False, cache_dir=cache_dir, dtype="float32")


def _same(first, second) -> bool:
    one, two = first.lookup(range(len(TEXTS))), second.lookup(range(len(TEXTS)))
    return (
        one.features.shape == two.features.shape
        and torch.equal(one.features, two.features)
        and torch.equal(one.mask, two.mask)
    )


@pytest.fixture(scope="module")
def stored(sources, tmp_path_factory):
    """Per kind, a cache folder holding the base configuration's entry, and that table (built
    once; each test adds its own alternative's entry beside it)."""
    tables = {}

    def entry(kind):
        if kind not in tables:
            cache = tmp_path_factory.mktemp(f"cache_{kind}")
            table = _table(build_extractor(kind, **sources(kind).base), cache)
            assert table.built and table.path is not None
            tables[kind] = cache, table
        return tables[kind]

    return entry


#: kinds whose prototypes never pass through the cache, with the reason (checked below)
UNCACHED_KINDS = {
    "image_features": "reads features the user stored, by example id; nothing is extracted",
}
OPTIONS = [
    (kind, option)
    for kind in available_extractors()
    if kind not in UNCACHED_KINDS
    for option in extractor_options(kind)
]


def test_kinds_left_out_are_never_cached(tmp_path):
    for kind in UNCACHED_KINDS:
        extractor = build_extractor(kind, files=str(tmp_path / "{split}"), dim=8)
        assert not extractor.cacheable, f"{kind} is cached: cover its options above"


@pytest.mark.parametrize(("kind", "option"), OPTIONS, ids=[f"{k}-{o}" for k, o in OPTIONS])
def test_every_option_changes_the_cache_entry_or_not_the_prototypes(
    sources, stored, kind, option, tmp_path
):
    source = sources(kind)
    alternatives = {**TOKEN_ALTERNATIVES, **source.alternatives}
    known = {*alternatives, *NO_EFFECT, *NEVER_CACHED}
    assert option in known, (
        f"the {kind} extractor's option {option!r} is not covered here: give it a value in "
        "TOKEN_ALTERNATIVES or the kind's alternatives that changes its prototypes (and add it "
        "to the identity()), or list it in NO_EFFECT with the reason"
    )
    cache, base = stored(kind)
    if option in NEVER_CACHED:
        changed = build_extractor(kind, **source.base, **{option: True})
        assert build_prototype_cache(changed, TEXTS, progress=False, cache_dir=cache) is None
        assert _table(changed, cache).path is None
        return

    value = alternatives.get(option, _no_effect_value(option, tmp_path))
    changed = build_extractor(kind, **{**source.base, option: value})
    fresh = _table(changed, False)
    cached = _table(changed, cache)
    assert _same(cached, fresh), f"{kind} {option}={value!r} was served stale prototypes"
    if option in NO_EFFECT:
        assert _same(fresh, base), f"{kind} {option} changes the prototypes: {NO_EFFECT[option]}"
        assert not cached.built and cached.path == base.path  # one entry shared
    else:
        assert not _same(fresh, base), f"{kind} {option}={value!r} is no real alternative"
        assert cached.built and cached.path != base.path


def _no_effect_value(option: str, tmp_path: Path) -> Any:
    return {"batch_size": 1, "trust_checkpoint": True, "download_dir": str(tmp_path / "d")}.get(
        option, "v0"
    )


def test_what_a_subclass_passes_itself_is_no_option():
    with pytest.raises(ConfigError, match="no option 'tokenizer'"):
        build_extractor("audioclip", checkpoint="x.pt", tokenizer=None)


def test_a_hub_models_revision_names_its_weights(tmp_path, tiny_backbone, monkeypatch):
    """A hub name is identified by the snapshot its revision resolves to (served here from a
    Hugging Face cache written by the test, offline): two revisions with different weights get
    two cache entries, and each its own prototypes."""
    import huggingface_hub.constants
    from transformers import BertModel

    repo = tmp_path / "hub" / "models--macsc--tiny"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():
        shutil.copytree(tiny_backbone, repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    model = BertModel.from_pretrained(tiny_backbone)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(-1.0)
    model.save_pretrained(repo / "snapshots" / commits["v1"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    options = {"model_name": "macsc/tiny", "context_length": 16, "k": K}
    main, v1 = build_extractor("hf", **options), build_extractor("hf", revision="v1", **options)
    assert main.identity()["weights"] == f"hub:macsc/tiny@{commits['main']}"
    assert v1.identity()["weights"] == f"hub:macsc/tiny@{commits['v1']}"
    cache = tmp_path / "cache"
    stored, cached = _table(main, cache), _table(v1, cache)
    assert cached.built and cached.path != stored.path
    assert _same(cached, _table(v1, False)) and not _same(cached, stored)


def test_a_folders_weights_are_named_by_every_files_content(tiny_backbone, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_backbone, folder)
    options = {"context_length": 16, "k": K}
    before = build_extractor("hf", model_name=str(folder), **options).identity()["weights"]
    files = sorted(path.name for path in folder.iterdir())
    assert (
        before.startswith("files:")
        and [part.split("=")[0] for part in before[6:].split(",")] == files
    )
    assert all(len(part.split("=")[1]) == 16 for part in before[6:].split(","))
    with open(folder / "vocab.txt", "a", encoding="utf-8") as handle:
        handle.write("\n")  # any file, not only the weights
    after = build_extractor("hf", model_name=str(folder), **options).identity()["weights"]
    assert after != before


def test_auto_storage_dtype_follows_the_extraction_precision():
    assert storage_dtype("auto", "bf16") == "bfloat16"
    assert storage_dtype("auto", "16") == "float16" and storage_dtype("auto", "32") == "float16"
    assert storage_dtype("float32", "bf16") == "float32"


def test_texts_with_lone_surrogates_are_indexed():
    # JSON data may hold lone surrogates ("\ud800"); they still index, distinct from others
    first, second = index_texts(["a\ud800", "b"]), index_texts(["a\udc00", "b"])
    assert (
        first.distinct == ["a\ud800", "b"]
        and first.rows.tolist() == [0, 1]
        and first.digest != second.digest
    )


def test_hf_shorthand_names_the_model(tiny_backbone):
    extractor = build_extractor(f"hf:{tiny_backbone}", k=2)
    assert extractor.kind == "hf" and extractor.model_name == tiny_backbone
    assert extractor.extract(["a dog barks"]).features.shape == (1, 2, extractor.dim)


def _clean_whitespace(text: str) -> str:
    return " ".join(text.split())


class _Lower:
    def __call__(self, text: str) -> str:
        return text.lower()


class _Strip(_Lower):
    def __call__(self, text: str) -> str:
        return text.strip()


def test_a_clip_tokenizers_identity_changes_with_whatever_changes_its_token_ids():
    """CLIP BPE tokenizers that could give different ids for one text never share a cache
    identity: another cleaning function (a plain function or a callable object), another
    vocabulary, another class; two equal ones share it."""
    from open_clip.tokenizer import SimpleTokenizer

    from macsc.prototypes.clip_text import tokenizer_identity

    class Subclass(SimpleTokenizer):
        pass

    base = SimpleTokenizer()  # loading the BPE takes a second: the variants are copies

    def variant(cls=SimpleTokenizer, **attributes):
        made = cls.__new__(cls)
        made.__dict__.update(base.__dict__, **attributes)
        return made

    assert tokenizer_identity(variant()) == tokenizer_identity(base)
    word = next(iter(base.encoder))
    renamed = dict(base.encoder)
    renamed[word + "x"] = renamed.pop(word)
    variants = [
        base,
        variant(clean_fn=_clean_whitespace),
        variant(encoder=renamed),
        variant(Subclass),
        variant(clean_fn=_Lower()),
        variant(clean_fn=_Strip()),
    ]
    identities = [tokenizer_identity(t) for t in variants]
    assert len(set(identities)) == len(variants), identities
