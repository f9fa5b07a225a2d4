"""``macsc prototypes``: fill the prototype cache ahead of training (the data module's
``prepare_data``, which stores the tokenised splits too), or check its files."""

from __future__ import annotations

import sys
from pathlib import Path


def main(args: list[str]) -> int:
    """``macsc prototypes --config FILE [--verify]``: build the model's extractors and fill the
    cache; with ``--verify``, then read every file the config uses against its full checksum.
    ``macsc prototypes --verify [--cache_dir DIR]``: check every file in the cache folder."""
    verify = "--verify" in args
    args = [arg for arg in args if arg != "--verify"]
    if verify and not any(arg == "--config" or arg.startswith("--config=") for arg in args):
        return report_cache_files(_cache_files_in(args))
    import warnings

    from macsc.cli.lightning import run_lightning

    with warnings.catch_warnings():  # the arguments come from our command line, not Python
        warnings.filterwarnings(
            "ignore", message=".*args parameter is intended to run from within Python"
        )
        cli = run_lightning(args, run=False)
    cli.datamodule.prepare_data()
    tables = cli.datamodule.prototype_tables()
    print(cache_summary(cli.datamodule.cache_dir, tables))
    if not verify:
        return 0
    return report_cache_files([t.path for ts in tables.values() for t in ts if t.path])


def cache_summary(cache_dir, tables: dict) -> str:
    """What ``macsc prototypes`` did: per modality, the cache files read (hits) and built
    (misses), the size written, and the folder -- or that nothing was stored."""
    from macsc.prototypes import resolve_cache_dir

    folder = resolve_cache_dir(cache_dir)
    lines = []
    written = 0
    for modality, entries in tables.items():
        built = [t for t in entries if t.built]
        size = sum(t.path.stat().st_size for t in built if t.path is not None)
        written += size
        lines.append(
            f"  {modality}: {len(entries) - len(built)} read from the cache, {len(built)} "
            f"extracted" + (f" ({size / 2**20:.1f} MiB written)" if size else "")
        )
    if folder is None:
        head = "prototypes extracted but not stored: the cache is off (data cache_dir: false)"
    elif not tables:
        head = f"nothing to cache (no frozen prototype extractor); cache folder {folder}"
    else:
        head = f"prototype cache {folder}: {written / 2**20:.1f} MiB written"
    return "\n".join([head, *lines])


def _cache_files_in(args: list[str]) -> list[Path]:
    """The files of ``--cache_dir DIR`` (default: the cache folder), the only other option."""
    from macsc.errors import ConfigError
    from macsc.prototypes import cache_files, resolve_cache_dir

    folder = None
    if len(args) == 2 and args[0] == "--cache_dir":
        folder = args[1]
    elif len(args) == 1 and args[0].startswith("--cache_dir="):
        folder = args[0].split("=", 1)[1]
    elif args:
        raise ConfigError(
            f"macsc prototypes --verify takes --config FILE or --cache_dir DIR, not {args}"
        )
    path = resolve_cache_dir(folder)
    if not path.is_dir():
        raise ConfigError(f"the prototype cache folder {str(path)!r} does not exist")
    return cache_files(path)


def report_cache_files(paths: list[Path]) -> int:
    """Check each file in full, print one line each and a total; 1 if one is damaged."""
    from macsc.prototypes import verify_cache_file

    counts = {"ok": 0, "damaged": 0, "stale": 0}
    for path in paths:
        check = verify_cache_file(path)
        counts[check.status] += 1
        if check.status == "ok":
            print(f"ok       {path} ({check.texts} texts, {check.nbytes / 1e9:.2f} GB)")
        else:
            print(f"{check.status:<8} {path}: {check.reason}")
    print(
        f"{len(paths)} prototype cache files checked: {counts['ok']} ok, "
        f"{counts['damaged']} damaged, {counts['stale']} stale"
    )
    if counts["damaged"]:
        print(
            "delete each damaged file; the next `macsc prototypes --config FILE` or run that "
            "uses it rebuilds it",
            file=sys.stderr,
        )
    return 1 if counts["damaged"] else 0
