"""The Lightning side: the LightningModule (:class:`MaCSC`), the optimiser, strategies, guards,
exact resume, checkpoint files, result files and the TensorBoard heatmaps.

``from macsc.training import MaCSC`` imports Lightning; importing one of this package's plain
modules (``macsc.training.figures``) does not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MaCSC"]


def __getattr__(name: str) -> Any:
    if name == "MaCSC":
        from macsc.training.module import MaCSC

        return MaCSC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
