"""The offline demo task: is the named object's typical colour warm or cool?

A small synthetic, template-generated binary task shipped with the package (``demo_data/``, made
by ``demo_data/make_demo.py``): 800 training and 200 validation sentences, labels ``cool`` = 0 and
``warm`` = 1. It exists so ``lightning_configs/demo.yaml`` trains end to end without a network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.glue import TableDataModule, TableFormat

DEMO_DATA = Path(__file__).parent / "demo_data"
DEMO_FORMAT = TableFormat("demo", (("sentence",),), label_names=("cool", "warm"))


class DemoDataModule(TableDataModule):
    """The shipped warm/cool colour task; takes the options of
    :class:`~tasks.base.MaCSCDataModule` and no data files (it has no test split: ``predict_on``
    defaults to ``validation``).
    """

    task = "demo"

    def __init__(
        self, max_length: int = 64, predict_on: str = "validation", **options: Any
    ) -> None:
        super().__init__(
            DEMO_FORMAT,
            data_files={
                "train": str(DEMO_DATA / "train.tsv"),
                "validation": str(DEMO_DATA / "validation.tsv"),
            },
            max_length=max_length,
            predict_on=predict_on,
            **options,
        )
