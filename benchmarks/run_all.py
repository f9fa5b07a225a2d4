"""``make bench``: every benchmark of issues 3, 6, 10, 12 and 20, one line each, in one process (the
memory measurements start their own fresh processes), ending with the line
``step overhead vs text-only: X.XXx time, Y.YYx memory`` (MiniLM).

Sizes are cut to keep the whole run short on two CPU cores (the BERT-base step, ~15 s a step
on an idle machine, is most of it); each line says what it measured. Run a benchmark's own
script for the full size or other options: ``extraction.py``, ``data_path.py``,
``cache_scale.py``, ``startup.py``, ``generation.py``, ``ops.py``, ``step_overhead.py`` (and
``gpu.sh`` on a GPU).
"""

from __future__ import annotations

import time

import cache_scale
import common
import data_path
import extraction
import generation
import ops
import startup
import step_overhead


def main() -> None:
    common.quiet()
    start = time.perf_counter()
    for line in extraction.run(
        texts=32, batch_size=32, repeats=3, demo_fraction=0.1, validation=False
    ):
        print(line, flush=True)
    print(data_path.run(pairs=10)["line"], flush=True)
    print(cache_scale.summary(cache_scale.run([0.01, 0.02])), flush=True)
    for line in startup.summary(startup.run(scale=1.0)):  # full size: ~1.5 min
        print(line, flush=True)
    # one thread: two threads per process decode many times slower on a shared machine
    # (generation.py's docstring); beam search on batches of 8 concept sets instead of 32
    generated = generation.run(pairs=6, beam_batches=3, beam_batch=8, threads=1)
    print(generated["detail"], flush=True)
    for line in generation.summary(generated):
        print(line, flush=True)
    operators = ops.run()  # BERT-base shape, batch 4 x 32: ~1 min
    for line in [*ops.detail(operators), ops.summary(operators)]:
        print(line, flush=True)
    bert = step_overhead.run(pairs=4, memory_steps=2, shape="bert-base", warmup=1)
    print(bert["detail"], flush=True)
    print(step_overhead.summary(bert), flush=True)
    result = step_overhead.run(pairs=20)
    print(f"{result['detail']} [make bench took {time.perf_counter() - start:.0f} s]")
    print(step_overhead.summary(result))


if __name__ == "__main__":
    main()
