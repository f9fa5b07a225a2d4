"""Generation: MaCSC T+I+A+V against text-only T5 on a T5-small-shaped model (issue 10).

The model: T5 with t5-small's sizes (``d_model`` 512, 6 encoder and 6 decoder blocks, 8 heads,
``d_ff`` 2048, a vocabulary of 32,128 shared with the LM head; 60.5M parameters), random weights
from a ``T5Config``. No T5 weights or tokenizer can be downloaded here, so the texts are
tokenised with MiniLM's uncased WordPiece (its ids, all below 30,522, lie in T5's vocabulary;
decoding starts from id 0, ``[PAD]``). What a step costs depends on the shapes, not the weights.

The two models (same backbone, same generation head, :mod:`macsc.method.heads.generation`):

- ``macsc``: T+I+A+V, prototypes of the paper's shapes (Gaussian, ``k = 8``, widths 512, 1024
  and 512 as CLIP, AudioCLIP and CLIP-ViP give), 8 enhancer heads; the decoder cross-attends to
  ``[H^t ; Ĥ^image ; Ĥ^audio ; Ĥ^video]``, ``l + 24`` rows; no ``L_msb`` (the paper's);
- ``text``: ``modalities: [text]``, plain T5 fine-tuning (the decoder reads the ``l`` rows of
  the encoder).

The data: CommonGen-like concept sets of 3-5 concepts (5-10 tokens with ``[CLS]`` and
``[SEP]``, ~10 padded) and references of 13-21 tokens (~16 on average), read through
:class:`tasks.commongen.CommonGenDataModule`, the prototypes from a warm on-disk cache, as in
training; training batches of 32.

Training step. Forward, the token cross-entropy, backward, the model's own AdamW and schedule
step (:class:`common.Trainee`); the two models alternate step by step on the same batches after
``warmup`` steps each; reported is the median over the pairs of the ratio of their step times.
Memory: each model trained ``memory_steps`` steps in its own fresh process, the peak resident
set over the one before the model was built (:func:`common.training_footprint`).

Beam search. The head's ``generate`` on evaluation batches of ``--beam-batch`` concept sets
(32 by default): the encoder, the enhancers (``macsc``) and beam search with 5 beams and exactly
32 new tokens (``min_new_tokens`` 32: random weights would otherwise stop the two models after
different numbers of tokens, which is not what is compared). After one untimed search each on
two concept sets, the models alternate batch by batch; sentences per second is the batch size
over the median batch time, the ratio the median of the per-batch speed ratios.

Threads. On a machine shared with other jobs, two threads per process can be many times slower
than one for the small matrix products of decoding (measured here under load 5: 1,000 products
of 20x512 by 512x512 took 11 s with two threads, 0.25 s with one), so this benchmark runs with
one thread by default, in ``make bench`` too; ``--threads 2`` uses both cores.

    python benchmarks/generation.py [--pairs 10] [--beam-batches 3] [--beam-batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

ORDER = ("macsc", "text")
TASK = {"kind": "generation", "num_labels": 1, "metrics": ["bleu_4"]}
BEAMS = 5
NEW_TOKENS = 32
HEAD_OPTIONS = {
    "num_beams": BEAMS,
    "max_new_tokens": NEW_TOKENS,
    "generate_kwargs": {"min_new_tokens": NEW_TOKENS},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "macsc": {
        "modalities": ["text", "image", "audio", "video"],
        "prototypes": common.PAPER_PROTOTYPES,
    },
    "text": {"modalities": ["text"]},
}
#: CommonGen-flavoured concepts (nouns and verbs of everyday scenes), a few split by WordPiece
CONCEPTS = (
    "dog frisbee catch throw ball kick field player team goal cat sofa sleep couch blanket "
    "child kite fly beach wave surf board ride horse fence jump rider snow ski slope mountain "
    "climb rope tree cut axe wood fire camp tent sit bench park feed bird bread duck pond swim "
    "lake boat paddle river fish net pull car wash sponge bucket water drive street bike helmet "
    "wear cook kitchen pan stir soup chop onion knife table plate eat fork cake candle blow "
    "birthday guitar play stage sing microphone crowd dance music paint wall brush ladder "
    "window clean glass drink bottle pour juggler unicycle skateboard trampoline harmonica "
    "accordion wheelbarrow"
).split()


def write_t5_small(folder: Path) -> str:
    """A T5 with t5-small's sizes and random weights, saved with MiniLM's tokenizer files."""
    from transformers import T5Config, T5ForConditionalGeneration

    from macsc.paths import resolve_pretrained

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        decoder_start_token_id=0,  # MiniLM's [PAD], as T5's <pad>
        pad_token_id=0,
        eos_token_id=102,  # MiniLM's [SEP], the last token of every tokenised target
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = Path(resolve_pretrained(common.BACKBONE))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return str(folder)


def concept_sets(count: int, seed: int = 0) -> list[tuple[list[str], str]]:
    """``count`` (concepts, reference) pairs: 3-5 distinct concepts (as CommonGen), and a sentence of 10-14
    words that uses them among common words; deterministic."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        size = int(torch.randint(3, 6, (1,), generator=generator))
        concepts = [CONCEPTS[i] for i in torch.randperm(len(CONCEPTS), generator=generator)[:size]]
        length = int(torch.randint(10, 15, (1,), generator=generator))
        fillers = torch.randint(len(common.WORDS), (length,), generator=generator).tolist()
        words = [common.WORDS[i] for i in fillers]
        places = sorted(torch.randperm(length, generator=generator)[:size].tolist())
        for place, concept in zip(places, concepts, strict=True):
            words[place] = concept
        rows.append((concepts, " ".join(words) + "."))
    return rows


