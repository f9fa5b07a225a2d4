"""The ``macsc`` command.

``macsc fit|validate|test|predict --config FILE`` is a LightningCLI over :class:`macsc.model.MaCSC`
and any data module of :mod:`tasks`; ``macsc prototypes --config FILE`` fills the prototype cache
ahead of training (and with ``--verify`` checks its files in full); ``macsc squad-eval ...`` is
the official-style SQuAD evaluation;
``macsc commongen-eval ...`` scores CommonGen sentences as the CommonGen leaderboard does;
``macsc report|overlap|weights ...`` read finished runs (:mod:`macsc.report`,
:mod:`macsc.overlap`, :mod:`macsc.weights`);
``macsc probe ...`` runs the zero-shot visual-reasoning probes of paper Table 7.
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
       macsc squad-eval DATA_JSON PRED_JSON [-n NA_PROB_JSON] [-t T] [-o FILE] [-p DIR] [-v]
                        [--missing-as-wrong] [--version 2.0|1.1]   the official SQuAD scores
       macsc commongen-eval REFERENCES PREDICTIONS [--tokenizer spacy|ptb]
                            BLEU-4, METEOR, ROUGE-L, CIDEr, coverage (JSON)
       macsc report RUN ... [--table N] [--out FILE.md] [--name RUN=ROW]   runs beside the paper's tables
       macsc overlap RUN ... [--split S] [--csv F] [--png F]   overlap of correct predictions (Figure 4)
       macsc weights RUN_OR_CKPT [--out DIR]   the modality weights rho and pi_z of a checkpoint
       macsc probe (--model NAME | --ckpt RUN.ckpt | --clip '{kind: open_clip, ...}')
                   [--memory-color F] [--color-terms F] [--object-shape F|DIR] [--json OUT]

Run `macsc fit --help` for every option, `macsc fit --config FILE --print_config` to see a
config resolved, `macsc probe --help` for the probes' options."""

#: the subcommands that are not LightningCLI's, by the module whose ``main(argv)`` runs them
#: (imported only when used, so ``macsc --help`` stays fast)
COMMANDS = {
    "squad-eval": "macsc.squad_eval",
    "commongen-eval": "macsc.commongen_eval",
    "probe": "macsc.probe_command",
    "report": "macsc.report",
    "overlap": "macsc.overlap",
    "weights": "macsc.weights",
}


def option_error(message: str, parser) -> str:
    """The argument parser's ``message`` as one line, with the closest valid option when it
    is about an unknown one (instead of a 60-line usage dump)."""
    import difflib
    import re

    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    known = {
        option.lstrip("-")
        for action in getattr(parser, "_actions", [])
        for option in action.option_strings
        if option.startswith("--")
    }
    inner = re.search(r"Option '([\w.\-]+)' is not accepted", message)
    outer = re.match(r'Parser key "([\w.\-]+)"', first)
    if inner and outer:  # a subclass's init argument (data.init_args.batch_sise)
        key = f"{outer.group(1)}.init_args.{inner.group(1)}"
        known = {f"{outer.group(1)}.init_args.{name}" for name in data_module_options()}
    else:
        unknown = re.search(r"accept option '-{0,2}([\w.\-]+)'", first) or re.search(
            r"unrecognized arguments: -{0,2}([\w.\-]+)", first
        )
        if unknown is None:
            return bad_value(message, first)
        key = unknown.group(1)
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    prog = getattr(parser, "prog", "macsc").replace(" [options]", "")
    return f"unknown option {key!r}{hint} (`{prog} --help` lists every option)"


def bad_value(message: str, first: str) -> str:
    """A value the parser rejected, in one line: the key, what was expected, what was given."""
    import re

    key = re.match(r'Parser key "([\w.\-]+)"', first)
    if key is None:
        return first[:300]
    expected = re.findall(r"- Expected an? <class '(\w+)'>", message)
    expected = [name for name in expected if name != "NoneType"]
    given = re.search(r"Given value: (.*)", message)
    errors = [
        line.strip(" -")
        for line in message.splitlines()[1:]
        if line.strip().startswith("- ") and "Expected a" not in line
    ]
    what = f"expected {' or '.join(expected)}" if expected else (errors[0] if errors else "")
    shown = f", got {given.group(1)[:80]!r}" if given else ""
    return f"option {key.group(1)!r}: {what or 'invalid value'}{shown}"[:300]


def data_module_options() -> set[str]:
    """The init arguments of the data modules macsc ships (for suggestions)."""
    import inspect

    from tasks import commongen, demo, glue, squad
    from tasks.base import MaCSCDataModule

    classes = (
        MaCSCDataModule,
        glue.GLUEDataModule,
        glue.TableDataModule,
        squad.SquadDataModule,
        commongen.CommonGenDataModule,
        demo.DemoDataModule,
    )
    return {
        name
        for cls in classes
        for name in inspect.signature(cls.__init__).parameters
        if name not in ("self", "options")
    }


