"""MaCSC T+I+A+V against the text-only baseline on a GPU (issues 6, 20): training samples per
second, their ratio, and peak memory, for a RoBERTa-base-sized backbone (or BERT-base with
``--bert``; random weights, no download) under bf16 autocast, in three modes: ``eager``;
``compiled``, the forward and losses under ``torch.compile``; ``graphed``, the backbone eager and
what runs after it compiled with ``mode="reduce-overhead"`` (CUDA graphs), as
``model.compile_after_backbone`` does it in training. ``benchmarks/gpu.sh`` runs it.

A step is what ``training_step`` computes plus the optimizer: forward, losses, backward, AdamW
(fused, as ``configure_optimizers`` makes it) -- without Lightning's per-step bookkeeping, which
adds the same small host cost to both models. Batches: 32 examples padded to 128 tokens (GLUE's
``max_length``) with real lengths drawn from 20-128, prototypes of the paper's shapes (``k = 8``;
widths 512, 1024, 512) in float16 as the cache stores them, all on the device beforehand. Timing: CUDA events around rounds of
``--steps`` steps; the two models alternate (A B A B ...) after warm-up, and the median of the
per-round ratios is reported. Memory: each model's parameters and AdamW state, plus the peak
allocated during the warm-up steps of a mode over what was allocated when they began (gradients,
the step's activations, and in ``graphed`` the graphs' memory pool). After a compiled mode,
torch's counts of graph breaks and graphs.

    python benchmarks/gpu_step.py [--bert] [--rounds 5] [--steps 20] [--modes eager,compiled,graphed]
    python benchmarks/gpu_step.py --device cpu --tiny --rounds 1 --steps 2   (a smoke test; on the
        CPU ``graphed`` compiles without CUDA graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 512, "k": 8},
    "audio": {"kind": "gaussian", "dim": 1024, "k": 8, "seed": 1},
    "video": {"kind": "gaussian", "dim": 512, "k": 8, "seed": 2},
}
TASK = {"kind": "classification", "num_labels": 2, "metrics": ["accuracy"]}
MODES = ("eager", "compiled", "graphed")
VARIANTS = {
    "text": {"modalities": ["text"], "objective": {"lambda_msb": 0.0}},
    "macsc": {"modalities": ["text", "image", "audio", "video"], "prototypes": PROTOTYPES},
}


def write_backbone(folder: Path, tiny: bool, bert: bool = False) -> str:
    """A randomly initialised RoBERTa, or BERT with ``bert`` (base size, or tiny for a smoke
    test), saved locally."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    if bert:  # bert-base-uncased: 12 layers, hidden 768, 12 heads, vocabulary 30522
        small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        config = BertConfig(**small, intermediate_size=128) if tiny else BertConfig()
        BertModel(config).save_pretrained(folder)
        return str(folder)
    config = (
        RobertaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        if tiny
        else RobertaConfig()  # roberta-base: 12 layers, hidden 768, 12 heads, vocabulary 50265
    )
    RobertaModel(config).save_pretrained(folder)
    return str(folder)


def make_batches(count: int, size: int, length: int, vocab: int, device: str) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        lengths = torch.randint(20, length + 1, (size,), generator=generator)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        ids = torch.randint(3, vocab, (size, length), generator=generator)
        ids = torch.where(mask.bool(), ids, torch.ones_like(ids))  # RoBERTa's <pad> is 1
        ids[:, 0] = 0  # <s>
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(size) % 2}
        batch["prototypes"] = {  # float16, as the cache stores them
            name: {
                "features": torch.randn(size, spec["k"], spec["dim"], generator=generator).half(),
                "mask": torch.ones(size, spec["k"], dtype=torch.bool),
            }
            for name, spec in PROTOTYPES.items()
        }
        batches.append(_to(batch, device))
    return batches


def _to(value, device: str):
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value.to(device)


