"""``macsc weights RUN_OR_CKPT``: the learned modality weights ρ and π_z of a checkpoint
(:mod:`macsc.analysis.weights`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from macsc.analysis.weights import (
    default_out,
    format_weights,
    load_checkpoint,
    read_weights,
    resolve_checkpoint,
    write_figures,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macsc weights",
        description="The modality weights rho and pi_z of a MaCSC checkpoint, printed and "
        "drawn as PNGs.",
    )
    parser.add_argument("target", metavar="RUN_OR_CKPT", help="a run folder or a .ckpt file")
    parser.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: <run>/weights)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds Python objects (unpickling can run code from it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path, how = resolve_checkpoint(args.target)
    checkpoint = load_checkpoint(path, trust=args.trust_checkpoint)
    weights = read_weights(checkpoint, source=f"checkpoint {str(path)!r}")
    where = [f"step {checkpoint['global_step']}"] if "global_step" in checkpoint else []
    if "epoch" in checkpoint:
        where.append(f"epoch {checkpoint['epoch']}")
    print(f"checkpoint: {path} ({how}{'; ' + ', '.join(where) if where else ''})")
    print(format_weights(weights))
    folder = Path(args.out) if args.out else default_out(path)
    for written in write_figures(weights, folder, path.stem):
        print(f"wrote {written}")
    return 0
