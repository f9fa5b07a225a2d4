"""Run folders: a failed evaluation leaves no empty ``version_N`` folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

#: what a run folder holds before anything was evaluated or trained
_BOOKKEEPING = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")


def holds_only_bookkeeping(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the files every run writes at its start."""
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        if not any(path.match(pattern) for pattern in _BOOKKEEPING):
            return False
    return True


class EmptyRunCleanup(L.Callback):
    """When ``validate``, ``test`` or ``predict`` fails, deletes the run folder it had opened
    if it holds only the config, the hyperparameters and an event file (a failed run would
    otherwise leave an empty ``version_N`` behind, and the next run would take ``version_N+1``).
    Training runs keep their folders: their logs say how far they got. The model adds it
    itself (``configure_callbacks``)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        stage = trainer.state.fn.value if trainer.state.fn else None
        logger = trainer.logger
        if stage == "fit" or logger is None or not trainer.is_global_zero:
            return
        folder = Path(getattr(logger, "log_dir", "") or "")
        if folder.name.startswith("version_") and folder.is_dir():
            if holds_only_bookkeeping(folder):
                shutil.rmtree(folder, ignore_errors=True)
