"""Mutation testing of the method's core: ``make mutation`` (docs/mutation-testing.md).

mutmut 3, configured in ``pyproject.toml`` (``[tool.mutmut]``: the files it mutates and the fast
tests it may run), mutates the functions named in :data:`SCOPE`; each mutant runs only those
selected tests that executed its function, and is killed when one of them fails. The score is
the share of killed mutants among the non-equivalent ones: every survivor is either listed in
``scripts/mutation_equivalent.toml`` (the change, and why it cannot change behaviour) or
printed with its diff as a gap in the tests.

    python scripts/mutation.py [--jobs 2]      # a fresh run (~20 min on 2 cores), then the report
    python scripts/mutation.py --report        # the report of the last run again
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "scripts" / "mutation_equivalent.toml"
TARGET = 0.90


@dataclass(frozen=True)
class Part:
    """Functions of one file in scope (mutmut names: ``x_<function>``, ``xǁ<Class>ǁ<method>``,
    ``*`` for the whole file), and the test files relevant to them: a mutant runs those of its
    part's tests that executed its function."""

    functions: tuple[str, ...]
    tests: tuple[str, ...]


MATH = "tests/method/test_math.py"
EDGES = "tests/method/test_allocation_edges.py"
CALIBRATION = "tests/method/test_calibration_reference.py"
CALIBRATION_MODULE = "tests/method/test_calibration_module.py"
ENHANCER = "tests/method/test_enhancement_eq2.py"
ENHANCER_MODES = "tests/method/test_enhancer_modes.py"
BATCHED = "tests/method/test_batched_enhancers.py"
OBJECTIVE = "tests/method/test_objective.py"
WIRING = "tests/method/test_objective_wiring.py"
MODEL = "tests/training/test_module.py"
POOLED = "tests/method/test_pooled_heads.py"
SPAN = "tests/method/test_span_head.py"
POSTPROCESS = "tests/squad/test_postprocess.py"
FEATURES = "tests/squad/test_features.py"
SQUAD_EVAL = "tests/squad/test_metric.py"
SQUAD_EDGES = "tests/squad/test_edges.py"
SELECTION = "tests/prototypes/test_selection.py"
CACHE_KEY = "tests/prototypes/test_cache_key_options.py"

