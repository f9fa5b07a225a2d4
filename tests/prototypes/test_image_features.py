"""The "+Image" rows (SPEC 14): features of retrieved images per example, read from a folder
per split in place of the image prototypes, by example id; the script that writes them with
open_clip's image tower; and a short fit through the CLI with a folder the test writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from macsc.cli import main
from macsc.cli.lightning import run_lightning
from macsc.errors import ConfigError, DataError
from macsc.prototypes import (
    ImageFeatureSource,
    build_extractor,
    read_image_features,
    write_image_features,
)
from tasks.commongen import CommonGenDataModule
from tasks.squad import SquadDataModule

ROOT = Path(__file__).resolve().parents[2]


def tokenizer_path() -> str:
    from tests.conftest import minilm_path

    return str(minilm_path())


def random_features(count: int, images: int = 3, width: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, images, width)).astype(np.float32)


def test_the_folder_round_trips_and_is_memory_mapped(tmp_path):
    ids = ["q7", 12, "dog#frisbee#catch"]
    features = random_features(3).astype(np.float16)
    mask = np.array([[True, True, False], [True, False, False], [True, True, True]])
    write_image_features(tmp_path, ids, features, mask)
    stored = read_image_features(tmp_path)
    assert stored.ids == ["q7", "12", "dog#frisbee#catch"]
    assert json.loads((tmp_path / "ids.json").read_text()) == ids  # stored as given
    assert stored.features.dtype == torch.float16
    assert np.array_equal(stored.features.numpy(), features)
    assert np.array_equal(stored.mask.numpy(), mask)
    # mapped, not loaded: a change written to the file afterwards shows through the tensor
    writable = np.load(tmp_path / "features.npy", mmap_mode="r+")
    writable[1, 0, 0] = 42.0
    writable.flush()
    assert float(stored.features[1, 0, 0]) == 42.0
    # without a mask every image is real
    write_image_features(tmp_path / "plain", ids, features)
    assert read_image_features(tmp_path / "plain").mask.all()


def test_rows_are_found_by_id_whatever_the_order(tmp_path):
    features = random_features(4)
    write_image_features(tmp_path / "validation", ["d", "b", "a", "c"], features)
    source = build_extractor("image_features", files=str(tmp_path / "{split}"), dim=8)
    table = source.table("validation", "task", ["a", "b", "c", "d", "a"])
    looked_up = table.lookup([0, 1, 2, 3, 4]).features
    expected = features[[2, 1, 3, 0, 2]]
    assert np.array_equal(looked_up.numpy(), expected)
    # ints in the split match the text the folder names hold
    write_image_features(tmp_path / "train", ["0", "1"], random_features(2))
    assert source.table("train", "task", [1, 0]).rows.tolist() == [1, 0]


def test_a_missing_id_or_a_wrong_width_is_named(tmp_path):
    write_image_features(tmp_path / "sst2" / "validation", [0, 1, 2], random_features(3))
    source = ImageFeatureSource(files=str(tmp_path / "{task}" / "{split}"), dim=8)
    with pytest.raises(DataError, match=r"no row for example id '7'.*'validation' split"):
        source.table("validation", "sst2", [0, 7, 1])
    with pytest.raises(DataError, match="width 8.*dim: 16.*set dim: 8"):
        ImageFeatureSource(files=str(tmp_path / "{task}" / "{split}"), dim=16).table(
            "validation", "sst2", [0]
        )
    with pytest.raises(DataError, match="no features.npy"):
        source.table("train", "sst2", [0])
    per_split = ImageFeatureSource(files={"train": str(tmp_path)}, dim=8)
    with pytest.raises(ConfigError, match="no folder for the 'validation' split.*files.validation"):
        per_split.table("validation", "sst2", [0])
    with pytest.raises(DataError, match="repeat"):
        write_image_features(tmp_path / "dup", ["a", "a"], random_features(2))
    with pytest.raises(ConfigError, match="not extracted from text"):
        source.extract(["a sentence"])


def squad_file(path: Path) -> str:
    filler = " ".join(f"Sentence {i} is filler." for i in range(8))
    context = f"Denver Broncos won Super Bowl 50. {filler} The capital of France is Paris."
    qas = [
        {"id": qid, "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
        for qid, q, a in (
            ("q-paris", "What is the capital of France?", "Paris"),
            ("q-bowl", "Who won Super Bowl 50?", "Denver Broncos"),
        )
    ]
    data = [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]
    path.write_text(json.dumps({"version": "v1.1", "data": data}))
    return str(path)


def commongen_file(path: Path) -> str:
    rows = [
        {"concepts": ["dog", "frisbee", "catch"], "target": "A dog catches a frisbee."},
        {"concepts": ["dog", "frisbee", "catch"], "target": "The dog caught the frisbee."},
        {"concepts": ["apple", "tree", "pick"], "target": "She picks an apple from the tree."},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("task", ["squad", "commongen"])
def test_squad_questions_and_commongen_concept_sets_get_their_own_images(task, tmp_path):
    """The collator gathers each item's features by its example id: SQuAD by question (every
    window of a question gets its images), CommonGen by concept set (every reference pair)."""
    if task == "squad":
        path = squad_file(tmp_path / "squad.json")
        data = SquadDataModule(
            version="1.1",
            data_files={"train": path, "validation": path},
            max_length=24,
            doc_stride=8,
            max_question_length=10,
            batch_size=64,
        )
        ids = ["q-bowl", "q-paris"]
    else:
        path = commongen_file(tmp_path / "train.jsonl")
        data = CommonGenDataModule(data_files={"train": path, "validation": path}, batch_size=64)
        ids = ["apple#tree#pick", "dog#frisbee#catch"]
    features = random_features(2)
    # one folder for both splits (their ids are the same here)
    write_image_features(tmp_path / data.task, ids, features)
    source = ImageFeatureSource(files=str(tmp_path / "{task}"), dim=8)
    data.connect(tokenizer_path(), {"image": source}, ["text", "image"])
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    split_ids = data._texts["train"].ids
    item_ids = [split_ids[i] for i in batch["example_index"].tolist()]
    assert len(item_ids) > len(set(item_ids))  # several items share one example's images
    gathered = batch["prototypes"]["image"]["features"]
    for row, name in enumerate(item_ids):
        assert torch.equal(gathered[row], torch.from_numpy(features[ids.index(name)]))
    assert data.prototype_tables() == {}  # a features folder is no prototype cache


def demo_ids(count: int) -> list[int]:
    return list(range(count))  # the demo TSVs have no id column: ids are the rows' positions


def test_a_short_fit_reads_the_features_by_id(tiny_backbone, tmp_path):
    """The demo task with the +Image overlay and features the test writes: each batch carries
    the features of its examples' ids (positions in the file, kept by a data_fraction subset),
    and the image branch trains."""
    folder = tmp_path / "features"
    train, validation = random_features(800, seed=1), random_features(200, seed=2)
    # the train folder in reverse order: rows are found by id, not by position
    write_image_features(folder / "demo" / "train", demo_ids(800)[::-1], train[::-1])
    write_image_features(folder / "demo" / "validation", demo_ids(200), validation)
    source = {"kind": "image_features", "files": str(folder / "{task}" / "{split}"), "dim": 8}
    args = [
        "--config",
        str(ROOT / "lightning_configs" / "demo.yaml"),
        "--config",
        str(ROOT / "lightning_configs" / "tables" / "image_features.yaml"),
        "--model.backbone",
        tiny_backbone,
        "--model.prototypes",
        json.dumps({"image": source}),
        "--model.enhancer.heads",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.data_fraction",
        "0.1",
    ]
    cli = run_lightning(args, run=False)
    assert cli.model.modalities == ["text", "image"]
    data = cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    positions = [data._texts["train"].ids[i] for i in batch["example_index"].tolist()]
    assert max(positions) >= 80  # ids are positions in the whole file, not in the subset
    expected = torch.from_numpy(train[positions])
    assert torch.equal(batch["prototypes"]["image"]["features"], expected)
    assert main(["fit", *args]) == 0
    (metrics,) = (tmp_path / "runs").rglob("metrics-validation.json")
    assert "accuracy/image" in json.loads(metrics.read_text())["metrics"]


@pytest.fixture(scope="module")
def image_script():
    spec = importlib.util.spec_from_file_location(
        "image_features_script", ROOT / "scripts" / "image_features.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_encodes_each_examples_images_with_the_image_tower(
    image_script, tmp_path, capsys
):
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    from PIL import Image

    name = "macsc-test-tiny-vision"
    _MODEL_CONFIGS[name] = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    counts = {"q1": 3, "q2": 1}
    for qid, count in counts.items():
        (images / qid).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / qid / f"{i}.png")
    ids = tmp_path / "ids.txt"
    ids.write_text("q2\nq1\nq3\n")  # q3 has no folder: a row without images
    out = tmp_path / "features"
    code = image_script.main(
        [str(images), str(out), "--ids", str(ids), "--images-per-example", "2", "--model", name,
         "--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "float32"]
    )  # fmt: skip
    assert code == 0 and "3 examples x 2 images x 16" in capsys.readouterr().out
    stored = read_image_features(out)
    assert stored.ids == ["q2", "q1", "q3"]
    assert stored.mask.tolist() == [[True, False], [True, True], [False, False]]
    model.eval()
    with torch.no_grad():
        for row, qid in ((0, "q2"), (1, "q1")):
            files = sorted((images / qid).iterdir())[:2]
            pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
            expected = model.encode_image(pixels)
            torch.testing.assert_close(stored.features[row, : len(files)], expected)
    assert not stored.features[2].any()
