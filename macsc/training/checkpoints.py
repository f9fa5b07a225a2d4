"""MaCSC checkpoints, read and written.

Reading: no code from the file runs unless trusted, a checkpoint of another architecture is
one clear line, and checkpoints of earlier layouts still load.

Writing: atomically, and with a ``last.ckpt`` that is the latest state.

- :class:`AtomicCheckpointIO`: a save killed midway (or failing on a full disk) never replaces
  the previous good file. :class:`macsc.training.resume.RunState` puts it in place of Lightning's
  default, so every MaCSC run uses it.
- :class:`LastCheckpoint`: ``last.ckpt`` holds the run's latest state. With a monitored
  ``ModelCheckpoint(save_last=True)``, Lightning 2.6 rewrites ``last.ckpt`` only when the
  monitored score improves, so after a run whose score got worse it holds an older state.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from macsc.errors import CheckpointError
from macsc.prototypes.published_weights import safe_torch_load, state_dict_mismatch

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


#: the name a checkpoint has while it is written: hidden, and matched by none of Lightning's
#: checkpoint patterns (``*.ckpt``, ``last*``, ``hpc_ckpt_*``)
PARTIAL_PREFIX = ".macsc-partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but a local file is only ever replaced by a complete one.

    The checkpoint is written to a hidden file in the target's folder, flushed to the disk, and
    renamed over the target (``os.replace``: atomic within one file system), so a reader, or a
    resume after a crash, sees either the previous file or the new one, never a part. Lightning's
    own save is atomic only when ``$TMPDIR`` is on the checkpoint's file system (fsspec writes a
    ``tempfile.mkstemp()`` file and moves it; across file systems the move copies into the
    target in place), and it holds the whole file in memory first. Remote paths (``s3://``, ...)
    are left to Lightning.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        partial = os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        # created as open() would create the target (mode 0666 less the umask)
        handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise
        _sync_folder(folder)  # the rename itself survives a power cut


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a folder
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt``: the latest state of the run, whatever the validation score.

    It saves when its trigger fires (every epoch by default; or ``every_n_train_steps``,
    ``every_n_epochs``, ``train_time_interval`` as ``ModelCheckpoint`` takes them), and once more
    at the end of training if the final step was not saved yet (a run stopped by ``max_steps``
    between two triggers). Resume with ``--ckpt_path last``; keep the best score with a
    monitored ``ModelCheckpoint`` beside it (``filename: best``).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_train_epoch_end: bool | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval,
            save_on_train_epoch_end=save_on_train_epoch_end,
            verbose=verbose,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