class Runner:
    """One model, its optimizer and its (optionally compiled) step."""

    def __init__(self, variant: str, backbone: str, device: str) -> None:
        from macsc.training.module import MaCSC

        torch.manual_seed(0)
        self.model = MaCSC(backbone=backbone, task=TASK, **VARIANTS[variant]).to(device).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, fused=device.startswith(("cuda", "cpu"))
        )
        self.device_type = torch.device(device).type
        self.loss = self._loss

    def _loss(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model.compute_losses(batch, self.model(batch))["total"]

    def compile(self) -> None:
        self.loss = torch.compile(self._loss)

    def graph(self) -> None:
        """What runs after the backbone in CUDA graphs, as ``compile_after_backbone`` does."""
        from macsc.training.compiled import CompiledAfterBackbone

        self.model.compiled_after_backbone = CompiledAfterBackbone(
            self.model.after_backbone, "reduce-overhead"
        )

        def loss(batch: dict) -> torch.Tensor:
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                return self.model.training_losses(batch)["total"]

        self.loss = loss

    def state_bytes(self) -> int:
        """The bytes its parameters and AdamW state hold between steps."""
        tensors = [*self.model.parameters()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values()]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def step(self, batch: dict) -> None:
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_round(runner: Runner, batches: list[dict], steps: int, device: str) -> float:
    """Seconds for ``steps`` steps, measured with CUDA events on a GPU."""
    synchronize(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            runner.step(batches[i % len(batches)])
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for i in range(steps):
        runner.step(batches[i % len(batches)])
    return time.perf_counter() - begin


def compare(runners: dict, batches, rounds: int, steps: int, device: str, size: int) -> dict:
    """Alternating rounds; samples/s of each model (median) and the median per-round ratio."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            seconds[name].append(timed_round(runner, batches, steps, device))
    ratios = [m / t for m, t in zip(seconds["macsc"], seconds["text"], strict=True)]
    return {
        "samples_per_s": {
            name: steps * size / statistics.median(values) for name, values in seconds.items()
        },
        "time_ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny backbone (smoke test)")
    parser.add_argument("--bert", action="store_true", help="BERT-base instead of RoBERTa-base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="per round")
    parser.add_argument("--warmup", type=int, default=5, help="steps, eager and after compiling")
    parser.add_argument(
        "--modes", default="eager,compiled,graphed", help="comma-separated, eager always first"
    )
    parser.add_argument("--no-compile", action="store_true", help="the same as --modes eager")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after the eager rounds, profile N eager steps of each model and print the top "
        "operators by device time, and the host time a step spends launching",
    )  # fmt: skip
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    device = args.device
    modes = ["eager"] if args.no_compile else args.modes.split(",")
    if modes[0] != "eager" or not set(modes) <= set(MODES):
        parser.error(f"--modes: eager first, then any of {', '.join(MODES[1:])}")
    if device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    results: dict = {"device": device, "batch_size": args.batch_size, "length": args.length}
    with tempfile.TemporaryDirectory() as folder:
        backbone = write_backbone(Path(folder), args.tiny, args.bert)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(backbone).vocab_size
        batches = make_batches(4, args.batch_size, args.length, vocab, device)
        runners = {name: Runner(name, backbone, device) for name in VARIANTS}
    results["parameters"] = {
        name: sum(p.numel() for p in runner.model.parameters()) for name, runner in runners.items()
    }
    for mode in modes:
        begin = time.perf_counter()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        memory = {}
        for name, runner in runners.items():  # warm-up (and compiling), and its memory
            {"eager": lambda: None, "compiled": runner.compile, "graphed": runner.graph}[mode]()
            synchronize(device)
            if device.startswith("cuda"):
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.warmup):
                runner.step(batches[i % len(batches)])
            synchronize(device)
            if device.startswith("cuda"):  # its weights and AdamW state, and the step's peak
                peak = torch.cuda.max_memory_allocated() - start
                memory[name] = (runner.state_bytes() + peak) / 2**30
        results[mode] = compare(runners, batches, args.rounds, args.steps, device, args.batch_size)
        results[mode]["peak_memory_gib"] = memory
        results[mode]["warmup_seconds"] = time.perf_counter() - begin
        if mode != "eager":
            counters = torch._dynamo.utils.counters
            results[mode]["graph_breaks"] = sum(counters["graph_break"].values())
            results[mode]["graphs"] = counters["stats"]["unique_graphs"]
        report(results, mode)
        if mode == "eager" and args.profile:
            profile(runners, batches, args.profile, device)
    results["seconds"] = time.perf_counter() - started
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"total {results['seconds']:.0f} s", flush=True)


def profile(runners: dict, batches: list[dict], steps: int, device: str) -> None:
    """Where each model's step time goes: the operators with the most device time, and the
    host's wall time per step beside the device's busy time (a step whose host time exceeds
    its device time is bound by kernel launches, not by arithmetic)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    for name, runner in runners.items():
        synchronize(device)
        with torch_profile(activities=activities) as prof:
            begin = time.perf_counter()
            for i in range(steps):
                runner.step(batches[i % len(batches)])
            host = time.perf_counter() - begin
            synchronize(device)
            wall = time.perf_counter() - begin
        events = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6
        print(
            f"profile {name}: {1e3 * wall / steps:.1f} ms a step (host returns after "
            f"{1e3 * host / steps:.1f} ms), device busy {1e3 * busy / steps:.1f} ms a step",
            flush=True,
        )
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(events.table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


def report(results: dict, mode: str) -> None:
    result = results[mode]
    rate, memory = result["samples_per_s"], result["peak_memory_gib"]
    line = (
        f"{mode}: text-only {rate['text']:.0f} samples/s, MaCSC T+I+A+V {rate['macsc']:.0f} "
        f"samples/s -> {result['time_ratio']:.3f}x time per step (rounds: "
        f"{', '.join(f'{r:.3f}' for r in result['round_ratios'])})"
    )
    if memory:
        line += (
            f"; peak memory text-only {memory['text']:.2f} GiB, MaCSC {memory['macsc']:.2f} GiB "
            f"-> {memory['macsc'] / memory['text']:.2f}x"
        )
    if mode != "eager":
        line += (
            f" (warm-up with compiling {result['warmup_seconds']:.0f} s; "
            f"{result['graph_breaks']} graph breaks, {result['graphs']} graphs)"
        )
    print(line, flush=True)


if __name__ == "__main__":
    main()
