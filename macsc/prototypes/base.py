"""The prototype-source interface (SPEC section 1) and its registry.

A prototype extractor turns text segments into "conceptual prototypes": ``k`` feature vectors of
width ``dim`` per segment, plus a mask for segments that yield fewer than ``k``. Everything the
model and the data modules know about a source goes through :class:`PrototypeExtractor`; new
sources register themselves with :func:`register_extractor` and are built by name with
:func:`build_extractor`, so configs select them without code changes.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from macsc.errors import ConfigError


@dataclass
class Prototypes:
    """Prototypes of a batch of segments.

    features: ``(B, k, d)`` float, selected tokens in their original order.
    mask: ``(B, k)`` bool, True where a prototype is real (False pads segments with fewer than k).
    """

    features: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.features.dim() != 3 or self.mask.shape != self.features.shape[:2]:
            raise ValueError(
                f"Prototypes need features (B, k, d) and mask (B, k); got "
                f"{tuple(self.features.shape)} and {tuple(self.mask.shape)}"
            )


class PrototypeExtractor(nn.Module):
    """Base class of every prototype source.

    Subclasses set ``kind``, implement :meth:`_extract` and :attr:`dim`, and extend
    :meth:`identity` with everything that changes their output (checkpoint hash, options,
    tokenizer), which is what the prototype cache keys on.
    """

    kind: ClassVar[str] = ""

    def __init__(self, k: int = 8, trainable: bool = False) -> None:
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"prototype option k must be an integer >= 1, got {k!r}")
        self.k = int(k)
        self.trainable = trainable

    @property
    def trainable(self) -> bool:
        """Whether the extractor is fine-tuned with the model (paper Table 6); setting it also
        switches ``requires_grad`` of its weights."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        self.requires_grad_(self._trainable)

    @property
    def dim(self) -> int:
        """Width ``d_m`` of one prototype."""
        raise NotImplementedError

    @property
    def cacheable(self) -> bool:
        """Frozen extractors are pure functions of the text, so their output can be cached."""
        return not self.trainable

    def identity(self) -> dict[str, Any]:
        """Everything that changes a prototype, except the text itself (the cache key)."""
        return {"kind": self.kind, "k": self.k, "dim": self.dim}

    @property
    def device(self) -> torch.device:
        """Where the extractor's weights live (CPU for weightless sources)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> PrototypeExtractor:
        """A frozen extractor stays in eval mode (no dropout) so it remains a fixed function of
        the text even while the model around it trains; a trainable one follows ``mode``."""
        return super().train(mode and self.trainable)

    def extract(self, texts: list[str]) -> Prototypes:
        """Prototypes of ``texts``: features ``(len(texts), k, dim)``, mask ``(len(texts), k)``."""
        if self.trainable:
            return self._extract(list(texts))
        with torch.no_grad():
            return self._extract(list(texts))

    def _extract(self, texts: list[str]) -> Prototypes:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., PrototypeExtractor]] = {}


def register_extractor(kind: str) -> Callable[[type[PrototypeExtractor]], type[PrototypeExtractor]]:
    """Class decorator: make ``kind`` buildable through :func:`build_extractor`."""

    def wrap(cls: type[PrototypeExtractor]) -> type[PrototypeExtractor]:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def available_extractors() -> list[str]:
    return sorted(_REGISTRY)


def build_extractor(kind: str, **options: Any) -> PrototypeExtractor:
    """Build a prototype extractor by kind.

    ``kind`` is a registered name (``gaussian``, ``open_clip``, ...) or the shorthand
    ``hf:<name-or-path>`` for a Hugging Face encoder (the paper's Table 5 sources).
    """
    if kind.startswith("hf:"):
        options = {"model_name": kind[3:], **options}
        kind = "hf"
    if kind not in _REGISTRY:
        raise ConfigError(
            f"unknown prototype extractor kind {kind!r}; choose one of {available_extractors()} "
            "(or 'hf:<model name or path>')"
        )
    factory = _REGISTRY[kind]
    accepted, required = _options_of(factory)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"prototype extractor kind {kind!r} has no option {unknown[0]!r}; its options "
            f"are {sorted(accepted)}"
        )
    missing = [name for name in required if name not in options]
    if missing:
        raise ConfigError(f"prototype extractor kind {kind!r} needs the option {missing[0]!r}")
    return factory(**options)


def extractor_options(kind: str) -> list[str]:
    """The option names :func:`build_extractor` accepts for the registered ``kind``, sorted."""
    if kind not in _REGISTRY:
        raise ConfigError(
            f"unknown prototype extractor kind {kind!r}; choose one of {available_extractors()}"
        )
    return sorted(_options_of(_REGISTRY[kind])[0])


def _options_of(factory: type) -> tuple[set[str], list[str]]:
    """The option names an extractor class accepts, and those it requires.

    A class whose ``__init__`` takes ``**options`` forwards them to its parent, so the names are
    collected along the class hierarchy until an ``__init__`` without ``**``: every option is
    declared once, where it is used, and still checked here by name. Positional-only
    parameters are what a subclass passes itself (a tower, a tokenizer), never options.
    """
    accepted: set[str] = set()
    required: list[str] = []
    for klass in factory.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        forwards = False
        for parameter in parameters:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif parameter.kind not in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.POSITIONAL_ONLY,
            ):
                accepted.add(parameter.name)
                if parameter.default is inspect.Parameter.empty and klass is factory:
                    required.append(parameter.name)
        if not forwards:
            break
    return accepted, required


def text_seed(text: str, salt: int = 0) -> int:
    """A stable 63-bit seed derived from a text (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@register_extractor("gaussian")
class GaussianExtractor(PrototypeExtractor):
    """Gaussian noise of the shape of real prototypes (paper Table 5's noise ablation).

    Each text gets its own generator seeded from the text, the ``seed`` and the ``stream``, so
    the noise is a fixed function of the text: the same sentence always gets the same
    "prototypes", as a frozen encoder would. The model sets ``stream`` to the modality's name,
    so two modalities with the same options still get independent noise (Table 5's control is
    one noise source per modality, not one source shared).
    """

    def __init__(
        self, dim: int = 512, k: int = 8, seed: int = 0, std: float = 1.0, stream: str = ""
    ):
        super().__init__(k=k, trainable=False)
        if dim < 1:
            raise ConfigError(f"gaussian prototype option dim must be >= 1, got {dim}")
        self._dim = int(dim)
        self.seed = int(seed)
        self.std = float(std)
        self.stream = str(stream)

    @property
    def dim(self) -> int:
        return self._dim

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "seed": self.seed, "std": self.std, "stream": self.stream}

    def _extract(self, texts: list[str]) -> Prototypes:
        features = torch.empty(len(texts), self.k, self._dim)
        for row, text in enumerate(texts):
            generator = torch.Generator().manual_seed(
                text_seed(f"{self.stream}\x00{text}", self.seed)
            )
            features[row] = torch.randn(self.k, self._dim, generator=generator) * self.std
        return Prototypes(features, torch.ones(len(texts), self.k, dtype=torch.bool))
