"""The data path: training steps per second with real data loading against the same batches
already in memory (issue 6). Target: ratio >= 0.9, the loader is not the bottleneck.

Real loading is the data module's own train loader as ``macsc fit`` uses it: the split tokenised
once at setup, each batch padded to its longest sequence, the prototypes of its examples
gathered from the memory-mapped cache by the collator, ``num_workers: 0`` (the loader runs in the
training process: the worst case). In memory: the same batches in the same order, collated
beforehand. One MaCSC T+I+A+V model (:mod:`common`) trains on both alternately, step by step
(fetch and step, then step, ...), after two warm-up steps; reported is the median over the
pairs of (step time) / (fetch + step time), i.e. the steps/s ratio, and the collator's own time
per batch with and without ``group_by_length`` (which also cuts the padding).

    python benchmarks/data_path.py [--pairs 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common


def loader_cost(data, batches: int) -> tuple[float, float]:
    """Seconds per batch of the train loader alone, and the fraction of padding positions."""
    loader = data.train_dataloader()
    start = time.perf_counter()
    taken = common.take(loader, batches)
    seconds = (time.perf_counter() - start) / len(taken)
    padding = sum(int((b["attention_mask"] == 0).sum()) for b in taken)
    return seconds, padding / sum(b["attention_mask"].numel() for b in taken)


def run(pairs: int = 8, examples: int = 512, warmup: int = 2) -> dict:
    common.quiet()
    with tempfile.TemporaryDirectory() as folder:
        files = common.write_glue_data(Path(folder), examples)
        cache = Path(folder) / "cache"
        common.prepared(files, cache)  # cold: fills the prototype cache
        data = common.prepared(files, cache)  # warm: memory-maps it
        grouped = common.prepared(files, cache, group_by_length=True)
        batches = common.take(data.train_dataloader(), warmup + pairs)
        trainee = common.Trainee(common.build_model("macsc"))
        loader = iter(data.train_dataloader())  # the same batches, in the same order
        ratios, steps = [], []
        for index in range(warmup + pairs):
            loaded = common.timed(lambda: trainee.step(next(loader)))
            in_memory = common.timed(lambda index=index: trainee.step(batches[index]))
            if index >= warmup:
                ratios.append(in_memory / loaded)
                steps.append(in_memory)
        count = examples // 32
        plain_seconds, plain_padding = loader_cost(data, count)
        grouped_seconds, grouped_padding = loader_cost(grouped, count)
    ratio = common.median(ratios)
    line = (
        f"data path: {ratio:.2f}x steps/s with real loading vs batches in memory (median of "
        f"{pairs} alternating pairs of steps; loader {plain_seconds * 1e3:.1f} ms/batch, "
        f"{plain_padding:.0%} padding; with group_by_length {grouped_seconds * 1e3:.1f} ms/batch, "
        f"{grouped_padding:.0%} padding; step {common.median(steps):.2f} s; target >= 0.9)"
    )
    return {"ratio": ratio, "line": line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    print(run(args.pairs)["line"])


if __name__ == "__main__":
    main()