MODEL_LEVEL = (OBJECTIVE, WIRING, MODEL)
HEADS = (*MODEL_LEVEL, POOLED, SPAN, SQUAD_EDGES)
IDENTITY = Part(("xǁ*ǁidentity",), (CACHE_KEY,))
SCOPE: dict[str, Part] = {
    "macsc/method/allocation.py": Part(("*",), (MATH, EDGES, CALIBRATION, *MODEL_LEVEL, POOLED)),
    "macsc/method/losses.py": Part(("*",), (MATH, EDGES, CALIBRATION, *HEADS)),
    "macsc/method/calibration.py": Part(
        ("*",), (MATH, CALIBRATION, CALIBRATION_MODULE, *MODEL_LEVEL)
    ),
    "macsc/method/fusion.py": Part(("*",), (ENHANCER, ENHANCER_MODES, BATCHED, *MODEL_LEVEL)),
    "macsc/method/attention.py": Part(("*",), (ENHANCER, ENHANCER_MODES, BATCHED, *MODEL_LEVEL)),
    "macsc/method/stacked.py": Part(("*",), (ENHANCER, ENHANCER_MODES, BATCHED, *HEADS)),
    "macsc/method/objective.py": Part(("*",), MODEL_LEVEL),
    "macsc/method/network.py": Part(("xǁBranchRepresentationsǁ*",), (*MODEL_LEVEL, SQUAD_EDGES)),
    "macsc/method/heads/base.py": Part(("*",), HEADS),
    "macsc/method/heads/classification.py": Part(("*",), HEADS),
    "macsc/method/heads/span.py": Part(("*",), HEADS),
    "macsc/method/heads/records.py": Part(("*",), HEADS),
    "macsc/squad/features.py": Part(("*",), (POSTPROCESS, FEATURES, SPAN, SQUAD_EDGES)),
    "macsc/squad/postprocess.py": Part(("*",), (POSTPROCESS, FEATURES, SPAN, SQUAD_EDGES)),
    # the scoring, not the command line, the reading of files or the plots around it
    "macsc/squad/metric.py": Part(
        tuple(
            f"x_{name}"
            for name in (
                "normalize_answer",
                "answer_tokens",
                "exact_score",
                "f1_score",
                "missing_ids",
                "score_v1",
                "evaluate_v1",
                "raw_scores_v2",
                "apply_na_threshold",
                "_score_summary",
                "best_threshold",
                "best_thresholds",
                "precision_recall_curve",
                "_v2_inputs",
                "score_v2",
                "precision_recall_curves",
                "evaluate_v2",
            )
        ),
        (SQUAD_EVAL, POSTPROCESS, SPAN, SQUAD_EDGES),
    ),
    "macsc/prototypes/selection.py": Part(("*",), (SELECTION,)),
    "macsc/prototypes/windowed.py": Part(("*",), (SELECTION, CACHE_KEY)),
    # the cache key and what goes into it, not the storage around it
    "macsc/prototypes/cache.py": Part(
        ("x_cache_key", "x_index_texts", "x_storage_dtype"),
        (CACHE_KEY, "tests/prototypes/test_cache.py"),
    ),
    "macsc/prototypes/base.py": Part(
        ("xǁ*ǁidentity", "x_build_extractor", "x__options_of"), (CACHE_KEY, SELECTION)
    ),
    "macsc/prototypes/clip_text.py": Part(("xǁ*ǁidentity", "x_tokenizer_identity"), (CACHE_KEY,)),
    "macsc/prototypes/hf_source.py": Part(("xǁ*ǁidentity", "x__weights_identity"), (CACHE_KEY,)),
    "macsc/prototypes/open_clip_source.py": IDENTITY,
    "macsc/prototypes/audioclip.py": IDENTITY,
    "macsc/prototypes/clip_vip.py": IDENTITY,
}


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def scope_globs() -> list[str]:
    """mutmut mutant-name patterns of everything in :data:`SCOPE`."""
    return [
        f"{module_of(path)}.{name}__mutmut_*"
        for path, part in SCOPE.items()
        for name in part.functions
    ]


def part_of(mutant: str) -> Part | None:
    """The part of :data:`SCOPE` a mutant belongs to (None: out of scope)."""
    for path, part in SCOPE.items():
        for name in part.functions:
            if fnmatch.fnmatchcase(mutant, f"{module_of(path)}.{name}__mutmut_*"):
                return part
    return None


def in_scope(mutant: str) -> bool:
    return part_of(mutant) is not None


def pytest_collection_modifyitems(config, items) -> None:
    """As a pytest plugin (``-p mutation`` in ``[tool.mutmut]``): a mutant runs only the tests
    of its part of :data:`SCOPE`; mutmut itself picks those that executed its function."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    part = part_of(mutant) if "__mutmut_" in mutant else None
    if part is None:
        return
    relevant = [item for item in items if item.nodeid.split("::")[0] in part.tests]
    if len(relevant) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in relevant])
        items[:] = relevant


def run_mutmut(jobs: int, log: Path) -> float:
    """A fresh mutmut run over :data:`SCOPE`; returns its wall time in seconds."""
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    log.parent.mkdir()
    models = tempfile.mkdtemp(prefix="macsc-mutation-models-")
    env = {
        **os.environ,
        # one thread per mutant process: ``jobs`` processes share the cores
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
        # thousands of short test sessions share the tiny models (tests/conftest.py)
        "MACSC_TEST_MODELS": models,
    }
    # mutmut puts the mutated copy first on the path itself; this folder holds the plugin
    env["PYTHONPATH"] = str(ROOT / "scripts")
    command = [str(Path(sys.executable).parent / "mutmut"), "run", f"--max-children={jobs}"]
    start = time.monotonic()
    try:
        with open(log, "w", encoding="utf-8") as output:
            subprocess.run([*command, *scope_globs()], cwd=ROOT, env=env, stdout=output, check=True)
    finally:
        shutil.rmtree(models, ignore_errors=True)
    return time.monotonic() - start


def results() -> dict[str, tuple[str, str]]:
    """In-scope mutant name -> (status, mutated file), from mutmut's result files."""
    from mutmut.stats import status_by_exit_code

    found = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ROOT / "mutants")).removesuffix(".meta")
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if in_scope(name):
                found[name] = (status_by_exit_code[code], source)
    return found


