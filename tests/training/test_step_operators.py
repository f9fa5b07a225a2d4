"""What a MaCSC training step launches beside plain fine-tuning (issue 20): on a GPU at the paper's
batch size the step is bound by how many operators the host dispatches, and by every wait for
the device. Counted with torch.profiler on the CPU; nothing is timed."""

import collections

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

from macsc.training.module import MaCSC
from tests.training.test_performance_paths import RecordingLogger, make_batch

PROTOTYPES = {  # the paper's three modalities, narrow
    "image": {"kind": "gaussian", "dim": 24, "k": 4},
    "audio": {"kind": "gaussian", "dim": 40, "k": 4, "seed": 1},
    "video": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 2},
}
TASK = {"kind": "classification", "num_labels": 2, "metrics": ["accuracy"]}
VARIANTS = {
    "text": {"modalities": ["text"], "objective": {"lambda_msb": 0.0}},
    "macsc": {"modalities": ["text", "image", "audio", "video"], "prototypes": PROTOTYPES},
}
#: operators that make the host wait for the device
SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select")
#: what MaCSC may add to a step: 15 % of the 2031 top-level operators of a text-only BERT-base
#: step (``benchmarks/ops.py``); what MaCSC adds does not depend on the backbone's depth
EXTRA_OPERATORS = 304


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def counts(prof) -> tuple[int, collections.Counter]:
    """Top-level ATen operators (no ATen operator above them) and the host syncs (the
    outermost sync operator of a chain; not the CPU kernel of fused AdamW, which reads each
    step count with ``item()`` where the CUDA kernel reads it on the device)."""
    top, syncs = 0, collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        above = [a.name for a in _ancestors(event)]
        top += not any(name.startswith("aten::") for name in above)
        if event.name in SYNCS and not any(n in SYNCS or n == "aten::_fused_adamw_" for n in above):
            syncs[event.name] += 1
    return top, syncs


def profiled_step(variant: str, backbone: str) -> tuple[int, collections.Counter]:
    """One training step as ``benchmarks/gpu_step.py`` makes it (forward and losses under
    bf16 autocast, backward, fused AdamW, ``zero_grad``), profiled after a warm-up step."""
    torch.manual_seed(0)
    model = MaCSC(backbone=backbone, task=TASK, enhancer={"heads": 4}, **VARIANTS[variant])
    batch = make_batch(model, backbone)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.compute_losses(batch, model(batch))["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return counts(prof)


def test_macsc_adds_few_operators_and_no_host_sync_to_a_training_step(tiny_backbone):
    text, text_syncs = profiled_step("text", tiny_backbone)
    macsc, macsc_syncs = profiled_step("macsc", tiny_backbone)
    # three enhancers, four heads and the objective, each computed once for all modalities
    # (before issue 20: 794 operators more than text-only)
    assert macsc - text <= EXTRA_OPERATORS, (macsc, text)
    assert macsc_syncs == text_syncs


def syncs_of_lightning_steps(model: MaCSC, backbone: str) -> list[collections.Counter]:
    """The host syncs of each ``training_step`` Lightning runs (two steps, every value logged)."""
    recorded = []
    step = model.training_step

    def profiled(batch, batch_idx):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = step(batch, batch_idx)
        recorded.append(counts(prof)[1])
        return out

    model.training_step = profiled
    batch = make_batch(model, backbone)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        log_every_n_steps=1,
        logger=RecordingLogger(),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([batch] * 2, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(model, train_dataloaders=loader)
    return recorded


def test_the_nonfinite_guard_checks_without_a_host_sync_in_the_step(tiny_backbone):
    """``nonfinite: raise`` records a NaN on the device: MaCSC's ``training_step`` (logging
    included) waits for the device no more often than plain fine-tuning's; ``skip`` must decide
    in the step, which costs one sync, as its documentation says."""
    syncs = {}
    for variant, policy in (("text", "raise"), ("macsc", "raise"), ("macsc", "skip")):
        torch.manual_seed(0)
        model = MaCSC(
            backbone=tiny_backbone,
            task=TASK,
            enhancer={"heads": 4},
            nonfinite=policy,
            **VARIANTS[variant],
        )
        syncs[variant, policy] = syncs_of_lightning_steps(model, tiny_backbone)
    assert syncs["macsc", "raise"] == syncs["text", "raise"]
    for skip, plain in zip(syncs["macsc", "skip"], syncs["macsc", "raise"], strict=True):
        assert sum(skip.values()) == sum(plain.values()) + 1
