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

from macsc.cli.tiny_model import (  # noqa: E402  (one copy: `macsc tiny-model` writes them)
    minilm_path,
    write_tiny_bert,
    write_tiny_t5,
)

__all__ = ["minilm_path", "write_tiny_bert", "write_tiny_t5"]


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


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    return shared_model(tmp_path_factory, "tiny_t5", write_tiny_t5)
