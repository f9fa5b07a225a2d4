"""Run folders: what an evaluation writes into them, and no empty ``version_N`` folder left
behind by a failed one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
