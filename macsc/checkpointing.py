"""Loading MaCSC checkpoints safely: no code from the file runs unless trusted, a checkpoint of
another architecture is one clear line, and checkpoints of earlier layouts still load."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from torch import Tensor

from .errors import CheckpointError
from .prototypes.checkpoints import safe_torch_load, state_dict_mismatch

#: state-dict key prefixes of checkpoints written before the model was split into network,
#: heads and objective (macsc 0.1, before 2026-12): old prefix -> new prefix
LEGACY_PREFIXES: dict[str, str] = {
    "backbone.": "network.backbone.",
    "enhancers.": "network.enhancers.",
    "trainable_extractors.": "network.trainable_extractors.",
    "calibration.": "objective.calibration.",
}
LEGACY_KEYS: dict[str, str] = {
    "rho_logits": "objective.rho_logits",
    "class_prior": "objective.class_prior",
    "skipped_batches": "guard.skipped_batches",
}


def upgrade_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the keys of an earlier layout renamed to today's (a dict of today's
    layout is returned unchanged)."""
    if not any(key in state_dict for key in LEGACY_KEYS) and not any(
        key.startswith(tuple(LEGACY_PREFIXES)) for key in state_dict
    ):
        return state_dict
    upgraded = {}
    for key, value in state_dict.items():
        new = LEGACY_KEYS.get(key, key)
        for old, prefix in LEGACY_PREFIXES.items():
            if key.startswith(old):
                new = prefix + key[len(old) :]
                break
        upgraded[new] = value
    return upgraded


def mismatch_error(
    expected: dict[str, Tensor],
    state_dict: dict[str, Any],
    strict: bool,
    describe: str,
    saved: dict[str, Any],
) -> CheckpointError | None:
    """One line naming the keys and shapes that keep ``state_dict`` from loading into a model
    whose state dict is ``expected`` (``describe``: that model's settings; ``saved``: the
    checkpoint's), or None when it fits."""
    problems = state_dict_mismatch(expected, state_dict, keys=strict)
    if not problems:
        return None
    return CheckpointError(
        f"the checkpoint does not fit this model ({describe}): "
        + "; ".join(problems)
        + (f". It was saved with {saved}" if saved else "")
        + "; load it with the settings it was trained with"
    )


def check_checkpoint_is_safe(path: str | Path, *, how_to_trust: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` loads with ``weights_only=True`` (so that
    unpickling it runs no code) -- before Lightning reads it, so the refusal is a clear line.
    A folder or a file that is not a checkpoint is named as what it is. Zip-format files are
    memory-mapped, so the check reads no tensor data."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    safe_torch_load(path, how_to_trust=how_to_trust, mmap=zipfile.is_zipfile(path))


def is_local(path: Any) -> bool:
    """A local file path (not a URL, not an open file), which can be checked before loading."""
    return isinstance(path, str | Path) and "://" not in str(path)
