"""``macsc weights RUN_OR_CKPT``: the learned modality weights of a checkpoint.

Prints the late-fusion weights ``ρ = softmax(r)`` (Eq. 11) and the coarse pair weights
``π_z`` (Eq. 6, :func:`macsc.method.allocation.coarse_weights` of ``Z``) per modality, and writes the
``π_z`` heatmap TensorBoard shows (``weights/pi_z``) and a bar chart of ``ρ`` as PNGs. The file is
read with ``torch.load(weights_only=True)``: one whose unpickling would run code is refused.
Both state-dict layouts are read: ``rho_logits`` / ``calibration.z`` and
``objective.rho_logits`` / ``objective.calibration.z``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macsc.errors import CheckpointError

RHO_KEYS = ("objective.rho_logits", "rho_logits")
Z_KEYS = ("objective.calibration.z", "calibration.z")


@dataclass
class ModalityWeights:
    """modalities: names; rho: ``(M,)``; pi_z: ``(M, M)`` (zero diagonal), or None when the run
    had no calibration module (``lambda_msb: 0`` or one modality)."""

    modalities: list[str]
    rho: Any
    pi_z: Any | None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint file, how it was chosen). A run folder means its ``checkpoints/last.ckpt``,
    else its newest ``.ckpt``."""
    path = Path(path)
    if path.is_file():
        return path, "the file given"
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder or a .ckpt file")
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last, "the run's last.ckpt"
    candidates = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"run folder {str(path)!r} holds no .ckpt file")
    return candidates[-1], "the run's newest .ckpt (it has no checkpoints/last.ckpt)"


def _state_entry(state: dict[str, Any], names: tuple[str, ...]) -> Any | None:
    for name in names:
        if name in state:
            return state[name]
    for name in names:  # wrapped models: "module.rho_logits", "_orig_mod.objective.rho_logits"
        hits = [key for key in state if key.endswith("." + name)]
        if len(hits) == 1:
            return state[hits[0]]
    return None


def read_weights(checkpoint: dict[str, Any], source: str = "checkpoint") -> ModalityWeights:
    """ρ and π_z from a loaded checkpoint ``{"state_dict": ..., "hyper_parameters": ...}``."""
    import torch

    from macsc.method.allocation import coarse_weights

    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds no state dict")
    rho_logits = _state_entry(state, RHO_KEYS)
    hparams = checkpoint.get("hyper_parameters") or {}
    task = hparams.get("task") if isinstance(hparams.get("task"), dict) else {}
    if rho_logits is None and task.get("kind") == "generation":
        # a MaCSC checkpoint all the same: its head has one output, so there is nothing to fuse
        raise CheckpointError(
            f"{source} is of a generation run (one decoder reads every modality, no late "
            "fusion and no self-balancing), which learns no modality weights rho or pi_z"
        )
    if not isinstance(rho_logits, torch.Tensor) or rho_logits.dim() != 1:
        raise CheckpointError(
            f"{source} has no modality weights ({' or '.join(RHO_KEYS)}); is it a MaCSC checkpoint?"
        )
    size = rho_logits.shape[0]
    modalities = list(hparams.get("modalities") or [])
    if len(modalities) != size:
        modalities = [f"modality{i}" for i in range(size)]
    z = _state_entry(state, Z_KEYS)
    if z is not None and tuple(z.shape) != (size, size):
        raise CheckpointError(
            f"{source}: Z has shape {tuple(z.shape)}, expected ({size}, {size}) for {size} modalities"
        )
    rho = torch.softmax(rho_logits.detach().float(), dim=0)
    pi_z = coarse_weights(z.detach().float()) if z is not None else None
    return ModalityWeights(modalities, rho, pi_z)


def load_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    from macsc.prototypes.published_weights import safe_torch_load

    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    # zip-format files are memory-mapped: only rho and Z are read, not the optimizer state
    content = safe_torch_load(
        path,
        trusted=trust,
        how_to_trust="pass --trust-checkpoint",
        map_location="cpu",
        mmap=zipfile.is_zipfile(path),
    )
    if not isinstance(content, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a dict of state and settings")
    return content


def format_weights(weights: ModalityWeights) -> str:
    names = weights.modalities
    width = max(len(n) for n in names)
    lines = ["rho (late-fusion weights, Eq. 11):"]
    lines += [
        f"  {name.ljust(width)}  {value:.4f}"
        for name, value in zip(names, weights.rho.tolist(), strict=True)
    ]
    if weights.pi_z is None:
        lines.append("pi_z: none (no calibration module: lambda_msb = 0 or a single modality)")
        return "\n".join(lines)
    cell = max(width, 6)
    lines.append("pi_z (coarse pair weights, Eq. 6; row = anchor m, column = partner k):")
    lines.append("  " + " " * width + "  " + "  ".join(n.rjust(cell) for n in names))
    for row, name in enumerate(names):
        values = [
            "–".rjust(cell) if row == col else f"{weights.pi_z[row, col].item():.4f}".rjust(cell)
            for col in range(len(names))
        ]
        lines.append(f"  {name.ljust(width)}  " + "  ".join(values))
    return "\n".join(lines)


def write_figures(weights: ModalityWeights, folder: Path, stem: str) -> list[Path]:
    """``pi_z-<stem>.png`` (the heatmap of TensorBoard's ``weights/pi_z``) and
    ``rho-<stem>.png`` (a bar chart of ρ) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from macsc.training.figures import pair_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if weights.pi_z is not None:
        figure = pair_heatmap(weights.pi_z, weights.modalities, "pi_z (coarse)")
        path = folder / f"pi_z-{stem}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    figure, axes = plt.subplots(figsize=(1.2 * len(weights.modalities) + 2, 3))
    axes.bar(weights.modalities, weights.rho.tolist(), color="tab:blue")
    for index, value in enumerate(weights.rho.tolist()):
        axes.text(index, value, f"{value:.2f}", ha="center", va="bottom")
    axes.set_ylim(0, max(1e-6, float(weights.rho.max())) * 1.2)
    axes.set_ylabel("rho")
    axes.set_title("rho (late fusion)")
    figure.tight_layout()
    path = folder / f"rho-{stem}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written


def default_out(checkpoint: Path) -> Path:
    """``<run>/weights`` for a checkpoint in ``<run>/checkpoints/``, else its own folder."""
    folder = checkpoint.parent
    return folder.parent / "weights" if folder.name == "checkpoints" else folder
