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
from lightning.pytorch.utilities import rank_zero_info
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


def check_checkpoint_is_safe(path: str | Path, *, how_to_trust: str) -> Any:
    """Raise :class:`CheckpointError` unless ``path`` loads with ``weights_only=True`` (so that
    unpickling it runs no code) -- before Lightning reads it, so the refusal is a clear line.
    A folder or a file that is not a checkpoint is named as what it is. Zip-format files are
    memory-mapped, so the check reads no tensor data. Returns what was loaded."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return safe_torch_load(path, how_to_trust=how_to_trust, mmap=zipfile.is_zipfile(path))


def check_resumable(checkpoint: Any, path: str | Path) -> None:
    """Raise :class:`CheckpointError` when ``checkpoint`` (loaded from ``path``) holds the
    weights only (a ``best.ckpt``: ``ModelCheckpoint(save_weights_only=True)``), which a fit
    cannot resume: it has no optimiser, scheduler or loop state."""
    if isinstance(checkpoint, dict) and "optimizer_states" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds the model's weights only (best.ckpt is saved so), "
            "not the optimiser and loop state a fit resumes from: resume from the run's "
            "last.ckpt (--ckpt_path last), and validate, test or predict with this one"
        )


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


#: the checkpoint entry with the head options as they took effect (``TaskHead.recorded_options``)
HEAD_OPTIONS_KEY = "macsc_head_options"


class CheckpointedModule(L.LightningModule):
    """How the MaCSC LightningModule (:class:`macsc.training.module.MaCSC`, which sets
    ``network``, ``head``, ``modalities`` and ``spec``) reads and writes checkpoints: safely,
    from earlier layouts, with a one-line error for another architecture, and with the head
    options it ran with."""

    def __init__(self) -> None:
        super().__init__()
        self._checkpoint_hparams: dict[str, Any] = {}

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> CheckpointedModule:
        """Lightning's ``load_from_checkpoint``, made safe: the file is read with
        ``weights_only=True``, so one whose unpickling would run code is refused with a
        :class:`CheckpointError` unless ``trust_checkpoint=True``; a missing, damaged or
        mismatched checkpoint is a CheckpointError too. (``macsc fit --ckpt_path`` follows the
        same rule; there ``--weights_only false`` is the trust option.)"""
        if not trust_checkpoint and is_local(checkpoint_path):
            check_checkpoint_is_safe(checkpoint_path, how_to_trust="pass trust_checkpoint=True")
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location,
            hparams_file,
            strict,
            weights_only=not trust_checkpoint,
            **kwargs,
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that also reads checkpoints of earlier layouts
        (:func:`macsc.training.checkpoints.upgrade_state_dict`), and reports a checkpoint of another
        architecture (another backbone width, other modalities or task) in one line naming the
        mismatched keys and the checkpoint's settings, not torch's page of keys."""
        state_dict = upgrade_state_dict(state_dict)
        saved = {
            key: self._checkpoint_hparams[key]
            for key in ("backbone", "modalities", "task")
            if key in self._checkpoint_hparams
        }
        encoder = (
            f"text tower {self.network.backbone.description}"
            if self.network.is_text_tower
            else f"backbone {self.hparams.backbone!r}"
        )
        describe = f"{encoder}, modalities {self.modalities}, task {self.spec.kind}"
        error = mismatch_error(self.state_dict(), state_dict, strict, describe, saved)
        if error is not None:
            raise error
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the head options as they took effect, so that a later default cannot change what a
        # checkpoint loads as; beside the hyperparameters, which load_from_checkpoint's keyword
        # overrides rewrite
        checkpoint[HEAD_OPTIONS_KEY] = self.head.recorded_options()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        note = self.head.restore_options(checkpoint.get(HEAD_OPTIONS_KEY) or {})
        if note is not None:
            rank_zero_info(note)
        # only when resuming a run: load_from_checkpoint has already mixed its keyword
        # overrides into these hyperparameters, and starts no training
        if self._trainer is not None:
            self._checkpoint_hparams = dict(checkpoint.get("hyper_parameters") or {})
