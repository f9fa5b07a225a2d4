"""Writing ``macsc predict`` results to disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes one JSON line per example: ``{"index", "prediction", "branches": {m: ...}}``.

    ``index`` is the example's position in the predicted split, ``prediction`` the fused
    prediction (the class name when the data module knows the names, else the class index or the
    regression value), ``branches`` each modality's own prediction. Each DDP rank writes its own
    file (``predictions.rank<N>.jsonl``); sort by ``index`` to merge.

    Args:
        output_dir: folder for the files (default: the trainer's log folder).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._files: dict[int, Any] = {}

    def _file(self, trainer) -> Any:
        if trainer.global_rank not in self._files:
            folder = Path(self.output_dir or trainer.log_dir or ".")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"predictions.rank{trainer.global_rank}.jsonl"
            self._files[trainer.global_rank] = path.open("w", encoding="utf-8")
        return self._files[trainer.global_rank]

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        names = _label_names(trainer.datamodule)
        indices = batch.get("example_index")
        fused = prediction["fused"].tolist()
        rows = range(len(fused)) if indices is None else indices.tolist()
        handle = self._file(trainer)
        for position, index in enumerate(rows):
            record = {
                "index": index,
                "prediction": _named(fused[position], names),
                "branches": {
                    branch: _named(values[position], names)
                    for branch, values in (
                        (b, v.tolist()) for b, v in prediction.items() if b != "fused"
                    )
                },
            }
            handle.write(json.dumps(record) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def _label_names(datamodule) -> tuple[str, ...]:
    table_format = getattr(datamodule, "table_format", None)
    return tuple(getattr(table_format, "label_names", ()) or ())


def _named(value: Any, names: tuple[str, ...]) -> Any:
    if names and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return value if not isinstance(value, torch.Tensor) else value.item()
