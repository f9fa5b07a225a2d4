"""MaCSC: multimodal-augmented PLMs via conceptual prototypes and self-balancing calibration.

``from macsc import MaCSC`` gives :class:`macsc.inference.MaCSC` (the LightningModule, with
``from_pretrained`` and ``predict``), imported on first use so that ``import macsc`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MaCSC", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "MaCSC":
        from macsc.inference.model import MaCSC

        return MaCSC
    raise AttributeError(f"module 'macsc' has no attribute {name!r}")
