"""How checkpoints are written: atomically, and with a ``last.ckpt`` that is the latest state.

- :class:`AtomicCheckpointIO`: a save killed midway (or failing on a full disk) never replaces
  the previous good file. :class:`macsc.run_state.RunState` puts it in place of Lightning's
  default, so every MaCSC run uses it.
- :class:`LastCheckpoint`: ``last.ckpt`` holds the run's latest state. With a monitored
  ``ModelCheckpoint(save_last=True)``, Lightning 2.6 rewrites ``last.ckpt`` only when the
  monitored score improves, so after a run whose score got worse it holds an older state.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
