"""The ``macsc`` command.

``macsc fit|validate|test|predict --config FILE`` is a LightningCLI over :class:`macsc.model.MaCSC`
and any data module of :mod:`tasks`; ``macsc prototypes --config FILE`` fills the prototype cache
ahead of training, and with ``--verify`` checks its files in full; ``macsc squad-eval ...`` is the
official-style SQuAD evaluation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = """usage: macsc {fit,validate,test,predict} --config FILE [options]
       macsc prototypes --config FILE     fill the prototype cache ahead of training
       macsc prototypes [--config FILE | --cache_dir DIR] --verify
                                          check every cache file the config uses (or every file
                                          in the folder, default $MACSC_CACHE or ~/.cache/macsc)
                                          against its full checksum; exit status 1 if one is damaged
       macsc squad-eval DATA_JSON PRED_JSON [--na-prob-file F] [--na-prob-thresh T] [--version 2.0|1.1]

Run `macsc fit --help` for every option, `macsc fit --config FILE --print_config` to see a
config resolved."""


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class MacscCLI(LightningCLI):
        """Links what only the data knows into the model, and connects the data to the model."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(
                "data",
                "model.task",
                compute_fn=lambda data: data.task_spec.to_dict(),
                apply_on="instantiate",
            )

        def instantiate_classes(self) -> None:
            from .errors import MacscError

            MacscError.last = None
            try:
                super().instantiate_classes()
            except ValueError as error:
                ours = MacscError.last
                if ours is not None and str(ours) in str(error):
                    raise ours from error
                raise
            if self.datamodule is not None and hasattr(self.datamodule, "connect"):
                self.datamodule.connect(
                    self.model.backbone_name, self.model.extractors, self.model.modalities
                )

        def _parse_ckpt_path(self) -> None:
            """``--ckpt_path`` must load with ``weights_only=True`` (unpickling it can then run
            no code) unless the user passes ``--weights_only false``: refused with one line
            before LightningCLI reads the file for its hyperparameters, and the run is then held
            to ``weights_only``. A trusted file keeps the configured model settings: LightningCLI
            reads hyperparameters with ``weights_only=True`` only."""
            from .model import check_checkpoint_is_safe

            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand) if subcommand else None
            path = config.get("ckpt_path") if config is not None else None
            if path is None:
                return
            if config.get("weights_only") is False:
                return
            # Lightning's keywords ("last", "best", ...) and remote files are Lightning's to read
            if Path(path).is_file() or ("://" not in str(path) and Path(path).suffix == ".ckpt"):
                check_checkpoint_is_safe(path, how_to_trust="pass --weights_only false")
            config["weights_only"] = True
            super()._parse_ckpt_path()

    return MacscCLI


def run_lightning(args: list[str] | None, run: bool = True):
    """Build (and by default run) the LightningCLI on ``args`` (None: the command line)."""
    from lightning import LightningDataModule

    from .model import MaCSC

    return _cli_class()(
        MaCSC,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def prototypes_command(args: list[str]) -> int:
    """``macsc prototypes --config FILE [--verify]``: build the model's extractors and fill the
    cache; with ``--verify``, then read every file the config uses against its full checksum.
    ``macsc prototypes --verify [--cache_dir DIR]``: check every file in the cache folder."""
    verify = "--verify" in args
    args = [arg for arg in args if arg != "--verify"]
    if verify and not any(arg == "--config" or arg.startswith("--config=") for arg in args):
        return report_cache_files(_cache_files_in(args))
    cli = run_lightning(args, run=False)
    cli.datamodule.prepare_data()
    modalities = ", ".join(cli.model.modalities[1:]) or "no modality"
    print(f"prototype cache ready for {type(cli.datamodule).__name__} ({modalities})")
    if not verify:
        return 0
    # the tables prepare_data opened (MaCSCDataModule keeps them per split and modality)
    tables = getattr(cli.datamodule, "_tables", {})
    paths = [
        table.path
        for by_modality in tables.values()
        for segments in by_modality.values()
        for table in segments
        if table.path is not None
    ]
    return report_cache_files(paths)


def _cache_files_in(args: list[str]) -> list[Path]:
    """The files of ``--cache_dir DIR`` (default: the cache folder), the only other option."""
    from .errors import ConfigError
    from .prototypes import cache_files, resolve_cache_dir

    folder = None
    if len(args) == 2 and args[0] == "--cache_dir":
        folder = args[1]
    elif len(args) == 1 and args[0].startswith("--cache_dir="):
        folder = args[0].split("=", 1)[1]
    elif args:
        raise ConfigError(
            f"macsc prototypes --verify takes --config FILE or --cache_dir DIR, not {args}"
        )
    path = resolve_cache_dir(folder)
    if not path.is_dir():
        raise ConfigError(f"the prototype cache folder {str(path)!r} does not exist")
    return cache_files(path)


def report_cache_files(paths: list[Path]) -> int:
    """Check each file in full, print one line each and a total; 1 if one is damaged."""
    from .prototypes import verify_cache_file

    counts = {"ok": 0, "damaged": 0, "stale": 0}
    for path in paths:
        check = verify_cache_file(path)
        counts[check.status] += 1
        if check.status == "ok":
            print(f"ok       {path} ({check.texts} texts, {check.nbytes / 1e9:.2f} GB)")
        else:
            print(f"{check.status:<8} {path}: {check.reason}")
    print(
        f"{len(paths)} prototype cache files checked: {counts['ok']} ok, "
        f"{counts['damaged']} damaged, {counts['stale']} stale"
    )
    if counts["damaged"]:
        print(
            "delete each damaged file; the next `macsc prototypes --config FILE` or run that "
            "uses it rebuilds it",
            file=sys.stderr,
        )
    return 1 if counts["damaged"] else 0


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from .errors import MacscError

    try:
        if argv[0] == "squad-eval":
            from .squad_eval import main as squad_eval

            return int(squad_eval(argv[1:]) or 0)
        if argv[0] == "prototypes":
            return prototypes_command(argv[1:])
        # LightningCLI warns when given args while sys.argv has some too
        run_lightning(None if from_command_line else argv)
        return 0
    except MacscError as error:
        print(f"macsc: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
