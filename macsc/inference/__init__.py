"""A trained model taken out of macsc: exported to a folder with no pickle in it
(:mod:`macsc.inference.export`, :mod:`macsc.inference.folder`, the model card
:mod:`macsc.inference.card`), loaded back with :meth:`MaCSC.from_pretrained`, and run on raw
inputs (:meth:`MaCSC.predict`, :mod:`macsc.inference.predict`).

This layer stands on the training side (the LightningModule), the data modules of :mod:`tasks`
(which read raw inputs as they read their data) and :mod:`macsc.analysis` (the modality weights
of the model card); only the command line stands above it.
"""

from macsc.inference.export import Export, export_checkpoint
from macsc.inference.model import MaCSC

__all__ = ["Export", "MaCSC", "export_checkpoint"]
