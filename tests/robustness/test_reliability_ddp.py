"""DDP correctness on CPU (gloo): with ``gather_across_devices`` two ranks of batch b compute the
single-process loss of the 2b examples and, after DDP's gradient averaging, its gradients; the
ranks agree on the labels, the class prior and the batch sizes (a ragged last batch included);
``nonfinite: skip`` skips on every rank together; a DDP checkpoint loads in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from transformers import AutoTokenizer

import macsc.method.objective as objective
from macsc.training.module import MaCSC
from tests.cli.test_cli import demo_args, event_tags

SENTENCES = [
    "a red apple on the table",
    "the sky is blue",
    "a loud drum",
    "green grass",
    "a dog barks",
    "snow is white",
    "the sun is warm",
    "cold blue ice",
]
# every class occurs on both ranks, so positives and negatives cross the rank boundary
LABELS = [0, 1, 2, 0, 1, 0, 2, 2]
PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 16, "k": 4},
    "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
}


class LossOfBatch(MaCSC):
    """MaCSC whose forward is the whole objective, so that, as in Lightning's training step,
    all of it runs inside DDP's forward."""

    def forward(self, batch):
        return self.compute_losses(batch, super().forward(batch))


TASKS = {
    "classification": {"kind": "classification", "num_labels": 3},
    "span": {"kind": "span", "num_labels": 2, "metrics": ["exact", "f1"]},
}


def loss_model(backbone: str, gather: bool, kind: str = "classification") -> LossOfBatch:
    torch.manual_seed(0)
    model = LossOfBatch(
        backbone=backbone,
        modalities=["text", "image", "audio"],
        prototypes=PROTOTYPES,
        task=TASKS[kind],
        enhancer={"heads": 4},
        objective={"gather_across_devices": gather},
    )
    return model.eval()  # no dropout: both sides see the same function


def full_batch(model: MaCSC, backbone: str, kind: str = "classification") -> dict:
    batch = dict(
        AutoTokenizer.from_pretrained(backbone)(SENTENCES, padding=True, return_tensors="pt")
    )
    batch["labels"] = torch.tensor(LABELS)
    if kind == "span":  # answers inside each sentence, the context after its first token
        real = batch["attention_mask"].sum(-1)
        positions = torch.arange(batch["input_ids"].shape[1])[None]
        batch["context_mask"] = (positions >= 1) & (positions < real[:, None] - 1)
        batch["start_positions"] = torch.ones(len(SENTENCES), dtype=torch.long)
        batch["end_positions"] = real - 2
    batch["prototypes"] = {}
    for name, extractor in model.extractors.items():
        out = extractor.extract(SENTENCES)
        batch["prototypes"][name] = {"features": out.features, "mask": out.mask}
    return batch


def rows(batch: dict, part: slice, width: int | None = None, text: bool = False) -> dict:
    """The samples ``part`` of a batch; ``width`` cuts the text's (B, l) tensors to that
    length, as a rank that padded its own samples only would have them."""
    if isinstance(batch, dict):
        return {k: rows(v, part, width, k != "prototypes" or text) for k, v in batch.items()}
    value = batch[part]
    return value[:, :width] if width is not None and text and value.dim() == 2 else value


KINDS = ("classification", "span")


