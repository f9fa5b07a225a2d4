"""``macsc fit|validate|test|predict``: the LightningCLI over :class:`macsc.training.MaCSC` and
any data module of :mod:`tasks`, with one-line errors for a bad option or config key.

Importing this module imports Lightning (~7 s): the dispatcher imports it only for these
subcommands, so ``macsc --help`` and the other subcommands stay fast.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info


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
    path = re.search(r"(File does not exist|Path is not a file): '(.*)'", first)
    if path is not None:
        what = "does not exist" if path.group(1).startswith("File") else "is not a file"
        return (
            f"option {key.group(1)!r}: {path.group(2)!r} {what}; give the path of a YAML file "
            f"(relative to the current folder, {str(Path.cwd())!r})"
        )
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


def upgrade_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` with the names of earlier macsc versions read as today's, and one note line per
    argument that used them: a ``--config`` file (or string) with flat model options or class
    paths of the flat layout is given as its content in today's names
    (:func:`macsc.training.legacy.upgrade_config`); ``--model.<old flat option>`` becomes the
    option's key today (``--model.lambda_msb`` -> ``--model.objective.lambda_msb``)."""
    import yaml

    from macsc.training.legacy import LEGACY_OPTIONS, is_legacy_option

    upgraded: list[str] = []
    notes: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        position += 1
        name, sep, value = arg.partition("=")
        if not sep and position < len(args) and name in ("--config", "-c", *_old_options()):
            value = args[position]
            position += 1
        elif not sep:
            upgraded.append(arg)
            continue
        if name in ("--config", "-c"):
            value, note = upgrade_config_argument(value)
            notes += [note] if note else []
        elif name in _old_options() and is_legacy_option(name[8:], _yaml_value(yaml, value)):
            new = "--model." + LEGACY_OPTIONS[name[8:]]
            notes.append(f"{name} is the old name of {new}; read as {new}")
            name = new
        upgraded += [f"{name}={value}"] if sep else [name, value]
    return upgraded, notes


def _old_options() -> tuple[str, ...]:
    from macsc.training.legacy import LEGACY_OPTIONS

    return tuple(f"--model.{key}" for key in LEGACY_OPTIONS)


def _yaml_value(yaml, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def upgrade_config_argument(value: str) -> tuple[str, str | None]:
    """A ``--config`` value (a file, or a YAML string) in today's names, and a note line when
    it used the names of an earlier macsc (then the value returned is the upgraded YAML
    string); the value itself, and None, when it did not or is not a YAML mapping."""
    import yaml

    from macsc.training.legacy import describe_renames, upgrade_config

    path = Path(value)
    is_file = path.is_file()
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8") if is_file else value)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return value, None  # the parser names what is wrong with it
    if not isinstance(config, dict):
        return value, None
    config, renamed = upgrade_config(config)
    if not renamed:
        return value, None
    where = value if is_file else "the --config string"
    return yaml.safe_dump(config, sort_keys=False), (
        f"{where} uses the names of an earlier macsc: {describe_renames(renamed)}; it was read "
        "with today's names (macsc/training/legacy.py lists them all)"
    )


class MacscArgumentParser(LightningArgumentParser):
    """Reports a bad option or config key in one line, naming the closest valid key."""

    def error(self, message: str, ex: Exception | None = None):
        from macsc.errors import CommandLineError

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

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, with the option names and class paths of earlier macsc versions read
        as today's (:func:`upgrade_arguments`), saying so in one note line each."""
        if isinstance(args, dict):
            return super().parse_arguments(parser, args)
        given = sys.argv[1:] if args is None else list(args)
        upgraded, notes = upgrade_arguments(given)
        if not notes:
            return super().parse_arguments(parser, args)
        for note in notes:
            rank_zero_info(f"note: {note}")
        self.config = parser.parse_args(upgraded)

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
        from macsc.errors import MacscError

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
        before the file is read for its hyperparameters, and the run is then held to
        ``weights_only``. A trusted file keeps the configured model settings. A fit cannot
        resume from a weights-only file (``best.ckpt``): one line says so.

        The checkpoint's hyperparameters then replace the configured model options, as
        LightningCLI does, but read memory-mapped (no tensor data; LightningCLI loads the
        whole file) and in today's names: a checkpoint of an earlier macsc, with flat options,
        runs with its settings (:func:`macsc.training.legacy.upgrade_model_options`)."""
        from macsc.training.checkpoints import (
            check_checkpoint_is_safe,
            check_resumable,
            hyperparameters_of,
        )
        from macsc.training.legacy import describe_renames, upgrade_model_options

        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        path = config.get("ckpt_path") if config is not None else None
        if path is None or config.get("weights_only") is False:
            return
        # Lightning's keywords ("last", "best", ...) and remote files are Lightning's to read
        local = "://" not in str(path)
        if not (Path(path).exists() or (local and Path(path).suffix == ".ckpt")):
            config["weights_only"] = True
            return
        saved = check_checkpoint_is_safe(path, how_to_trust="pass --weights_only false")
        if subcommand == "fit":
            check_resumable(saved, path)
        hparams = hyperparameters_of(saved)
        config["weights_only"] = True
        hparams.pop("_instantiator", None)
        hparams, renamed = upgrade_model_options(hparams)
        if not hparams:
            return
        if renamed:
            rank_zero_info(
                f"note: {path} holds the names of an earlier macsc: {describe_renames(renamed)}; "
                "it was read with today's names (macsc/training/legacy.py lists them all)"
            )
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs):
        """Name the run folder after the data and continue a run's folder for a checkpoint
        of it (:mod:`macsc.cli.run_folders`), then build the Trainer."""
        from macsc.cli.run_folders import place_run

        config = self.config[self.subcommand] if self.subcommand else self.config
        config_init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        place_run(config, config_init, self.datamodule, self.subcommand)
        return super().instantiate_trainer(**kwargs)


#: Lightning's messages that tell a macsc user nothing: an advertisement, a deprecation
#: inside Lightning, the None every MaCSC predict_step returns (predictions are written to
#: files), and the ModelCheckpoint state a checkpoint from another folder does not restore
QUIET = (
    "💡 Tip: ",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "predict returned None",
    "The dirpath has changed from",
)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.match(pattern, record.getMessage()) for pattern in QUIET)


def run_lightning(args: list[str] | None, run: bool = True):
    """Build (and by default run) the LightningCLI on ``args`` (None: the command line), with
    the messages of :data:`QUIET` silenced."""
    from lightning import LightningDataModule

    from macsc.cli.run_folders import RunConfigSaver
    from macsc.training.module import MaCSC

    # `macsc fit --help` shows each field of the option groups with its docstring (the
    # dataclasses' attribute docstrings); reading them costs every start ~1 s, so only help does
    wanted = sys.argv[1:] if args is None else args
    asks_help = any(arg in ("-h", "--help") for arg in wanted)
    set_parsing_settings(docstring_parse_attribute_docstrings=asks_help)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    quiet = _Quiet()
    rank_zero_log.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            return MacscCLI(
                MaCSC,
                LightningDataModule,
                subclass_mode_data=True,
                save_config_callback=RunConfigSaver,
                save_config_kwargs={"overwrite": True},
                args=args,
                run=run,
                auto_configure_optimizers=False,
            )
    finally:
        rank_zero_log.removeFilter(quiet)
