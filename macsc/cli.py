"""The ``macsc`` command.

``macsc fit|validate|test|predict --config FILE`` is a LightningCLI over :class:`macsc.model.MaCSC`
and any data module of :mod:`tasks`; ``macsc prototypes --config FILE`` fills the prototype cache
ahead of training; ``macsc squad-eval ...`` is the official-style SQuAD evaluation;
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
       macsc squad-eval DATA_JSON PRED_JSON [-n NA_PROB_JSON] [-t T] [-o FILE] [-p DIR] [-v]
                        [--missing-as-wrong] [--version 2.0|1.1]   the official SQuAD scores
       macsc commongen-eval REFERENCES PREDICTIONS   BLEU-4, METEOR, ROUGE-L, CIDEr, coverage (JSON)
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


def fill_prototype_cache(args: list[str]) -> None:
    """``macsc prototypes --config FILE``: build the model's extractors and fill the cache."""
    cli = run_lightning(args, run=False)
    cli.datamodule.prepare_data()
    print(
        f"prototype cache ready for {type(cli.datamodule).__name__} ({', '.join(cli.model.modalities[1:]) or 'no modality'})"
    )


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
            fill_prototype_cache(argv[1:])
            return 0
        # LightningCLI warns when given args while sys.argv has some too
        run_lightning(None if from_command_line else argv)
        return 0
    except MacscError as error:
        print(f"macsc: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
