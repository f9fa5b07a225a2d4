"""The prototype cache at MNLI scale (issue 12): size on disk, build time, open time, the time to
read a random batch, and the memory of 8 reader processes mapping it at once.

Shape: MNLI's train split, 392,702 pairs over ~130,000 distinct premises (about three hypotheses
each) and as many hypotheses, so ~523,000 distinct segments; prototypes from three Gaussian
sources of the paper's widths (512, 1024 and 512, as CLIP, AudioCLIP and CLIP-ViP give), k = 8,
stored with the default ``prototype_dtype`` (float16 here). The texts are synthetic (no
download) and the split is cut to ``scale`` of that, keeping its structure. Two scales are built
one after the other (the larger one is kept for the rest), which checks that the size grows
linearly; the full-scale size is extrapolated from the larger. ``--full`` builds the full size
(~17 GB of disk) and measures everything there.

- build: both segments' tables for the three sources, through :func:`macsc.prototypes.
  prototype_table` as the data module calls it (Gaussian extraction included: most of it here);
- open: what a DDP rank does before its first step: deduplicate and digest both segments' texts
  (:func:`macsc.prototypes.index_texts`, linear in the texts: extrapolated to full size) and open
  the six files (header, size, key and the sampled checksum; constant per file); median of 5;
- batch read: :func:`tasks.collate.gather_prototypes` of 32 random pairs, both segments, the three
  sources (what the collator does), median of 300, with the files in the page cache (warm; the
  first epoch on a node reads each row from disk instead);
- 8 readers: 8 processes each open the tables and read a value from every page of them, then
  wait; their proportional set sizes (``Pss`` of ``/proc/<pid>/smaps_rollup``, which divides a
  shared page among its mappers) are summed and set against their resident sets (``Rss``, each
  counting every page it maps): the cache's pages are shared, not copied, when the sum of PSS
  stays near one copy of the files. The same two sums over the cache files' mappings alone
  (``/proc/<pid>/smaps``) isolate the cache from the interpreter's own memory.

Targets: <= 18 GB at full scale, open <= 1 s per rank, batch read <= 2 ms.

    python benchmarks/cache_scale.py [--scales 0.01 0.02] [--folder DIR]
    python benchmarks/cache_scale.py --full --folder DIR_WITH_20_GB_FREE
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's ``tasks``

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAIRS = 392_702
PREMISES = 130_000
SOURCES = {
    "image": {"kind": "gaussian", "dim": 512, "k": 8},
    "audio": {"kind": "gaussian", "dim": 1024, "k": 8, "seed": 1},
    "video": {"kind": "gaussian", "dim": 512, "k": 8, "seed": 2},
}
READERS = 8
BATCH = 32
WORDS = (
    "the a of and to in is was he for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time"
).split()


def mnli_like(scale: float) -> tuple[list[str], list[str]]:
    """The two segment columns of ``scale`` of MNLI's train split: premises (each repeated for
    about three consecutive pairs) and distinct hypotheses; deterministic."""
    pairs, premises = max(1, round(PAIRS * scale)), max(1, round(PREMISES * scale))
    generator = np.random.default_rng(0)

    def sentences(count: int, low: int, high: int, tag: str) -> list[str]:
        lengths = generator.integers(low, high, count)
        words = generator.integers(len(WORDS), size=int(lengths.sum()))
        ends = np.cumsum(lengths)
        return [
            " ".join(WORDS[w] for w in words[end - length : end]) + f" ({tag} {i})."
            for i, (end, length) in enumerate(zip(ends, lengths, strict=True))
        ]

    distinct = sentences(premises, 15, 40, "premise")
    first = [distinct[i * premises // pairs] for i in range(pairs)]
    return first, sentences(pairs, 6, 16, "hypothesis")


def extractors() -> dict:
    from macsc.prototypes import build_extractor

    return {name: build_extractor(**spec) for name, spec in SOURCES.items()}


def open_tables(segments: list[list[str]], folder: Path) -> tuple[dict, float]:
    """modality -> one table per segment, as ``MaCSCDataModule._prototype_tables`` builds or
    reads them; and the seconds spent deduplicating and digesting the texts."""
    from macsc.prototypes import index_texts, prototype_table

    start = time.perf_counter()
    indexed = [index_texts(texts) for texts in segments]
    texts_seconds = time.perf_counter() - start
    tables = {
        name: [
            prototype_table(extractor, texts, progress=False, cache_dir=folder, device="cpu")
            for texts in indexed
        ]
        for name, extractor in extractors().items()
    }
    return tables, texts_seconds


def batch_seconds(tables: dict, pairs: int, count: int, seed: int = 0) -> list[float]:
    """Seconds to gather each of ``count`` random batches (all sources, both segments), into
    pinned memory where CUDA is, as the collator does."""
    from tasks.collate import gather_prototypes

    generator = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    times = []
    for _ in range(count):
        indices = torch.randint(pairs, (BATCH,), generator=generator)
        start = time.perf_counter()
        for segments in tables.values():
            gather_prototypes(segments, indices, pin)
        times.append(time.perf_counter() - start)
    return times


def touch_every_page(tables: dict) -> float:
    """Read one value of every 4 KiB page of every table (maps them all into this process)."""
    total = 0.0
    for segments in tables.values():
        for table in segments:
            raw = table.features.view(-1).view(torch.uint8)
            total += float(raw[::4096].sum()) + float(table.mask.view(torch.uint8)[::4096].sum())
    return total


def reader(folder: Path, scale: float) -> None:
    """A reader process: open, touch every page, report ready, wait for the parent."""
    tables, _ = open_tables(list(mnli_like(scale)), folder)
    touch_every_page(tables)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.read()  # until the parent has read our memory and closes the pipe


def _kib(text: str, field: str) -> int:
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(field + ":"))


def _mapping_kib(pid: int, folder: Path) -> tuple[int, int]:
    """``(Rss, Pss)`` in KiB of the mappings of files in ``folder`` of process ``pid``."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(str(folder))
            elif inside and fields[0] == "Rss:":
                rss += int(fields[1])
            elif inside and fields[0] == "Pss:":
                pss += int(fields[1])
    return rss, pss


