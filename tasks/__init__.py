"""Data modules, one per task family; each declares its TaskSpec and yields MaCSC batches."""

from .base import MaCSCDataModule, TextSplit
from .commongen import CommonGenDataModule
from .demo import DemoDataModule
from .glue import GLUE_TASKS, GLUEDataModule, TableDataModule, TableFormat

__all__ = [
    "CommonGenDataModule",
    "GLUE_TASKS",
    "DemoDataModule",
    "GLUEDataModule",
    "MaCSCDataModule",
    "TableDataModule",
    "TableFormat",
    "TextSplit",
]
