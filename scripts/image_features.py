#!/usr/bin/env python
"""Encode retrieved images per example with open_clip's image tower, for the "+Image" rows
(paper Tables 2 and 3; SPEC 14). Writes the features folder the ``image_features`` prototype
source reads (:mod:`macsc.prototypes.image_features`: ``features.npy``, ``ids.json``,
``mask.npy``).

    python scripts/image_features.py IMAGES OUT [--ids FILE] [--images-per-example 5]
        [--model ViT-B-32] [--pretrained openai | --checkpoint FILE] [--device cuda]

IMAGES holds one folder per example, named by the example's id (GLUE ``idx``, the SQuAD question
id, the CommonGen concept-set id such as ``dog#frisbee#catch``: the ``id`` of
``predictions-<split>.jsonl``), with that example's retrieved images inside (.jpg, .jpeg, .png,
.webp, .bmp, .gif); the first ``--images-per-example`` in file-name order are encoded with
``model.encode_image`` (the projected image embedding, not normalised, as the text prototypes
are not). An example with fewer images pads with masked rows. ``--ids FILE`` (one id per line)
lists every example of the split: one without a folder then gets a row with no image (all
masked) instead of being absent, which the training run would report by its id.

There is no web search here: retrieve the images yourself (the paper used Bing Image Search with
each example's text as the query) and lay them out as above.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from macsc.prototypes.image_features import write_image_features  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def example_folders(images: Path, ids: list[str] | None) -> list[tuple[str, Path | None]]:
    """(id, folder or None) for every example: the subfolders of ``images`` in sorted order, or
    the ``ids`` given in their order (None where an id has no folder)."""
    if ids is None:
        return [(path.name, path) for path in sorted(images.iterdir()) if path.is_dir()]
    return [(name, images / name if (images / name).is_dir() else None) for name in ids]


def image_files(folder: Path | None, limit: int) -> list[Path]:
    if folder is None:
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit]


def load_model(name: str, pretrained: str | None, checkpoint: str | None, device: str):
    """open_clip's model and its image preprocessing; ``checkpoint`` (a local weights file)
    stands in for the ``pretrained`` tag's download."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=checkpoint or pretrained, device=device
    )
    return model.eval(), preprocess


@torch.no_grad()
def encode_examples(
    model,
    preprocess,
    examples: list[tuple[str, Path | None]],
    per_example: int,
    batch_size: int,
    device: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, per_example, d)`` float32 features and ``(N, per_example)`` mask."""
    from PIL import Image

    jobs = [
        (row, slot, path)
        for row, (_, folder) in enumerate(examples)
        for slot, path in enumerate(image_files(folder, per_example))
    ]
    width = None
    features = mask = None
    for start in range(0, max(len(jobs), 1), batch_size):
        part = jobs[start : start + batch_size]
        if not part:
            break
        pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for _, _, path in part])
        encoded = model.encode_image(pixels.to(device)).float().cpu().numpy()
        if width is None:
            width = encoded.shape[1]
            features = np.zeros((len(examples), per_example, width), dtype=np.float32)
            mask = np.zeros((len(examples), per_example), dtype=bool)
        for (row, slot, _), vector in zip(part, encoded, strict=True):
            features[row, slot] = vector
            mask[row, slot] = True
    if features is None:
        raise SystemExit("image_features.py: error: no image found in any example folder")
    return features, mask


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Encode retrieved images per example with open_clip's image tower."
    )
    parser.add_argument("images", type=Path, help="a folder with one subfolder per example id")
    parser.add_argument("out", type=Path, help="the features folder to write (one per split)")
    parser.add_argument("--ids", type=Path, help="every example id of the split, one a line")
    parser.add_argument("--images-per-example", type=int, default=5)
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip model (default ViT-B-32)")
    parser.add_argument("--pretrained", default="openai", help="its pretrained tag")
    parser.add_argument("--checkpoint", help="a local weights file instead of the tag's download")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="how features are stored"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.images.is_dir():
        raise SystemExit(f"image_features.py: error: {args.images} is not a folder")
    if args.images_per_example < 1:
        raise SystemExit("image_features.py: error: --images-per-example must be at least 1")
    ids = None
    if args.ids is not None:
        ids = [line.strip() for line in args.ids.read_text(encoding="utf-8").splitlines()]
        ids = [name for name in ids if name]
    examples = example_folders(args.images, ids)
    if not examples:
        raise SystemExit(f"image_features.py: error: {args.images} holds no example folder")
    model, preprocess = load_model(args.model, args.pretrained, args.checkpoint, args.device)
    features, mask = encode_examples(
        model, preprocess, examples, args.images_per_example, args.batch_size, args.device
    )
    write_image_features(
        args.out, [name for name, _ in examples], features.astype(args.dtype), mask
    )
    without = int((~mask.any(axis=1)).sum())
    print(
        f"wrote {args.out}: {len(examples)} examples x {args.images_per_example} images x "
        f"{features.shape[2]} ({args.dtype}); {int(mask.sum())} images, {without} examples "
        "without any"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
