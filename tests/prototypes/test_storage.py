"""Prototypes stored in half precision reach the model unchanged but for rounding that matters
less than bf16 compute, and the collator gathers them without an intermediate copy."""

import pytest
import torch
from torch.utils.data import DataLoader

from macsc.prototypes import build_extractor, prototype_table
from macsc.task import TaskSpec
from macsc.training.module import MaCSC
from tasks.collate import Collator, gather_prototypes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PAPER_SHAPES = {
    "image": {"kind": "gaussian", "dim": 512, "k": 8},
    "audio": {"kind": "gaussian", "dim": 1024, "k": 8, "seed": 1},
    "video": {"kind": "gaussian", "dim": 512, "k": 8, "seed": 2},
}


def first_batch(model: MaCSC, tokenizer: str, dtype: str) -> dict:
    from tests.tasks.test_base import ListDataModule, pair_splits

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
        enhancer={"heads": 4},
    ).eval()
    full = first_batch(model, tiny_backbone, "float32")
    half = first_batch(model, tiny_backbone, "float16")
    assert full["prototypes"]["audio"]["features"].dtype == torch.float32
    assert half["prototypes"]["audio"]["features"].dtype == torch.float16
    with torch.no_grad():
        reference = model(full).outputs
        stored_half = model(half).outputs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            computed_bf16 = model(full).outputs.float()
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


@cuda
def test_gather_into_pinned_memory_and_the_loader_copies_no_more(tmp_path):
    extractor = build_extractor("gaussian", dim=16, k=4)
    texts = ["x", "y", "z"]
    tables = {"image": [prototype_table(extractor, texts, progress=False, cache_dir=tmp_path)]}
    collator = Collator(0, [texts], tables)
    made = []

    def collate(items):
        made.append(collator(items))
        return made[-1]

    items = [{"input_ids": [101, 7, 102], "example_index": i} for i in (2, 0)]
    loader = DataLoader(items, batch_size=2, collate_fn=collate, pin_memory=True)
    batch = next(iter(loader))
    features = batch["prototypes"]["image"]["features"]
    assert features.is_pinned() and batch["prototypes"]["image"]["mask"].is_pinned()
    # the loader's own pinning found it pinned and kept it: one copy from the map, no second
    assert features.data_ptr() == made[0]["prototypes"]["image"]["features"].data_ptr()
    assert torch.equal(features, extractor.extract(["z", "x"]).features.half())


@cuda
def test_auto_stores_bfloat16_where_extraction_runs_in_bf16(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU extracts in float16")
    extractor = build_extractor("gaussian", dim=16, k=4)
    texts = ["a cat", "a dog"]
    on_gpu = prototype_table(extractor, texts, progress=False, cache_dir=tmp_path, device="cuda")
    on_cpu = prototype_table(extractor, texts, progress=False, cache_dir=tmp_path, device="cpu")
    assert on_gpu.features.dtype == torch.bfloat16 and on_cpu.features.dtype == torch.float16
    assert on_gpu.path != on_cpu.path
    assert torch.equal(on_gpu.features, extractor.extract(texts).features.bfloat16())
