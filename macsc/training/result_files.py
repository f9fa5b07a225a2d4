"""Run folders: where a run is said to be, what an evaluation writes into them, and no empty
``version_N`` folder left behind by a failed one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

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


class RunFolderNote(L.Callback):
    """Says where the run is: ``fit`` names its folder and its checkpoints' folder when it
    starts, and each checkpoint kept when it ends (the best with its score); ``validate``,
    ``test`` and ``predict`` name the folder their result files went to. The model adds it
    itself (``configure_callbacks``)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        folder = _run_folder(trainer)  # a broadcast under DDP: every rank asks
        where = [f"run folder {folder}"] if folder else []
        where += [f"checkpoints in {path}" for path in _checkpoint_folders(trainer)]
        if where:
            rank_zero_info(f"macsc: {', '.join(where)}")

    def on_fit_end(self, trainer, pl_module) -> None:
        folder = _run_folder(trainer)
        kept = []
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.best_model_path:
                continue
            score = callback.best_model_score
            shown = f" ({callback.monitor} {float(score):.4g})" if score is not None else ""
            kept.append(f"{callback.best_model_path}{shown}")
        text = f"macsc: finished; run folder {folder}" if folder else "macsc: finished"
        rank_zero_info(text + (f"; checkpoints {', '.join(kept)}" if kept else ""))

    def _evaluated(self, trainer) -> None:
        folder = _run_folder(trainer)
        if folder:
            rank_zero_info(f"macsc: {trainer.state.fn.value} results in {folder}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._evaluated(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluated(trainer)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._evaluated(trainer)


def _run_folder(trainer: L.Trainer) -> str | None:
    return trainer.log_dir if trainer.loggers else None


def _checkpoint_folders(trainer: L.Trainer) -> list[str]:
    folders = [
        callback.dirpath
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
    ]
    return list(dict.fromkeys(str(folder) for folder in folders))


def write_evaluation(
    log_dir: Path, stage: str, name: str, summary: dict[str, Any], result: Any
) -> None:
    """One evaluated split's files in ``log_dir`` (docs/results.md, "Result files"):

    - ``metrics-<split>.json``: ``summary`` (stage, split, task, global_step, epoch) and the
      metrics, written by validate and test (and each validation of fit; the latest wins);
    - ``predictions-<split>.jsonl``: one record per example (validate, test, predict);
    - the task's official files (SQuAD's ``predictions.json``, ``null_odds.json``) in
      ``<stage>_<name>_step<N>/``.

    ``result`` is a :class:`macsc.method.heads.EvaluationResult`; ``<split>`` is ``summary["split"]``.
    """
    from macsc.method.heads.base import prediction_folder

    log_dir.mkdir(parents=True, exist_ok=True)
    split = summary["split"]
    if stage != "predict":
        content = {**summary, "metrics": result.metrics}
        (log_dir / f"metrics-{split}.json").write_text(json.dumps(content, indent=2) + "\n")
    with (log_dir / f"predictions-{split}.jsonl").open("w", encoding="utf-8") as handle:
        for record in result.records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    if result.files:
        folder = prediction_folder(log_dir, stage, name, summary["global_step"])
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, content in result.files.items():
            (folder / file_name).write_text(
                json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8"
            )