def change_of(name: str, source: str) -> tuple[str, str]:
    """(function, the changed lines) of a mutant: what the equivalence list matches on, so that
    an entry survives renumbering when other mutants of its function come or go."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=Path(source))
    lines = [
        line[0] + " ".join(line[1:].split())
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return name.rsplit("__mutmut_", 1)[0], "\n".join(lines)


def equivalent_entries() -> list[dict[str, str]]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: mutmut itself depends on toml there
        import toml as tomllib  # type: ignore[no-redef]
    return tomllib.loads(EQUIVALENT_FILE.read_text(encoding="utf-8")).get("equivalent", [])


def report(wall: float | None) -> int:
    os.chdir(ROOT)  # mutmut's diff reads mutants/ relative to the working folder
    found = results()
    if not found:
        print("mutation: no results under mutants/; run without --report first")
        return 2
    entries = equivalent_entries()
    matched: set[int] = set()
    counts: dict[str, Counter] = {}
    gaps = []
    for name, (status, source) in sorted(found.items()):
        count = counts.setdefault(source, Counter())
        count["mutants"] += 1
        if status in ("killed", "timeout", "caught by type check"):
            count["killed"] += 1
            continue
        function, change = change_of(name, source)
        entry = next(
            (
                i
                for i, e in enumerate(entries)
                if e["function"] == function and e["change"].strip() == change
            ),
            None,
        )
        if entry is not None and status == "survived":
            matched.add(entry)
            count["equivalent"] += 1
        else:
            count["gap"] += 1
            gaps.append((name, status, change))

    print(f"{'file':40} {'mutants':>8} {'killed':>7} {'equiv.':>7} {'gaps':>5} {'score':>7}")
    total = Counter()
    for source, count in sorted(counts.items()):
        total.update(count)
        print(f"{source:40} {count['mutants']:8} {count['killed']:7} {count['equivalent']:7} "
              f"{count['gap']:5} {score(count):7.1%}")  # fmt: skip
    print(f"{'all':40} {total['mutants']:8} {total['killed']:7} {total['equivalent']:7} "
          f"{total['gap']:5} {score(total):7.1%}")  # fmt: skip
    if wall is not None:
        print(f"wall time {wall / 60:.1f} min")
    for name, status, change in gaps:
        print(f"\n{status}: {name}\n{change}")
    stale = [e for i, e in enumerate(entries) if i not in matched]
    for entry in stale:
        print(f"\nstale entry of {EQUIVALENT_FILE.name} (no such surviving mutant): "
              f"{entry['function']}\n{entry['change']}")  # fmt: skip
    summary = {"wall_s": wall, "score": score(total), **total, "gaps": [g[0] for g in gaps]}
    (ROOT / "mutants" / "mutation-report.json").write_text(json.dumps(summary, indent=2))
    print(f"\nscore {score(total):.1%} of the non-equivalent mutants killed (target {TARGET:.0%})")
    return 0


def score(count: Counter) -> float:
    relevant = count["mutants"] - count["equivalent"]
    return count["killed"] / relevant if relevant else 1.0


def check_selection() -> None:
    """The test files of :data:`SCOPE` are those ``[tool.mutmut]`` selects, and no others."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml as tomllib  # type: ignore[no-redef]
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    selection = config["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    selected = {entry.split("::")[0] for entry in selection if not entry.startswith("-")}
    named = {test for part in SCOPE.values() for test in part.tests}
    if selected != named:
        raise SystemExit(
            f"mutation: pyproject.toml [tool.mutmut] selects {sorted(selected - named)} that "
            f"scripts/mutation.py names for no file, and misses {sorted(named - selected)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (2)")
    parser.add_argument("--report", action="store_true", help="only report the last run")
    args = parser.parse_args(argv)
    previous = ROOT / "mutants" / "mutation-report.json"
    if args.report:
        wall = json.loads(previous.read_text())["wall_s"] if previous.exists() else None
    else:
        check_selection()
        log = ROOT / "mutants" / "run.log"
        print(f"mutation: mutmut on {len(SCOPE)} files, its log in mutants/run.log", flush=True)
        wall = run_mutmut(args.jobs, log)
    return report(wall)


if __name__ == "__main__":
    sys.exit(main())
