"""Where a ``macsc fit|validate|test|predict`` run writes, decided before the Trainer is built.

- The run folder is named after the data: a file logger (TensorBoard, CSV) whose ``name`` the
  configs leave at the class default gets the data module's ``run_name`` (``runs/glue_sst2/``,
  ``runs/<table_format.name>/`` for your own table), so an overlay that swaps the data also
  renames the folder.
- ``--ckpt_path last`` is the newest ``last*.ckpt`` of the experiment (any of its run folders,
  a configured ``dirpath``, or ``<default_root_dir>/checkpoints``).
- A checkpoint that lies in one of the experiment's run folders
  (``<save_dir>/<name>/version_N/checkpoints/``) continues in that folder: a resumed fit logs on
  into the same TensorBoard run, and validate, test and predict write their result files beside
  the run's (as Hugging Face's ``output_dir``). A checkpoint from anywhere else, or a logger
  given a ``version``, opens a folder as configured.
- Evaluating into a folder that has a ``config.yaml`` keeps it (``macsc report`` reads the
  training run's settings there) and saves the evaluation's as ``config-<stage>.yaml``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback


def last_checkpoint_folders(
    callbacks: list[Any], logger_roots: list[Path], default_root_dir: str | Path
) -> list[Path]:
    """Where ``last.ckpt`` files of this experiment can be: each configured ``dirpath`` of a
    ModelCheckpoint, every run folder of the loggers (``version_*/checkpoints``), and the
    folder Lightning uses without a logger."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = [
        Path(callback.dirpath)
        for callback in callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
    ]
    for root in logger_roots:
        folders += sorted(Path(root).glob("version_*/checkpoints"))
    folders.append(Path(default_root_dir) / "checkpoints")
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


def newest_last_checkpoint(folders: list[Path]) -> Path:
    """The newest ``last*.ckpt`` in ``folders``; a CheckpointError when there is none."""
    from macsc.errors import CheckpointError

    found = [
        path
        for folder in folders
        for path in folder.glob("last*.ckpt")
        if path.is_file() and not path.name.startswith(".")
    ]
    if not found:
        where = ", ".join(str(f) for f in folders) or "no checkpoint folder"
        raise CheckpointError(
            f"--ckpt_path last: no last.ckpt in {where}; give the checkpoint's path"
        )
    return max(found, key=lambda path: path.stat().st_mtime)


def run_folder_of(checkpoint: Any, root: Path) -> str | None:
    """The ``version_N`` folder of ``root`` (``<save_dir>/<name>``) that holds ``checkpoint``
    in its ``checkpoints/``, or None when the checkpoint lies anywhere else."""
    if not isinstance(checkpoint, str | Path) or "://" in str(checkpoint):
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_file() or path.parent.name != "checkpoints":
        return None
    run = path.resolve().parent.parent
    return run.name if run.parent == root.expanduser().resolve() else None


def _file_loggers(config: Any, instances: Any) -> list[tuple[Any, Any, int | None]]:
    """(config node, logger, position in a list or None) of every logger that writes into
    ``<save_dir>/<name>/<version>`` and was configured by class path."""
    if isinstance(instances, list | tuple):
        if not isinstance(config, list | tuple) or len(config) != len(instances):
            return []
        pairs = [
            (node, logger, i)
            for i, (node, logger) in enumerate(zip(config, instances, strict=True))
        ]
    else:
        pairs = [(config, instances, None)]
    return [
        (node, logger, position)
        for node, logger, position in pairs
        if hasattr(logger, "root_dir")
        and hasattr(logger, "log_dir")
        and getattr(node, "init_args", None) is not None
    ]


def _default(cls: type, option: str) -> Any:
    parameter = inspect.signature(cls).parameters.get(option)
    return None if parameter is None else parameter.default


def place_run(config: Any, config_init: Any, datamodule: Any, subcommand: str | None) -> None:
    """Name the run after the data, resolve ``--ckpt_path last``, and continue a run's folder
    for a checkpoint of it (module docstring): edits ``config`` (what ``config.yaml`` records)
    and the instantiated loggers and ``ckpt_path`` of ``config_init`` before the Trainer is
    built from them."""
    from macsc.training.checkpoints import check_checkpoint_is_safe

    trainer_config, trainer_init = config.get("trainer"), config_init.get("trainer")
    if trainer_config is None or trainer_init is None:
        return
    loggers = _file_loggers(trainer_config.get("logger"), trainer_init.get("logger"))
    run_name = getattr(datamodule, "run_name", None)
    changes: list[dict[str, Any]] = []
    for node, logger, _ in loggers:
        change = {}
        if run_name and node.init_args.get("name") == _default(type(logger), "name"):
            change["name"] = run_name
        changes.append(change)
    roots = [
        Path(node.init_args.save_dir) / change.get("name", node.init_args.get("name") or "")
        for (node, _, _), change in zip(loggers, changes, strict=True)
    ]
    ckpt_path = config_init.get("ckpt_path") if subcommand else None
    if ckpt_path == "last":
        folders = last_checkpoint_folders(
            trainer_init.get("callbacks") or [],
            roots,
            trainer_init.get("default_root_dir") or Path.cwd(),
        )
        ckpt_path = str(newest_last_checkpoint(folders))
        config_init["ckpt_path"] = ckpt_path
        if config_init.get("weights_only") is not False:
            check_checkpoint_is_safe(ckpt_path, how_to_trust="pass --weights_only false")
    for (node, logger, position), change, root in zip(loggers, changes, roots, strict=True):
        version = run_folder_of(ckpt_path, root)
        if version is not None and node.init_args.get("version") is None:
            change["version"] = version
        if not change:
            continue
        for key, value in change.items():
            node.init_args[key] = value
        rebuilt = type(logger)(**node.init_args.as_dict(), **(node.get("dict_kwargs") or {}))
        if position is None:
            trainer_init["logger"] = rebuilt
        else:
            trainer_init["logger"][position] = rebuilt


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's config saver, which keeps the ``config.yaml`` of the training run when
    validate, test or predict write into its folder: theirs is ``config-<stage>.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        name = getattr(stage, "value", stage)  # Lightning passes a TrainerFn
        if name != "fit" and log_dir and (Path(log_dir) / self.config_filename).is_file():
            self.config_filename = f"config-{name}.yaml"
        super().setup(trainer, pl_module, stage)