def reader_memory(folder: Path, scale: float) -> dict[str, float] | None:
    """Sums over :data:`READERS` reader processes, in bytes (None without /proc)."""
    if not Path("/proc/self/smaps_rollup").exists():
        return None
    command = [
        sys.executable,
        __file__,
        "--reader",
        "--folder",
        str(folder),
        "--scales",
        str(scale),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(READERS)
    ]
    try:
        for process in processes:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"reader {process.pid} ended before it was ready")
        totals = dict.fromkeys(("rss", "pss", "cache_rss", "cache_pss"), 0)
        for process in processes:
            rollup = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
            totals["rss"] += _kib(rollup, "Rss") * 1024
            totals["pss"] += _kib(rollup, "Pss") * 1024
            rss, pss = _mapping_kib(process.pid, folder)
            totals["cache_rss"] += rss * 1024
            totals["cache_pss"] += pss * 1024
    finally:
        for process in processes:
            process.stdin.close()
        for process in processes:
            process.wait(timeout=60)
    return totals


def build(folder: Path, scale: float) -> dict[str, float]:
    """Build the cache of ``scale`` in an empty ``folder``: sizes and seconds."""
    segments = list(mnli_like(scale))
    start = time.perf_counter()
    open_tables(segments, folder)
    seconds = time.perf_counter() - start
    distinct = len(set(segments[0])) + len(set(segments[1]))
    size = sum(path.stat().st_size for path in folder.glob("*.protos"))
    return {"scale": scale, "segments": distinct, "bytes": size, "seconds": seconds}


def measure_open(folder: Path, scale: float, repeats: int = 5) -> dict[str, float]:
    segments = list(mnli_like(scale))
    totals, texts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _, texts_seconds = open_tables(segments, folder)
        totals.append(time.perf_counter() - start)
        texts.append(texts_seconds)
    total, text = statistics.median(totals), statistics.median(texts)
    return {"total": total, "texts": text, "files": total - text}


def run(scales: list[float], folder: Path | None = None) -> dict:
    """Build at each scale (smallest first; each replaces the last), then measure the largest;
    in a temporary folder (inside ``folder`` when given), deleted at the end."""
    parent = Path(tempfile.mkdtemp(prefix="macsc-cache-scale-", dir=folder))
    folder = parent / "cache"
    try:
        builds = []
        for scale in sorted(scales):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            builds.append(build(folder, scale))
        largest = builds[-1]
        scale = largest["scale"]
        opened = measure_open(folder, scale)
        tables, _ = open_tables(list(mnli_like(scale)), folder)
        pairs = len(tables["image"][0])
        batch_seconds(tables, pairs, 20)  # warm-up
        warm = statistics.median(batch_seconds(tables, pairs, 300, seed=1))
        del tables
        memory = reader_memory(folder, scale)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return {"builds": builds, "open": opened, "warm": warm, "memory": memory}


def summary(result: dict) -> str:
    builds, opened, memory = result["builds"], result["open"], result["memory"]
    largest = builds[-1]
    per_segment = [b["bytes"] / b["segments"] for b in builds]
    full_segments = PREMISES + PAIRS
    full = largest["bytes"] / largest["segments"] * full_segments
    scale = largest["scale"]
    if scale >= 1.0:
        sized = f"measured: {full_segments:,} segments"
        opening = f"open {opened['total']:.2f} s per rank"
    else:
        scales = " and ".join(f"{b['scale']:g}" for b in builds)
        bytes_per = " / ".join(f"{p / 1e3:.2f}" for p in per_segment)
        sized = f"linear from {scales} of MNLI: {bytes_per} kB a segment"
        at_full = opened["texts"] / scale + opened["files"]
        opening = (
            f"open {opened['total'] * 1e3:.0f} ms per rank at {scale:g} (6 files "
            f"{opened['files'] * 1e3:.0f} ms, texts {opened['texts'] * 1e3:.0f} ms), "
            f"{at_full:.2f} s at full size"
        )
    build_times = ", ".join(f"{b['seconds']:.1f} s at {b['scale']:g}" for b in builds)
    line = (
        f"prototype cache at MNLI scale: {full / 1e9:.1f} GB ({sized}; target <= 18 GB); "
        f"build {build_times} ({largest['bytes'] / 1e9 / largest['seconds']:.2f} GB/s, "
        f"Gaussian extraction included); {opening} (target <= 1 s); batch read "
        f"{result['warm'] * 1e3:.2f} ms (batch {BATCH}, 2 segments x 3 sources, page cache "
        "warm; target <= 2 ms)"
    )
    if memory is not None:
        files = largest["bytes"]
        line += (
            f"; {READERS} readers: sum of PSS {memory['pss'] / 1e9:.2f} GB vs sum of RSS "
            f"{memory['rss'] / 1e9:.2f} GB; cache mappings: PSS {memory['cache_pss'] / 1e9:.2f} GB"
            f" = {memory['cache_pss'] / files:.2f}x the files, RSS {memory['cache_rss'] / files:.2f}x"
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.02])
    parser.add_argument("--full", action="store_true", help="build MNLI's full size (~17 GB)")
    parser.add_argument("--folder", type=Path, help="where to put the temporary cache folder")
    parser.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        reader(args.folder, args.scales[0])
        return
    print(summary(run([1.0] if args.full else args.scales, args.folder)))


if __name__ == "__main__":
    main()