def ddp_worker(fabric, backbone: str, batches: dict, out: Path) -> None:
    """One rank, per task kind: its half of the kind's batch through DDP; rank 0 saves what the
    ranks saw and computed to ``out`` (a file: the gradients are too big for the launcher's
    return pipe). Both kinds share one launch: starting two ranks costs more than the steps."""
    torch.set_num_threads(1)
    gather = objective.gather_batch
    results = {}
    for kind, batch in batches.items():
        model = loss_model(backbone, gather=True, kind=kind)
        seen_keys = []

        def recording_gather(*args, seen_keys=seen_keys):
            out = gather(*args)
            seen_keys.append(out[2])
            return out

        objective.gather_batch = recording_gather
        ddp = fabric.setup_module(model)
        half = len(LABELS) // 2
        mine = slice(fabric.global_rank * half, (fabric.global_rank + 1) * half)
        # each rank pads to its own longest sample, so span distributions differ in length
        width = int(batch["attention_mask"][mine].sum(-1).max()) if kind == "span" else None
        losses = ddp(rows(batch, mine, width))
        fabric.backward(losses["total"])  # DDP averages the gradients over the ranks
        results[kind] = {
            "wa": fabric.all_gather(losses["wa"].detach()),
            "msb": fabric.all_gather(losses["msb"].detach()),
            "keys": fabric.all_gather(seen_keys[0]).tolist(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        }
    objective.gather_batch = gather
    if fabric.global_rank == 0:
        torch.save(results, out)


def test_two_ranks_compute_the_single_process_loss_and_gradients(tiny_backbone, tmp_path):
    """Classification (label positives) and span (identity positives, ragged widths)."""
    singles, batches = {}, {}
    for kind in KINDS:
        singles[kind] = loss_model(tiny_backbone, gather=False, kind=kind)
        batches[kind] = full_batch(singles[kind], tiny_backbone, kind)

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(ddp_worker, tiny_backbone, batches, tmp_path / "ranks.pt")
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)

    for kind in KINDS:
        single, got = singles[kind], ranks[kind]
        expected = single(batches[kind])
        expected["total"].backward()
        # every rank computed L_msb over all 2b examples: the single-process value, on both
        torch.testing.assert_close(
            got["msb"], expected["msb"].detach().expand(2), atol=1e-5, rtol=0, msg=kind
        )
        torch.testing.assert_close(
            got["wa"].mean(), expected["wa"].detach(), atol=1e-5, rtol=0, msg=kind
        )
        # both ranks gathered the same, complete label set (identity keys: offset by rank)
        expected_keys = LABELS if kind == "classification" else list(range(len(LABELS)))
        assert got["keys"] == [expected_keys, expected_keys], kind
        grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
        assert grads.keys() == got["grads"].keys(), kind
        for name, grad in grads.items():
            torch.testing.assert_close(
                got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=f"{kind} {name}"
            )


class RankRecorder(L.Callback):
    """Used by the DDP run below: writes what each rank saw to ``folder/rank<r>.json``, and puts
    a NaN into rank ``nan_rank``'s batch of step ``nan_step`` (the other rank's stays clean)."""

    def __init__(self, folder: str, nan_rank: int = 1, nan_step: int = 1) -> None:
        self.folder, self.nan_rank, self.nan_step = Path(folder), nan_rank, nan_step
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["example_index"].tolist())
        if trainer.global_rank == self.nan_rank and trainer.global_step == self.nan_step:
            batch["prototypes"]["audio"]["features"][0, 0, 0] = float("nan")

    def on_train_end(self, trainer, pl_module):
        record = {
            "prior": pl_module.objective.class_prior.tolist(),
            "labels": trainer.datamodule.train_label_classes().tolist(),
            "batches": self.batches,
            "skipped": int(pl_module.guard.skipped_batches),
            "finite": all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()),
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_run_with_gather_a_ragged_last_batch_and_a_skipped_nan(tiny_backbone, tmp_path):
    """The demo through the CLI on two CPU ranks (gloo), with the cases DDP makes hard."""
    overlay = tmp_path / "callbacks.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true}\n"
        "    - class_path: tests.robustness.test_reliability_ddp.RankRecorder\n"
        f"      init_args: {{folder: {tmp_path}}}\n"
    )
    args = demo_args(tiny_backbone, tmp_path, "--config", str(overlay))
    args += ["--model.modalities", "[text, image, audio]"]
    args += ["--model.objective.gather_across_devices", "true"]
    args += ["--model.nonfinite", "skip", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    # 37 examples: 19 per rank (one repeated to even out), batches of 16 and 3, two epochs
    args += ["--data.init_args.data_fraction", "0.04625", "--trainer.limit_val_batches", "1"]
    command = [str(Path(sys.executable).parent / "macsc"), "fit", *args]
    root = Path(__file__).resolve().parents[2]  # this checkout's code, and RankRecorder
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped the batch of global step 1" in result.stderr
    scalars, _ = event_tags(tmp_path)  # rank 0 logs the modality weights
    assert "weights/rho/image" in scalars and "weights/pair/image->audio" in scalars

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["prior"] == ranks[1]["prior"] and ranks[0]["labels"] == ranks[1]["labels"]
    sizes = [[len(b) for b in rank["batches"]] for rank in ranks]
    assert sizes == [[16, 3, 16, 3]] * 2
    first_epoch = {i for rank in ranks for b in rank["batches"][:2] for i in b}
    assert first_epoch == set(range(37))
    assert [rank["skipped"] for rank in ranks] == [1, 1] and all(r["finite"] for r in ranks)

    checkpoint = next(tmp_path.rglob("last.ckpt"))
    model = MaCSC.load_from_checkpoint(checkpoint)  # saved under DDP, loaded in one process
    assert (
        model.objective.class_prior.tolist() == ranks[0]["prior"]
        and int(model.guard.skipped_batches) == 1
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
