"""The offline demo task: is the named object's typical colour warm or cool?

A small synthetic, template-generated binary task shipped with the package (``demo_data/``, made
by ``demo_data/make_demo.py``): 800 training and 200 validation sentences, labels ``cool`` = 0 and
``warm`` = 1. It exists so ``lightning_configs/demo.yaml`` trains end to end without a network.
"""

from __future__ import annotations

from pathlib import Path

from .glue import TableDataModule, TableFormat

DEMO_DATA = Path(__file__).parent / "demo_data"
DEMO_FORMAT = TableFormat("demo", (("sentence",),), label_names=("cool", "warm"))


class DemoDataModule(TableDataModule):
    """The shipped warm/cool colour task; takes the options of
    :class:`~tasks.base.MaCSCDataModule` and no data files (it has no test split: ``predict_on``
    defaults to ``validation``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        max_length: int = 64,
        data_fraction: float = 1.0,
        seed: int = 42,
        prototype_batch_size: int = 64,
        cache_dir: str | bool | None = None,
        group_by_length: bool = False,
        pin_memory: bool | None = None,
        test_on: str = "validation",
        predict_on: str = "validation",
    ) -> None:
        super().__init__(
            DEMO_FORMAT,
            data_files={
                "train": str(DEMO_DATA / "train.tsv"),
                "validation": str(DEMO_DATA / "validation.tsv"),
            },
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_length=max_length,
            data_fraction=data_fraction,
            seed=seed,
            prototype_batch_size=prototype_batch_size,
            cache_dir=cache_dir,
            group_by_length=group_by_length,
            pin_memory=pin_memory,
            test_on=test_on,
            predict_on=predict_on,
        )
