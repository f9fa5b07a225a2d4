"""Prototypes stored in half precision reach the model unchanged but for rounding that matters
less than bf16 compute, and the collator gathers them without an intermediate copy."""

import pytest
import torch
from test_tasks_base import ListDataModule, pair_splits

from macsc.model import MaCSC
from macsc.prototypes import build_extractor, prototype_table
from macsc.task import TaskSpec
from tasks.base import gather_prototypes

PAPER_SHAPES = {
    "image": {"kind": "gaussian", "dim": 512, "k": 8},
    "audio": {"kind": "gaussian", "dim": 1024, "k": 8, "seed": 1},
    "video": {"kind": "gaussian", "dim": 512, "k": 8, "seed": 2},
}


def first_batch(model: MaCSC, tokenizer: str, dtype: str) -> dict:
    data = ListDataModule(pair_splits(8, 16), TaskSpec(num_labels=3), prototype_dtype=dtype)
    data.connect(tokenizer, dict(model.extractors.items()))
    return next(iter(data.val_dataloader()))


def test_half_precision_storage_changes_outputs_less_than_bf16_compute(tiny_backbone):
    torch.manual_seed(0)
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio", "video"],
        prototypes=PAPER_SHAPES,
        task={"kind": "classification", "num_labels": 3, "metrics": ["accuracy"]},
        enhancer_heads=4,
    ).eval()
    full = first_batch(model, tiny_backbone, "float32")
    half = first_batch(model, tiny_backbone, "float16")
    assert full["prototypes"]["audio"]["features"].dtype == torch.float32
    assert half["prototypes"]["audio"]["features"].dtype == torch.float16
    with torch.no_grad():
        reference = model(full)["outputs"]
        stored_half = model(half)["outputs"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            computed_bf16 = model(full)["outputs"].float()
    storage_error = (stored_half - reference).abs().max()
    compute_error = (computed_bf16 - reference).abs().max()
    assert 0 < storage_error <= compute_error, (float(storage_error), float(compute_error))


def test_gather_puts_the_same_rows_in_one_tensor_per_modality(tmp_path):
    extractor = build_extractor("gaussian", dim=16, k=4)
    questions = ["q one", "q two", "q one", "q three", "q two"]
    answers = ["a", "b", "c", "d", "a"]
    indices = torch.tensor([4, 0, 2, 2])
    for dtype in ("float16", "float32"):
        tables = [
            prototype_table(extractor, texts, progress=False, cache_dir=tmp_path, dtype=dtype)
            for texts in (questions, answers)
        ]
        out = gather_prototypes(tables, indices)
        # what the collator computed before: look up, concatenate, (then it cast to float32)
        expected = [
            extractor.extract([t[i] for i in indices.tolist()]) for t in (questions, answers)
        ]
        stored = getattr(torch, dtype)
        assert out["features"].dtype == stored and out["features"].is_contiguous()
        assert torch.equal(
            out["features"], torch.cat([e.features.to(stored) for e in expected], dim=1)
        )
        assert torch.equal(out["mask"], torch.cat([e.mask for e in expected], dim=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_gather_into_pinned_memory(tmp_path):
    extractor = build_extractor("gaussian", dim=16, k=4)
    tables = [prototype_table(extractor, ["x", "y"], progress=False, cache_dir=tmp_path)]
    out = gather_prototypes(tables, torch.tensor([1, 0]), pin_memory=True)
    assert out["features"].is_pinned() and out["mask"].is_pinned()
    assert out["features"].pin_memory().data_ptr() == out["features"].data_ptr()  # no copy
    assert torch.equal(out["features"], extractor.extract(["y", "x"]).features.half())
