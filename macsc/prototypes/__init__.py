"""Prototype sources (SPEC section 1) and the prototype cache (SPEC section 8)."""

from .base import (
    GaussianExtractor,
    PrototypeExtractor,
    Prototypes,
    available_extractors,
    build_extractor,
    register_extractor,
)
from .cache import PrototypeTable, prototype_table

__all__ = [
    "GaussianExtractor",
    "PrototypeExtractor",
    "PrototypeTable",
    "Prototypes",
    "available_extractors",
    "build_extractor",
    "prototype_table",
    "register_extractor",
]
