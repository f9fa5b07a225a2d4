"""The ``macsc`` command.

``macsc fit|validate|test|predict --config FILE`` is a LightningCLI over :class:`macsc.model.MaCSC`
and any data module of :mod:`tasks`; ``macsc prototypes --config FILE`` fills the prototype cache
ahead of training; ``macsc squad-eval ...`` is the official-style SQuAD evaluation;
``macsc probe ...`` runs the zero-shot visual-reasoning probes of paper Table 7.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = """usage: macsc {fit,validate,test,predict} --config FILE [options]
       macsc prototypes --config FILE     fill the prototype cache ahead of training
       macsc squad-eval DATA_JSON PRED_JSON [--na-prob-file F] [--na-prob-thresh T] [--version 2.0|1.1]
       macsc probe (--model NAME | --ckpt RUN.ckpt | --clip '{kind: open_clip, ...}')
                   [--memory-color F] [--color-terms F] [--object-shape F|DIR] [--json OUT]

Run `macsc fit --help` for every option, `macsc fit --config FILE --print_config` to see a
config resolved, `macsc probe --help` for the probes' options."""


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


def fill_prototype_cache(args: list[str]) -> None:
    """``macsc prototypes --config FILE``: build the model's extractors and fill the cache."""
    cli = run_lightning(args, run=False)
    cli.datamodule.prepare_data()
    print(
        f"prototype cache ready for {type(cli.datamodule).__name__} ({', '.join(cli.model.modalities[1:]) or 'no modality'})"
    )


def probe_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="macsc probe",
        description="Zero-shot visual-reasoning probes (paper Table 7): accuracy per template and "
        "averaged over templates. Give one model and at least one probe file.",
    )
    model = parser.add_argument_group("model (exactly one)")
    model.add_argument("--model", help="a masked LM: hub name, local folder or package:<module>")
    model.add_argument("--ckpt", help="a MaCSC checkpoint written by `macsc fit`")
    model.add_argument(
        "--clip",
        help="a CLIP-style text tower as YAML extractor options, e.g. "
        "'{kind: open_clip, model_name: ViT-B-32, pretrained: openai}'",
    )
    data = parser.add_argument_group("probes (at least one)")
    data.add_argument("--memory-color", help="Memory-Color JSON Lines or CSV file")
    data.add_argument("--color-terms", help="ColorTerms CSV file (Object,color)")
    data.add_argument("--object-shape", help="ViComTe shape JSON Lines file or db/shape folder")
    data.add_argument(
        "--shape-split",
        default="test",
        choices=["test", "single"],
        help="with a folder: test.jsonl (default) or single/test.jsonl",
    )
    parser.add_argument("--json", help="also write the JSON report to this file")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--mlm-head",
        help="--ckpt only: take the MLM head from this model instead of the checkpoint's backbone",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a --ckpt (or --clip checkpoint) that needs full unpickling",
    )
    return parser


def run_probes(argv: list[str]) -> None:
    """``macsc probe``: print the table, then the JSON report as the last line."""
    import json

    from .errors import ConfigError

    args = probe_parser().parse_args(argv)
    chosen = [flag for flag in ("model", "ckpt", "clip") if getattr(args, flag)]
    if len(chosen) != 1:
        raise ConfigError(
            "macsc probe needs exactly one model: --model NAME, --ckpt RUN.ckpt or "
            f"--clip '{{kind: open_clip, ...}}' (got {', '.join('--' + c for c in chosen) or 'none'})"
        )
    if not (args.memory_color or args.color_terms or args.object_shape):
        raise ConfigError(
            "macsc probe needs at least one probe file: --memory-color, --color-terms or "
            "--object-shape"
        )
    if args.mlm_head and not args.ckpt:
        raise ConfigError("--mlm-head applies to --ckpt only (a --model scores with its own head)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    from tasks.probes import load_probes

    from .probes import format_table, report

    probe_list = load_probes(
        args.memory_color, args.color_terms, args.object_shape, args.shape_split
    )
    model, score = _probe_model(args, _probe_device(args.device))
    results = [score(probe) for probe in probe_list]
    summary = report(model, results)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as error:
            raise ConfigError(f"--json: cannot write {args.json!r}: {error.strerror}") from error
    print(format_table(results))
    print(json.dumps(summary))


def _probe_device(name: str | None):
    import torch

    from .errors import ConfigError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r} is not a torch device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return device


def _probe_model(args, device):
    """The model ``macsc probe`` was given: its description for the report, and
    ``probe -> ProbeResult``."""
    from functools import partial

    from . import probes
    from .errors import ConfigError

    if args.clip:
        import yaml

        try:
            options = yaml.safe_load(args.clip)
        except yaml.YAMLError as error:
            raise ConfigError(f"--clip is not valid YAML: {str(error).splitlines()[0]}") from error
        if not isinstance(options, dict):
            raise ConfigError(
                f"--clip must be a mapping such as '{{kind: open_clip}}', got {args.clip!r}"
            )
        if args.trust_checkpoint:
            options.setdefault("trust_checkpoint", True)
        embed = probes.clip_scorer(options, device)
        return {"kind": "clip", "tower": options}, partial(
            probes.score_clip, embed_fn=embed, batch_size=args.batch_size
        )
    if args.model:
        tokenizer, logits = probes.masked_lm_scorer(args.model, device)
        model = {"kind": "masked_lm", "model": args.model}
    else:
        tokenizer, logits, loaded = probes.macsc_scorer(
            args.ckpt, device, args.trust_checkpoint, args.mlm_head
        )
        model = {"kind": "macsc", **loaded}
    return model, partial(
        probes.score_masked_lm, tokenizer=tokenizer, logits_fn=logits, batch_size=args.batch_size
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
        if argv[0] == "squad-eval":
            from .squad_eval import main as squad_eval

            return int(squad_eval(argv[1:]) or 0)
        if argv[0] == "probe":
            run_probes(argv[1:])
            return 0
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
