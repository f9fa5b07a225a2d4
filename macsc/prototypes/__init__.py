"""Prototype sources (SPEC section 1) and the prototype cache (SPEC section 8).

Kinds for :func:`build_extractor`: ``open_clip`` (image), ``audioclip`` (audio), ``clip_vip``
(video), ``hf`` / ``hf:<name>`` (any Hugging Face encoder), ``gaussian`` (noise) and
``image_features`` (stored features of retrieved images per example, SPEC 14). Importing this
package is cheap: open_clip and transformers load only when such an extractor is built.
"""

from macsc.prototypes import audioclip, clip_vip, hf_source, image_features, open_clip_source  # noqa: F401
from macsc.prototypes.audioclip import AudioClipExtractor
from macsc.prototypes.base import (
    GaussianExtractor,
    PrototypeExtractor,
    Prototypes,
    available_extractors,
    build_extractor,
    extractor_options,
    register_extractor,
)
from macsc.prototypes.cache import (
    IndexedTexts,
    PrototypeTable,
    build_prototype_cache,
    check_storage_dtype,
    index_texts,
    prototype_table,
    resolve_cache_dir,
)
from macsc.prototypes.cache_files import (
    CacheFileCheck,
    cache_files,
    sampled_ranges,
    verify_cache_file,
)
from macsc.prototypes.clip_text import ClipTextExtractor
from macsc.prototypes.clip_vip import ClipVipExtractor
from macsc.prototypes.hf_source import HuggingFaceExtractor
from macsc.prototypes.image_features import (
    ImageFeatures,
    ImageFeatureSource,
    read_image_features,
    write_image_features,
)
from macsc.prototypes.open_clip_source import OpenClipExtractor
from macsc.prototypes.selection import select_top_k
from macsc.prototypes.windowed import TokenPrototypeExtractor

__all__ = [
    "AudioClipExtractor",
    "CacheFileCheck",
    "ClipTextExtractor",
    "ClipVipExtractor",
    "GaussianExtractor",
    "HuggingFaceExtractor",
    "ImageFeatureSource",
    "ImageFeatures",
    "IndexedTexts",
    "OpenClipExtractor",
    "PrototypeExtractor",
    "PrototypeTable",
    "Prototypes",
    "TokenPrototypeExtractor",
    "available_extractors",
    "build_extractor",
    "build_prototype_cache",
    "extractor_options",
    "cache_files",
    "check_storage_dtype",
    "index_texts",
    "prototype_table",
    "read_image_features",
    "register_extractor",
    "resolve_cache_dir",
    "sampled_ranges",
    "select_top_k",
    "verify_cache_file",
    "write_image_features",
]
