"""Step overhead: a MaCSC T+I+A+V training step against the text-only baseline's (issues 6, 12).

Two shapes (``--shape``):

- ``minilm`` (issue 6): both models on the real all-MiniLM-L6-v2, batch 32, GLUE-like sentences
  of 20-60 tokens padded to the longest in each batch. Targets: at most 1.15x the time and 1.25x
  the peak memory of the baseline.
- ``bert-base`` (issue 12, the paper's backbone): a BERT-base-sized model (``BertConfig()``,
  110M parameters, random weights, MiniLM's tokenizer), batch 32, every sequence 128 tokens
  (sentences of 128-160 tokens cut to ``max_length`` 128). Targets: at most 1.05x the time and
  1.10x the memory (the enhancers add ~9M parameters to 110M).

Both: prototypes of the paper's shapes read from a warm on-disk cache by the data module's
collator; the batches are collated once and kept in memory, so only the step is measured
(``data_path.py`` measures the loader).

Time. A full training step: forward, losses, backward, the AdamW step and the schedule step
of the model's own ``configure_optimizers`` (:class:`common.Trainee`). The two models alternate
step by step on the same batches (A B A B ...), in one process, after two warm-up steps each;
reported is the median over the pairs of the ratio of their step times. (Alternating single
steps cancels this machine's load swings far better than alternating whole Lightning fits; the
loop's own bookkeeping costs any model the same few milliseconds, and the per-step logging
that differs is measured in ``NOTES.md``.)

Memory. Each model in its own fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536``, so
glibc returns every freed block larger than 64 KiB to the system at once and the resident set
follows the live tensors (the CPU allocator keeps no cache). After imports and loading the
batches the process reads its resident set (``VmRSS``, the baseline), builds the model, resets
the peak (``echo 5 > /proc/self/clear_refs``, which drops the transient peak of loading the
weights) and trains three steps; the footprint is the peak (``VmHWM``) minus the baseline:
parameters, gradients, AdamW state and the step's activations. The ratio compares the two
footprints. Without ``clear_refs`` the peak since start (``ru_maxrss``) is used instead.

    python benchmarks/step_overhead.py [--shape minilm|bert-base] [--pairs 16] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import common
import torch

ORDER = ("macsc", "text")
#: sentence lengths in tokens (before ``max_length`` 128), the targets, the summary's label
SHAPES = {
    "minilm": {"tokens": (20, 60), "targets": (1.15, 1.25), "label": ""},
    "bert-base": {"tokens": (128, 160), "targets": (1.05, 1.10), "label": " (BERT-base shape)"},
}


def prepare_batches(folder: Path, count: int, tokens: tuple[int, int] = (20, 60)) -> list[dict]:
    """``count`` training batches of 32 (sentences of ``tokens`` tokens), collated with
    prototypes read from a warm cache; also saved to ``folder / "batches.pt"`` for the memory
    subprocesses."""
    files = common.write_glue_data(folder, 32 * count, tokens=tokens)
    cache = folder / "cache"
    common.prepared(files, cache)  # cold: fills the prototype cache
    data = common.prepared(files, cache)  # warm: memory-maps it
    batches = common.take(data.train_dataloader(), count)
    torch.save(batches, folder / "batches.pt")
    return batches


def time_steps(
    batches: list[dict], pairs: int, warmup: int = 2, backbone: str = common.BACKBONE
) -> dict[str, list[float]]:
    """Step seconds of each model, alternating step by step after ``warmup`` steps each."""
    trainees = {
        variant: common.Trainee(common.build_model(variant, backbone=backbone)) for variant in ORDER
    }
    return common.alternate_steps(trainees, batches, pairs, warmup)


def measure_memory(
    variant: str, batches_file: Path, steps: int, backbone: str = common.BACKBONE
) -> dict[str, float]:
    """Run in a fresh process: the footprint in MiB of training ``variant`` (module docstring)."""
    common.quiet()
    batches = torch.load(batches_file, weights_only=False)
    build = functools.partial(common.build_model, variant, backbone=backbone)
    return common.training_footprint(build, batches, steps)


def memory_in_subprocess(
    variant: str, batches_file: Path, steps: int, threads: int, backbone: str
) -> dict:
    arguments = ["--memory", variant, "--batches", str(batches_file), "--steps", str(steps)]
    arguments += ["--threads", str(threads), "--backbone", backbone]
    return common.footprint_in_subprocess(__file__, arguments, repr(variant))


def run(pairs: int = 16, memory_steps: int = 3, shape: str = "minilm", warmup: int = 2) -> dict:
    """Both measurements for ``shape`` (:data:`SHAPES`); returns the ratios and a one-line
    summary."""
    common.quiet()
    tokens = SHAPES[shape]["tokens"]
    time_target, memory_target = SHAPES[shape]["targets"]
    with tempfile.TemporaryDirectory() as folder:
        backbone = common.BACKBONE
        if shape == "bert-base":
            backbone = common.write_bert_base(Path(folder) / "bert-base")
        batches = prepare_batches(Path(folder), 4, tokens)
        lengths = [int(b["attention_mask"].shape[1]) for b in batches]
        times = time_steps(batches, pairs, warmup, backbone)
        batches_file = Path(folder) / "batches.pt"
        memory = {
            variant: memory_in_subprocess(
                variant, batches_file, memory_steps, torch.get_num_threads(), backbone
            )
            for variant in ORDER
        }
    ratios = [a / b for a, b in zip(times["macsc"], times["text"], strict=True)]
    time_ratio = common.median(ratios)
    memory_ratio = memory["macsc"]["footprint_mib"] / memory["text"]["footprint_mib"]
    detail = (
        f"step time{SHAPES[shape]['label']} macsc {common.median(times['macsc']):.2f} s vs text "
        f"{common.median(times['text']):.2f} s (median ratio of {pairs} alternating pairs of "
        f"steps, quartiles {common.quartiles(ratios)}; batch 32, padded lengths {lengths}, "
        f"{torch.get_num_threads()} threads); training footprint macsc "
        f"{memory['macsc']['footprint_mib']:.0f} MiB vs text {memory['text']['footprint_mib']:.0f}"
        f" MiB (targets <= {time_target:.2f}x time, <= {memory_target:.2f}x memory)"
    )
    return {
        "time": time_ratio,
        "memory": memory_ratio,
        "detail": detail,
        "times": times,
        "shape": shape,
    }


def summary(result: dict) -> str:
    label = SHAPES[result.get("shape", "minilm")]["label"]
    return (
        f"step overhead vs text-only{label}: {result['time']:.2f}x time, "
        f"{result['memory']:.2f}x memory"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="minilm")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", choices=ORDER, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default=common.BACKBONE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.batches, args.steps, args.backbone)))
        return
    result = run(args.pairs, shape=args.shape, warmup=args.warmup)
    print(result["detail"])
    print(summary(result))


if __name__ == "__main__":
    main()