def write_split(path: Path, rows: list[tuple[list[str], str]]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for concepts, target in rows:
            handle.write(json.dumps({"concepts": concepts, "target": target}) + "\n")
    return str(path)


def prepare_batches(
    folder: Path, backbone: str, train: int, evaluation: int, evaluation_size: int
) -> tuple[list[dict], list[dict], dict]:
    """``train`` training batches of 32 and ``evaluation`` evaluation batches of
    ``evaluation_size`` concept sets, collated with prototypes read from a warm cache, and a
    warm-up evaluation batch of two sets; the training batches are also saved to
    ``folder / "batches.pt"`` for the memory subprocesses."""
    from macsc.prototypes import build_extractor
    from tasks.commongen import CommonGenDataModule

    sets = concept_sets(evaluation_size * evaluation, seed=1)
    files = {
        "train": write_split(folder / "train.jsonl", concept_sets(32 * train)),
        "validation": write_split(folder / "dev.jsonl", sets),
    }
    extractors = {name: build_extractor(**s) for name, s in common.PAPER_PROTOTYPES.items()}
    for _ in ("cold", "warm"):  # the first fills the prototype cache, the second maps it
        data = CommonGenDataModule(
            data_files=files,
            cache_dir=str(folder / "cache"),
            batch_size=32,
            eval_batch_size=evaluation_size,
        )
        data.connect(backbone, extractors, VARIANTS["macsc"]["modalities"])
        with contextlib.redirect_stderr(io.StringIO()):  # the cache's progress bars
            data.setup("fit")
    training = common.take(data.train_dataloader(), train)
    torch.save(training, folder / "batches.pt")
    loader = data.val_dataloader()
    warm_up = loader.collate_fn([loader.dataset[i] for i in range(2)])
    return training, common.take(loader, evaluation), warm_up


def build_model(variant: str, backbone: str, seed: int = 0):
    """A fresh model of ``variant`` (``macsc`` or ``text``) on ``backbone``, in training mode."""
    from macsc.training.module import MaCSC

    torch.manual_seed(seed)
    return MaCSC(
        backbone=backbone,
        task=TASK,
        enhancer={"heads": 8},
        head_options=HEAD_OPTIONS,
        **VARIANTS[variant],
    ).train()


def beam_search_seconds(
    models: dict[str, Any], batches: list[dict], warm_up: dict
) -> dict[str, list[float]]:
    """Seconds of beam search on each batch, the models alternating batch by batch, after one
    untimed search each on ``warm_up``."""
    times: dict[str, list[float]] = {variant: [] for variant in models}
    with torch.no_grad():
        for model in models.values():
            model.eval().head.generate(model.network(warm_up))
        for batch in batches:
            for variant, model in models.items():
                start = time.perf_counter()
                tokens = model.head.generate(model.network(batch))
                times[variant].append(time.perf_counter() - start)
                if tokens.shape[1] != NEW_TOKENS + 1:  # the start token, then the new ones
                    raise RuntimeError(f"{variant}: {tokens.shape[1] - 1} new tokens, not 32")
    return times


def measure_memory(variant: str, batches_file: Path, steps: int, backbone: str) -> dict:
    """Run in a fresh process: the training footprint in MiB of ``variant``."""
    common.quiet()
    batches = torch.load(batches_file, weights_only=False)
    return common.training_footprint(
        functools.partial(build_model, variant, backbone), batches, steps
    )


def run(
    pairs: int = 10,
    beam_batches: int = 3,
    beam_batch: int = 32,
    memory_steps: int = 2,
    warmup: int = 1,
    threads: int | None = 1,
) -> dict:
    """The training-step comparison (time and memory) and the beam-search comparison on
    ``beam_batches`` batches of ``beam_batch`` concept sets, with ``threads`` threads (None or 0:
    torch's setting; the process's setting is restored after)."""
    common.quiet()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _run(pairs, beam_batches, beam_batch, memory_steps, warmup)
    finally:
        torch.set_num_threads(before)


def _run(pairs: int, beam_batches: int, beam_batch: int, memory_steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        backbone = write_t5_small(folder / "t5-small")
        training, evaluation, warm_up = prepare_batches(
            folder, backbone, 4, beam_batches, beam_batch
        )
        models = {variant: build_model(variant, backbone) for variant in ORDER}
        trainees = {variant: common.Trainee(model) for variant, model in models.items()}
        times = common.alternate_steps(trainees, training, pairs, warmup)
        beams = beam_search_seconds(models, evaluation, warm_up)
        del models, trainees
        memory = {}
        for variant in ORDER:
            arguments = ["--memory", variant, "--batches", str(folder / "batches.pt")]
            arguments += ["--steps", str(memory_steps), "--backbone", backbone]
            arguments += ["--threads", str(torch.get_num_threads())]
            memory[variant] = common.footprint_in_subprocess(__file__, arguments, repr(variant))
    step_ratios = [a / b for a, b in zip(times["macsc"], times["text"], strict=True)]
    beam_ratios = [b / a for a, b in zip(beams["macsc"], beams["text"], strict=True)]
    rates = {variant: beam_batch / common.median(seconds) for variant, seconds in beams.items()}
    inputs = [int(b["attention_mask"].shape[1]) for b in training]
    targets = [int(b["labels"].shape[1]) for b in training]
    detail = (
        f"generation step (T5-small shape) macsc {common.median(times['macsc']):.2f} s vs text "
        f"{common.median(times['text']):.2f} s (median ratio of {pairs} alternating pairs, "
        f"quartiles {common.quartiles(step_ratios)}; batch 32, padded inputs {inputs}, targets "
        f"{targets}, {_threads(torch.get_num_threads())}); training footprint macsc "
        f"{memory['macsc']['footprint_mib']:.0f} MiB vs text {memory['text']['footprint_mib']:.0f}"
        f" MiB; beam search batch {beam_batch}: macsc {common.median(beams['macsc']):.2f} s vs "
        f"text {common.median(beams['text']):.2f} s (speed ratios {_listed(beam_ratios)})"
    )
    return {
        "time": common.median(step_ratios),
        "memory": memory["macsc"]["footprint_mib"] / memory["text"]["footprint_mib"],
        "rates": rates,
        "beam_ratio": common.median(beam_ratios),
        "detail": detail,
        "times": times,
        "beams": beams,
        "pairs": pairs,
        "beam_batches": beam_batches,
        "beam_batch": beam_batch,
        "threads": torch.get_num_threads(),
    }


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def summary(result: dict) -> list[str]:
    """The two lines of ``make bench``: the sizes measured follow in brackets."""
    rates = result["rates"]
    return [
        f"generation step overhead vs text-only (T5-small shape): {result['time']:.2f}x time, "
        f"{result['memory']:.2f}x memory [{result['pairs']} alternating pairs of steps, "
        f"{_threads(result['threads'])}]",
        f"beam search ({BEAMS} beams, {NEW_TOKENS} new tokens): {rates['macsc']:.1f} sentences/s "
        f"with prototypes vs {rates['text']:.1f} without ({result['beam_ratio']:.2f}x) "
        f"[{result['beam_batches']} alternating batches of {result['beam_batch']} concept sets, "
        f"{_threads(result['threads'])}]",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="alternating training-step pairs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--beam-batches", type=int, default=3, help="batches to decode")
    parser.add_argument("--beam-batch", type=int, default=32, help="concept sets a batch")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--memory", choices=ORDER, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure_memory(args.memory, args.batches, args.steps, args.backbone)))
        return
    result = run(
        args.pairs, args.beam_batches, args.beam_batch, args.memory_steps, args.warmup, args.threads
    )
    print(result["detail"])
    for line in summary(result):
        print(line)


if __name__ == "__main__":
    main()
