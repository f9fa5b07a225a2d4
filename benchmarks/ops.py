"""Operators a training step dispatches, MaCSC T+I+A+V against text-only (issue 20).

On a GPU at batch 32 the step is bound by kernel launches, not arithmetic: its time follows the
number of operators the host dispatches. That number does not depend on the batch size, so it
is counted here, on the CPU, with ``torch.profiler``: one full training step of
``gpu_step.py`` (forward and losses under bf16 autocast, backward, fused AdamW, ``zero_grad``)
after one warm-up step, at the BERT-base shape (``BertConfig()``, random weights, no
download), batch 4 x 32.

- top-level operators: ATen events with no ATen event above them (what Python, autograd or the
  optimizer dispatch; an operator's own sub-operators are not counted again);
- leaf operators: ATen events with no ATen event below them;
- host syncs: the operators that make the host wait for the device, ``aten::_local_scalar_dense``
  (``.item()``, ``bool(tensor)``), ``aten::item``, ``aten::nonzero`` (boolean-mask indexing
  calls it) and ``aten::masked_select``, at any depth -- except inside ``aten::_fused_adamw_``:
  the CPU kernel reads each parameter's step count with ``item()`` (one per parameter tensor,
  for both models), where the CUDA kernel reads the counts on the device. (The text-only step
  has one sync of its own: transformers' SDPA mask checks ``attention_mask.all()``.)

    python benchmarks/ops.py [--shape bert-base|tiny] [--batch-size 4] [--length 32] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step  # noqa: E402  (puts the repository on the path)

#: operators that wait for the device (a host-device synchronisation on a GPU)
SYNC_OPERATORS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select")
ORDER = ("macsc", "text")


def _is_aten(event) -> bool:
    return event.name.startswith("aten::")


def _has_aten_ancestor(event) -> bool:
    return any(_is_aten(a) for a in _ancestors(event))


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _is_counted_sync(event) -> bool:
    """A sync operator not inside another (``item`` calls ``_local_scalar_dense``: one sync)
    nor inside the CPU's fused AdamW (module docstring)."""
    if event.name not in SYNC_OPERATORS:
        return False
    return not any(
        a.name in SYNC_OPERATORS or a.name == "aten::_fused_adamw_" for a in _ancestors(event)
    )


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's own start/stop lines (written by its C++ side to the process's stderr)
    out of the benchmark's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def count_operators(step, warmup: int = 1) -> dict:
    """Profile one call of ``step`` after ``warmup`` calls: ``{"top": n, "leaf": n, "syncs":
    {operator: n}, "top_names": Counter}``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if _is_aten(e)]
    top = [e for e in events if not _has_aten_ancestor(e)]
    leaf = [e for e in events if not any(_is_aten(c) for c in e.cpu_children)]
    syncs = collections.Counter(e.name for e in events if _is_counted_sync(e))
    return {
        "top": len(top),
        "leaf": len(leaf),
        "syncs": dict(syncs),
        "top_names": collections.Counter(e.name for e in top),
    }


def run(shape: str = "bert-base", batch_size: int = 4, length: int = 32) -> dict:
    """Both models' counts at ``shape`` (``bert-base``, or ``tiny`` for a smoke test)."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    counts = {}
    with tempfile.TemporaryDirectory() as folder:
        backbone = gpu_step.write_backbone(Path(folder), tiny=shape == "tiny", bert=True)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(backbone).vocab_size
        batch = gpu_step.make_batches(1, batch_size, length, vocab, "cpu")[0]
        for variant in ORDER:
            runner = gpu_step.Runner(variant, backbone, "cpu")
            counts[variant] = count_operators(lambda r=runner: r.step(batch))
            del runner
    return {"shape": shape, "batch_size": batch_size, "length": length, **counts}


def _syncs(counts: dict) -> str:
    named = ", ".join(f"{name} {n}" for name, n in sorted(counts["syncs"].items()))
    return f"{host_syncs(counts)} ({named})" if named else "0"


def host_syncs(counts: dict) -> int:
    return sum(counts["syncs"].values())


def summary(result: dict) -> str:
    """The line ``make bench`` prints."""
    macsc, text = result["macsc"], result["text"]
    label = " (BERT-base shape)" if result["shape"] == "bert-base" else f" ({result['shape']})"
    return (
        f"operators per step vs text-only{label}: {macsc['top'] / text['top']:.2f}x "
        f"({macsc['top']} vs {text['top']}), host syncs {host_syncs(macsc) - host_syncs(text):+d}"
    )


def detail(result: dict, top: int = 0) -> list[str]:
    """The counts in full, and with ``top`` the operators MaCSC dispatches most more often."""
    macsc, text = result["macsc"], result["text"]
    lines = [
        f"operators per training step (torch.profiler on the CPU, batch {result['batch_size']} x "
        f"{result['length']}, one step after a warm-up): top-level macsc {macsc['top']} vs text "
        f"{text['top']}, leaf {macsc['leaf']} vs {text['leaf']} "
        f"({macsc['leaf'] / text['leaf']:.2f}x); host syncs macsc {_syncs(macsc)} vs text "
        f"{_syncs(text)} (targets <= 1.15x top-level operators, no sync added)"
    ]
    if top:
        difference = macsc["top_names"].copy()
        difference.subtract(text["top_names"])
        for name, extra in difference.most_common(top):
            lines.append(
                f"  {name}: +{extra} ({macsc['top_names'][name]} vs {text['top_names'][name]})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("bert-base", "tiny"), default="bert-base")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--top", type=int, default=0, help="list the operators MaCSC adds most")
    args = parser.parse_args()
    result = run(args.shape, args.batch_size, args.length)
    for line in detail(result, args.top):
        print(line)
    print(summary(result))


if __name__ == "__main__":
    main()