def _cli_class():
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class MacscArgumentParser(LightningArgumentParser):
        """Reports a bad option or config key in one line, naming the closest valid key."""

        def error(self, message: str, ex: Exception | None = None):
            from .errors import CommandLineError

            parser = getattr(ex, "subcommand_parser", None) or self
            raise CommandLineError(option_error(message, parser)) from ex

    class MacscCLI(LightningCLI):
        """Links what only the data knows into the model, and connects the data to the model."""

        def init_parser(self, **kwargs):
            kwargs.setdefault("dump_header", [])
            parser = MacscArgumentParser(**kwargs)
            from jsonargparse import ActionConfigFile

            parser.add_argument(
                "-c",
                "--config",
                action=ActionConfigFile,
                help="Path to a configuration file in json or yaml format.",
            )
            return parser

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(
                "data",
                "model.task",
                compute_fn=lambda data: data.task_spec.to_dict(),
                apply_on="instantiate",
            )

        def before_instantiate_classes(self) -> None:
            """A relative logger ``save_dir`` (the configs' ``runs``) is relative to
            ``--trainer.default_root_dir`` when one is given, so the root dir decides where
            runs go unless the user points the logger elsewhere."""
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            trainer = config.get("trainer") if config is not None else None
            root = trainer.get("default_root_dir") if trainer is not None else None
            if not root:
                return
            loggers = trainer.get("logger")
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                init_args = getattr(logger, "init_args", None)
                save_dir = getattr(init_args, "save_dir", None) if init_args else None
                if isinstance(save_dir, str) and not Path(save_dir).expanduser().is_absolute():
                    init_args.save_dir = str(Path(root) / save_dir)

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
                    self.model.tokenizer, self.model.extractors, self.model.modalities
                )

        def _parse_ckpt_path(self) -> None:
            """``--ckpt_path`` must load with ``weights_only=True`` (unpickling it can then run
            no code) unless the user passes ``--weights_only false``: refused with one line
            before LightningCLI reads the file for its hyperparameters, and the run is then held
            to ``weights_only``. A trusted file keeps the configured model settings: LightningCLI
            reads hyperparameters with ``weights_only=True`` only."""
            from .checkpointing import check_checkpoint_is_safe

            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand) if subcommand else None
            path = config.get("ckpt_path") if config is not None else None
            if path is None:
                return
            if config.get("weights_only") is False:
                return
            # Lightning's keywords ("last", "best", ...) and remote files are Lightning's to read
            local = "://" not in str(path)
            if Path(path).exists() or (local and Path(path).suffix == ".ckpt"):
                check_checkpoint_is_safe(path, how_to_trust="pass --weights_only false")
            config["weights_only"] = True
            super()._parse_ckpt_path()

        def _resolve_last(self) -> None:
            """``--ckpt_path last``: the newest ``last*.ckpt`` of this experiment, in any of
            its run folders (``<save_dir>/<name>/version_*/checkpoints``) or a configured
            ``dirpath``. Lightning looks only in the new run's own folder, which is empty, and
            then goes on without a checkpoint: training from scratch, or testing an untrained
            model. Nothing found is an error here."""
            from .checkpointing import check_checkpoint_is_safe
            from .errors import CheckpointError

            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") != "last":
                return
            folders = last_checkpoint_folders(self.trainer)
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
            config["ckpt_path"] = str(max(found, key=lambda path: path.stat().st_mtime))
            if config.get("weights_only") is not False:
                check_checkpoint_is_safe(
                    config["ckpt_path"], how_to_trust="pass --weights_only false"
                )

        before_fit = before_validate = before_test = before_predict = _resolve_last

    return MacscCLI


def last_checkpoint_folders(trainer) -> list[Path]:
    """Where ``last.ckpt`` files of this experiment can be: every run folder of the logger's
    experiment (``version_*/checkpoints``), each configured ``dirpath``, and the folder Lightning
    uses without a logger."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = [
        Path(callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
    ]
    root = getattr(trainer.logger, "root_dir", None)
    if root:
        folders += sorted(Path(root).glob("version_*/checkpoints"))
    folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


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
    import warnings

    with warnings.catch_warnings():  # the arguments come from our command line, not Python
        warnings.filterwarnings(
            "ignore", message=".*args parameter is intended to run from within Python"
        )
        cli = run_lightning(args, run=False)
    cli.datamodule.prepare_data()
    tables = cli.datamodule.prototype_tables()
    print(cache_summary(cli.datamodule.cache_dir, tables))
    if not verify:
        return 0
    return report_cache_files([t.path for ts in tables.values() for t in ts if t.path])


def cache_summary(cache_dir, tables: dict) -> str:
    """What ``macsc prototypes`` did: per modality, the cache files read (hits) and built
    (misses), the size written, and the folder -- or that nothing was stored."""
    from .prototypes import resolve_cache_dir

    folder = resolve_cache_dir(cache_dir)
    lines = []
    written = 0
    for modality, entries in tables.items():
        built = [t for t in entries if t.built]
        size = sum(t.path.stat().st_size for t in built if t.path is not None)
        written += size
        lines.append(
            f"  {modality}: {len(entries) - len(built)} read from the cache, {len(built)} "
            f"extracted" + (f" ({size / 2**20:.1f} MiB written)" if size else "")
        )
    if folder is None:
        head = "prototypes extracted but not stored: the cache is off (data cache_dir: false)"
    elif not tables:
        head = f"nothing to cache (no frozen prototype extractor); cache folder {folder}"
    else:
        head = f"prototype cache {folder}: {written / 2**20:.1f} MiB written"
    return "\n".join([head, *lines])


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
        if argv[0] in COMMANDS:
            from importlib import import_module

            return int(import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0)
        if argv[0] == "prototypes":
            return prototypes_command(argv[1:])
        # LightningCLI warns when given args while sys.argv has some too
        run_lightning(None if from_command_line else argv)
        return 0
    except MacscError as error:
        print(f"macsc: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from .run_state import lost_rank_message

        message = lost_rank_message(error)
        if message is None:
            raise
        print(f"macsc: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
