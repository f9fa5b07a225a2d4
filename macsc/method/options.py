"""The method's options, in groups: each option documented once, on its field.

A group is passed whole to the part that uses it (:class:`EnhancerOptions` to
:class:`macsc.method.network.MaCSCNetwork`, :class:`ObjectiveOptions` to
:class:`macsc.method.objective.MaCSCObjective`). In a config the groups are the keys under
``model`` (``model.enhancer.heads``, ``model.objective.tau``); ``macsc fit --help`` shows each
field with its docstring. The groups are frozen, so one default instance can be shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from macsc.errors import ConfigError
from macsc.method.calibration import WEIGHT_NORMALIZATIONS
from macsc.method.losses import REDUCTIONS

Options = TypeVar("Options")


@dataclass(frozen=True)
class EnhancerOptions:
    """Semantic concept enhancement (SPEC 2, Eq. 2-3): one attention block per non-text
    modality over ``[H^t ; P_m]``."""

    enabled: bool = True
    """``false`` is the "w/o Concept Enhancement" ablation: no attention, ``Ĥ^t_m = H^t`` and
    ``Ĥ^m = P_m``."""
    shared: bool = False
    """One attention block for all modalities instead of one each."""
    heads: int = 8
    """Attention heads of each block (paper: 8); they must divide the backbone's width."""
    feed_forward: bool = False
    """A feed-forward block (with its residual connection and LayerNorm) after the attention."""

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ConfigError(f"model.enhancer.heads must be at least 1, got {self.heads}")


@dataclass(frozen=True)
class ObjectiveOptions:
    """The objective ``L = L_wa + λ L_msb`` (SPEC 4-5, Eq. 4-8, 13-14)."""

    lambda_msb: float | None = None
    """``λ``, the weight of the self-balancing loss ``L_msb`` (Eq. 14); null: the task kind's
    (0.2 as in the paper's A.3; 0 for generation, where the paper cancels it). ``0`` with
    ``modalities: [text]`` is plain fine-tuning, the "+None" baseline."""
    alpha: float = 1.0
    """``α``, the strength of the class-prior debiasing of Eq. 4 (spans have no prior: 0)."""
    tau: float = 0.1
    """``τ``, the temperature of the contrastive distribution of Eq. 7."""
    proj_dim: int = 128
    """Width of each modality's contrastive projector ``g_m``."""
    weight_normalization: str = "balanced"
    """Which fine-grained weights enter Eq. 7: ``balanced`` (Eq. 5 rescaled per modality pair
    so the pairs' losses are comparable), ``batch`` (Eq. 5 as written) or ``positives`` (Eq. 5
    normalised over each row's positives); SPEC 5 says why ``balanced`` is the default."""
    reduction: str = "mean"
    """``mean`` or ``sum`` over the examples, for ``L_wa`` and ``L_msb`` alike (Eq. 8 and 12 sum;
    ``mean`` keeps ``λ`` independent of the batch size)."""
    gather_across_devices: bool = False
    """Under DDP, all-gather features and predictions so that ``L_msb``'s positives and
    negatives span the global batch (default: each device's own batch, as the paper)."""

    def __post_init__(self) -> None:
        choose(
            "model.objective.weight_normalization", self.weight_normalization, WEIGHT_NORMALIZATIONS
        )
        choose("model.objective.reduction", self.reduction, REDUCTIONS)
        if not self.tau > 0:
            raise ConfigError(f"model.objective.tau must be > 0, got {self.tau}")
        if self.proj_dim < 1:
            raise ConfigError(f"model.objective.proj_dim must be at least 1, got {self.proj_dim}")


def choose(key: str, value: str, known: tuple[str, ...]) -> None:
    """A ConfigError naming the config ``key`` when ``value`` is not one of ``known``."""
    if value not in known:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(known)}")


def as_options(cls: type[Options], value: Any, key: str) -> Options:
    """``value`` as the options group ``cls``: an instance as it is, a mapping (a config's or a
    checkpoint's) field by field, None as the defaults. An unknown field is a ConfigError
    naming ``key`` and the known fields."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(
            f"{key} should be a mapping of its options ({', '.join(field_names(cls))}), "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - set(field_names(cls)))
    if unknown:
        raise ConfigError(
            f"{key}: unknown option {unknown[0]!r}; the options are {', '.join(field_names(cls))}"
        )
    return cls(**value)


def field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def as_dict(options: Any) -> dict[str, Any]:
    """An options group as plain data (what a checkpoint's hyperparameters hold)."""
    return dataclasses.asdict(options)
