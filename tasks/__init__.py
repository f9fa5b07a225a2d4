"""Data modules, one per task family; each declares its TaskSpec and yields MaCSC batches."""

from tasks.base import MaCSCDataModule, TextSplit
from tasks.commongen import CommonGenDataModule
from tasks.demo import DemoDataModule
from tasks.glue import GLUE_TASKS, GLUEDataModule, TableDataModule, TableFormat

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
