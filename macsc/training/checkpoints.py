"""MaCSC checkpoints, read and written.

Reading: no code from the file runs unless trusted, a checkpoint of another architecture is
one clear line, and checkpoints of earlier versions still load, with their settings (their
state-dict keys and flat options are renamed by :mod:`macsc.training.legacy`).

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
import inspect
import io
import os
import pickle
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
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

from macsc.errors import CheckpointError, ConfigError
from macsc.method.options import as_dict
from macsc.prototypes.published_weights import safe_torch_load, state_dict_mismatch
from macsc.training.legacy import (
    OPTION_GROUPS,
    per_modality_enhancers,
    upgrade_model_options,
    upgrade_state_dict,
)


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


def read_hyperparameters(path: str | Path, *, how_to_trust: str) -> dict[str, Any]:
    """The ``hyper_parameters`` a checkpoint file holds (``{}`` for none), read as
    :func:`check_checkpoint_is_safe` reads the file (so it is that check too): with
    ``weights_only=True``, and memory-mapped when the file is a zip, so no tensor data is read."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    content = safe_torch_load(path, how_to_trust=how_to_trust, mmap=zipfile.is_zipfile(path))
    return hyperparameters_of(content)


def hyperparameters_of(content: Any) -> dict[str, Any]:
    hparams = content.get("hyper_parameters") if isinstance(content, dict) else None
    return dict(hparams) if isinstance(hparams, dict) else {}


def needs_unpickling(path: str | Path) -> bool:
    """Whether only full unpickling, which runs code from the file, reads checkpoint ``path``."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        return True
    except (RuntimeError, EOFError, OSError):
        return False  # missing or damaged: read_hyperparameters says so
    return False


def unpickled_once(path: str | Path, map_location: Any) -> tuple[io.BytesIO, dict[str, Any]]:
    """A trusted checkpoint that only full unpickling reads, read here once: the content again
    as a file in memory for Lightning to load (what the file's code built, not the code
    itself, so the code runs once), and its hyperparameters."""
    content = torch.load(path, map_location=map_location, weights_only=False)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    buffer.seek(0)
    return buffer, hyperparameters_of(content)


def checkpoint_options(
    cls: type, saved: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of ``load_from_checkpoint`` that rebuild the model a checkpoint
    saved with hyperparameters ``saved``, with ``overrides`` applied: every option group in
    full, from today's groups or from the flat options of earlier versions
    (:func:`macsc.training.legacy.upgrade_model_options`), an override of a group (a mapping
    or an options object, today's or an old flat name) changing the fields it gives. An
    override ``cls`` does not take is a ConfigError, not dropped."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    plain = {
        key: as_dict(value) if key in OPTION_GROUPS and not isinstance(value, dict) else value
        for key, value in overrides.items()
    }
    given, _ = upgrade_model_options(plain)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(
            f"load_from_checkpoint: {unknown[0]!r} is not an option of {cls.__name__} "
            f"(its options: {', '.join(sorted(known))})"
        )
    upgraded, _ = upgrade_model_options(saved)
    for group in OPTION_GROUPS:
        base = upgraded.get(group) if isinstance(upgraded.get(group), dict) else {}
        given[group] = {**base, **(given.get(group) or {})}
    return given


@contextlib.contextmanager
def local_copy(source: Any) -> Iterator[Path]:
    """A remote checkpoint (``s3://...``, ``file://...``) or an open file as a temporary local
    file, removed afterwards: its options are read before Lightning reads its tensors."""
    with tempfile.TemporaryDirectory(prefix="macsc-checkpoint-") as folder:
        path = Path(folder) / "checkpoint.ckpt"
        if isinstance(source, str | Path):
            get_filesystem(source).get(str(source), str(path))
        else:
            with path.open("wb") as file:
                shutil.copyfileobj(source, file)
        yield path


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
        same rule; there ``--weights_only false`` is the trust option.)

        A checkpoint of an earlier version, whose hyperparameters hold the flat options
        (``lambda_msb`` beside ``backbone``), loads with the settings it was trained with.
        Keyword overrides change the fields they give of an option group
        (``objective={"tau": 0.2}``; :func:`checkpoint_options`)."""
        with contextlib.ExitStack() as stack:
            if not is_local(checkpoint_path):  # a URL or an open file: read here, and by Lightning
                checkpoint_path = stack.enter_context(local_copy(checkpoint_path))
            if trust_checkpoint and needs_unpickling(checkpoint_path):
                checkpoint_path, saved = unpickled_once(checkpoint_path, map_location)
            else:
                how = "pass trust_checkpoint=True"
                saved = read_hyperparameters(checkpoint_path, how_to_trust=how)
            if hparams_file is not None:  # Lightning's rule: it replaces the checkpoint's
                from lightning.pytorch.core.saving import load_hparams_from_yaml

                saved = dict(load_hparams_from_yaml(hparams_file, use_omegaconf=False) or {})
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location,
                hparams_file,
                strict,
                weights_only=not trust_checkpoint,
                **checkpoint_options(cls, saved, kwargs),
            )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that also reads checkpoints of earlier layouts
        (:func:`macsc.training.legacy.upgrade_state_dict`), and reports a checkpoint of another
        architecture (another backbone width, other modalities or task) in one line naming the
        mismatched keys and the checkpoint's settings, not torch's page of keys."""
        enhancers = self.network.enhancers
        shared = enhancers is not None and enhancers.shared
        state_dict = upgrade_state_dict(state_dict, self.modalities[1:], shared)
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

    def save_options(self, **groups: Any) -> None:
        """Lightning's ``save_hyperparameters`` for the calling ``__init__``, with its option
        groups (name -> options object) kept as plain mappings: checkpoints are read with
        ``weights_only=True``, which unpickles no dataclass."""
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        plain = {name: as_dict(options) for name, options in groups.items()}
        self.save_hyperparameters(
            {key: plain.get(key, value) for key, value in self.hparams.items()}
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        resuming = fitting and "optimizer_states" in checkpoint
        if resuming and per_modality_enhancers(checkpoint.get("state_dict") or {}):
            # its weights load (stacked), but the optimiser's state is one entry per tensor
            raise CheckpointError(
                "this checkpoint was written before the enhancers of all modalities were "
                "stacked into one module (2026-12): its weights load (validate, test, predict), "
                "but its optimiser state cannot be resumed; finish the run with the macsc "
                "version that wrote it, or start a new fit"
            )
        note = self.head.restore_options(checkpoint.get(HEAD_OPTIONS_KEY) or {})
        if note is not None:
            rank_zero_info(note)
        # only when resuming a run: load_from_checkpoint has already mixed its keyword
        # overrides into these hyperparameters, and starts no training
        if self._trainer is not None:
            self._checkpoint_hparams = dict(checkpoint.get("hyper_parameters") or {})
