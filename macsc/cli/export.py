"""``macsc export RUN_OR_CKPT DIR``: a trained model as a folder to share, with no pickle in it
(:mod:`macsc.inference.export`); load it with ``MaCSC.from_pretrained(DIR)`` or run it with
``macsc infer DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc export",
        description="Export a MaCSC checkpoint to a folder: the weights as safetensors, the "
        "backbone's config and tokenizer, macsc.json (what rebuilds the model) and a model "
        "card (README.md).",
    )
    parser.add_argument(
        "target",
        metavar="RUN_OR_CKPT",
        help="a run folder (its checkpoints/best.ckpt, else last.ckpt) or a .ckpt file",
    )
    parser.add_argument("folder", metavar="DIR", help="the folder to write")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the config the model was trained with, for its data options (default: the run "
        "folder's config.yaml)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR when it exists and is not empty"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds Python objects (unpickling can run code from it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from macsc.inference.export import export_checkpoint

    done = export_checkpoint(
        args.target,
        args.folder,
        config=args.config,
        overwrite=args.overwrite,
        trust_checkpoint=args.trust_checkpoint,
    )
    print(f"checkpoint: {done.checkpoint} ({done.how})")
    print(f"exported to {done.folder}: {', '.join(done.files)} ({done.tensors} tensors)")
    return 0
