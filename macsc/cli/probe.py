"""``macsc probe``: the zero-shot visual-reasoning probes of paper Table 7 from the command line
(the protocol itself is :mod:`macsc.analysis.probes`)."""

from __future__ import annotations

from pathlib import Path


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


def main(argv: list[str]) -> int:
    """``macsc probe``: print the table, then the JSON report as the last line."""
    import json

    from macsc.errors import ConfigError

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
    from macsc.analysis.probe_data import load_probes
    from macsc.analysis.probes import format_table, report

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
    return 0


def _probe_device(name: str | None):
    import torch

    from macsc.errors import ConfigError

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

    from macsc.analysis import probes
    from macsc.errors import ConfigError

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
