"""Issue 21: a trained model taken out of macsc. The demo is trained a few steps through the CLI,
scored by `macsc validate` and exported; the exported folder then predicts what the checkpoint
predicted, from Python and from the command line, with no pickle read, and a damaged weights
file is one clear line."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from macsc.cli import main
from macsc.errors import CheckpointError, ConfigError
from tests.cli.test_cli import demo_args
from tests.cli.test_squad_cli import QAS, squad_args, squad_json
from tests.method.test_text_tower import demo_args as tower_args
from tests.method.test_text_tower import tiny_clip  # noqa: F401  (the fixture, shared)

ROOT = Path(__file__).resolve().parents[2]


def validated_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions-validation.jsonl").open()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_backbone):
    """(run folder, exported folder) of a demo trained 4 steps, its best.ckpt validated."""
    root = tmp_path_factory.mktemp("export")
    args = demo_args(tiny_backbone, root)
    assert main(["fit", *args]) == 0
    (run,) = root.glob("demo/version_*")
    best = run / "checkpoints" / "best.ckpt"
    assert main(["validate", *args, "--ckpt_path", str(best)]) == 0
    assert main(["export", str(run), str(root / "exported")]) == 0
    return run, root / "exported"


def test_the_exported_model_predicts_what_its_checkpoint_validated(demo):
    from macsc import MaCSC

    run, folder = demo
    expected = validated_records(run)  # written by `macsc validate --ckpt_path best.ckpt`
    assert len(expected) == 128  # the two validation batches demo_args allows
    model = MaCSC.from_pretrained(folder)
    assert not model.training
    records = model.predict([record["text"] for record in expected], batch_size=16)
    assert [r["id"] for r in records] == list(range(len(expected)))
    for got, want in zip(records, expected, strict=True):
        assert got["text"] == want["text"]
        assert got["prediction"] == want["prediction"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert set(got["probabilities"]) == {"cool", "warm"}
        assert sum(got["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert got["probabilities"][want["prediction"]] == pytest.approx(
            want["probability"], abs=1e-5
        )
        assert "gold" not in got and "branches" not in got
    with_branches = model.predict([expected[0]["text"]], branches=True)[0]
    assert with_branches["branches"] == expected[0]["branches"]
    for name, probabilities in with_branches["branch_probabilities"].items():
        assert max(probabilities, key=probabilities.get) == expected[0]["branches"][name]


def test_the_folder_holds_no_pickle_and_loads_without_one(demo, monkeypatch):
    from macsc import MaCSC

    run, folder = demo
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted(
        [
            "README.md",
            "config.json",
            "macsc.json",
            "macsc.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = MaCSC.from_pretrained(folder)
    expected = validated_records(run)[:3]
    records = model.predict([record["text"] for record in expected], cache_dir=False)
    assert [r["prediction"] for r in records] == [r["prediction"] for r in expected]


def test_macsc_json_says_what_rebuilds_the_model(demo):
    run, folder = demo
    manifest = json.loads((folder / "macsc.json").read_text())
    assert manifest["format"] == "macsc-export" and manifest["format_version"] == 1
    assert manifest["model"]["task"]["label_names"] == ["cool", "warm"]
    assert manifest["model"]["modalities"] == ["text", "image", "audio", "video"]
    assert manifest["model"]["enhancer"]["heads"] == 4  # the option groups as plain data
    # Gaussian sources keep what reproduces their noise: seed and the modality's stream
    audio = manifest["prototypes"]["audio"]
    assert audio["options"] == {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1, "stream": "audio"}
    assert audio["identity"]["stream"] == "audio" and audio["trainable"] is False
    assert manifest["data"]["class_path"] == "tasks.demo.DemoDataModule"
    assert manifest["data"]["init_args"]["max_length"] == 64
    assert "cache_dir" not in manifest["data"]["init_args"]  # the exporter's folder, not ours
    assert manifest["inputs"]["fields"] == ["sentence"]
    assert manifest["checkpoint"]["path"].endswith("checkpoints/best.ckpt")


def test_the_model_card_parses_and_names_the_metrics_and_weights(demo):
    run, folder = demo
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "macsc" and meta["pipeline_tag"] == "text-classification"
    assert "base_model" not in meta  # the backbone is a local folder, not a hub name
    validated = json.loads((run / "metrics-validation.json").read_text())["metrics"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "validation"
    (metric,) = result["metrics"]
    assert metric["type"] == "accuracy"
    assert metric["value"] == pytest.approx(validated["accuracy"], abs=1e-6)
    # rho as the softmax of the checkpoint's logits, and pi_z's rows, written out by hand
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    rho = torch.softmax(state["objective.rho_logits"].float(), 0)
    for name, value in zip(["text", "image", "audio", "video"], rho.tolist(), strict=True):
        assert f"  {name.ljust(5)}  {value:.4f}" in card
    z = state["objective.calibration.z"].float()
    row = torch.softmax(z[0, 1:], 0)  # anchor text over image, audio, video
    assert " ".join(f"{v:.4f}" for v in row.tolist()) in " ".join(card.split())
    assert 'MaCSC.from_pretrained("exported")' in card and "macsc infer exported" in card


def test_infer_prints_one_json_line_per_input(demo, tmp_path, capsys):
    run, folder = demo
    expected = validated_records(run)[:3]
    capsys.readouterr()
    texts = [arg for record in expected[:2] for arg in ("--text", record["text"])]
    assert main(["infer", str(folder), *texts, "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prediction"] for line in lines] == [r["prediction"] for r in expected[:2]]
    assert [line["text"] for line in lines] == [r["text"] for r in expected[:2]]

    inputs = tmp_path / "inputs.jsonl"
    rows = [
        {"id": "first", "sentence": expected[0]["text"]},
        expected[1]["text"],
        [expected[2]["text"]],
    ]
    inputs.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert main(["infer", str(folder), "--input", str(inputs), "--branches"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ["first", 1, 2]
    assert [line["prediction"] for line in lines] == [r["prediction"] for r in expected]
    assert lines[0]["branches"] == expected[0]["branches"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine"}\n{"text": "no sentence field"}\n')
    assert main(["infer", str(folder), "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "input 1" in err and '"sentence": ...' in err


def damaged_copy(folder: Path, to: Path, change) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(folder, to)
    state = load_file(str(to / "macsc.safetensors"))
    change(state)
    save_file(state, str(to / "macsc.safetensors"))
    return to


def test_a_wrong_shape_or_a_missing_key_is_one_clear_line(demo, tmp_path, capsys):
    from macsc import MaCSC

    run, folder = demo
    reshaped = damaged_copy(
        folder,
        tmp_path / "reshaped",
        lambda state: state.update({"head.linear.weight": torch.zeros(4, 3, 32)}),
    )
    with pytest.raises(CheckpointError) as error:
        MaCSC.from_pretrained(reshaped)
    message = str(error.value)
    assert "\n" not in message and "macsc.safetensors" in message
    assert "head.linear.weight (4, 3, 32) (expected (4, 2, 32))" in message

    missing = damaged_copy(
        folder, tmp_path / "missing", lambda state: state.pop("objective.rho_logits")
    )
    capsys.readouterr()
    assert main(["infer", str(missing), "--text", "A ripe lemon."]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("macsc: error: ")
    assert "missing keys ['objective.rho_logits']" in err

    shutil.copytree(folder, tmp_path / "broken")
    (tmp_path / "broken" / "macsc.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        MaCSC.from_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json .* beside macsc.json"):
        MaCSC.from_pretrained(tmp_path / "broken")
    with pytest.raises(CheckpointError, match="holds no macsc.json: it is not an exported"):
        MaCSC.from_pretrained(run)


def test_an_export_with_one_enhancer_per_modality_loads_and_predicts_the_same(demo, tmp_path):
    """A folder exported before the enhancers were stacked holds each modality's enhancer
    tensors under ``network.enhancers.<m>.*``; it loads into today's stacked layout."""
    from macsc import MaCSC

    run, folder = demo
    model = MaCSC.from_pretrained(folder)
    enhancers = model.network.enhancers

    def per_modality(state):
        for key in [k for k in state if k.startswith("network.enhancers.")]:
            del state[key]
        for name in model.modalities[1:]:
            for key, value in enhancers.parameters_of(name).items():
                state[f"network.enhancers.{name}.{key}"] = value.detach().clone()

    old = damaged_copy(folder, tmp_path / "per_modality", per_modality)
    with safe_open(str(old / "macsc.safetensors"), framework="pt") as handle:
        assert "network.enhancers.image.project.weight" in handle.keys()
    texts = [record["text"] for record in validated_records(run)[:16]]
    assert MaCSC.from_pretrained(old).predict(texts) == model.predict(texts)


def test_shared_tensors_are_stored_once_and_restored_under_every_name(tmp_path):
    from macsc.inference.folder import read_weights, write_weights

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"a.weight": weight, "b.weight": weight, "c.bias": weight[0], "d": torch.ones(2)}
    assert write_weights(state, tmp_path / "w.safetensors") == 3
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["a.weight", "c.bias", "d"]
    loaded = read_weights(tmp_path / "w.safetensors", state, "the test model")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_export_refuses_a_full_folder_and_a_checkpoint_without_its_config(demo, tmp_path, capsys):
    run, folder = demo
    lone = tmp_path / "lone.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    capsys.readouterr()
    assert main(["export", str(lone), str(tmp_path / "out")]) == 2
    assert "pass --config with the config it was trained with" in capsys.readouterr().err
    assert main(["export", str(run), str(folder)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(run), str(run), "--overwrite"]) == 2  # not an export: kept
    assert "is not a folder macsc export wrote" in capsys.readouterr().err
    assert (run / "checkpoints" / "best.ckpt").is_file()
    before = load_file(str(folder / "macsc.safetensors"))
    assert main(["export", str(run), str(folder), "--overwrite"]) == 0  # an export: replaced
    after = load_file(str(folder / "macsc.safetensors"))
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    config = run / "config.yaml"
    assert main(["export", str(lone), str(tmp_path / "out"), "--config", str(config)]) == 0
    manifest = json.loads((tmp_path / "out" / "macsc.json").read_text())
    assert (
        manifest["checkpoint"]["run"] is None
        and manifest["checkpoint"]["chosen"] == "the file given"
    )
    assert not list(tmp_path.glob(".out.partial-*"))


def test_predict_needs_an_exported_model(demo):
    from macsc import MaCSC

    run, _ = demo
    model = MaCSC.load_from_checkpoint(run / "checkpoints" / "best.ckpt")
    with pytest.raises(ConfigError, match="MaCSC.from_pretrained"):
        model.predict(["A lemon."])


def test_importing_macsc_stays_cheap_and_gives_the_model_on_demand():
    code = (
        "import sys, macsc; cheap = 'lightning' not in sys.modules; "
        "from macsc import MaCSC; print(cheap, hasattr(MaCSC, 'from_pretrained'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.split() == ["True", "True"]


def test_squad_answers_question_context_pairs_at_the_exported_threshold(tiny_backbone, tmp_path):
    from macsc import MaCSC

    data = squad_json(tmp_path / "squad.json")
    args = squad_args(tiny_backbone, tmp_path, data)
    assert main(["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]) == 0
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    assert main(["validate", *args, f"--ckpt_path={checkpoint}"]) == 0
    (run,) = (tmp_path / "runs").glob("*/version_*")
    threshold = json.loads((run / "metrics-validation.json").read_text())["metrics"][
        "best_f1_thresh"
    ]
    expected = {r["id"]: r for r in validated_records(run)}  # answered at best_f1_thresh
    assert main(["export", str(checkpoint), str(tmp_path / "qa")]) == 0
    manifest = json.loads((tmp_path / "qa" / "macsc.json").read_text())
    assert manifest["data"]["init_args"]["null_threshold"] == threshold
    assert manifest["inputs"]["fields"] == ["question", "context"]

    model = MaCSC.from_pretrained(tmp_path / "qa")
    pairs = [(question, context) for context, question, _ in QAS.values()]
    records = model.predict(pairs, branches=True)
    assert [r["id"] for r in records] == ["0", "1", "2"]
    for record, qid in zip(records, QAS, strict=True):
        assert record["prediction"] == expected[qid]["prediction"]
        assert record["null_odds"] == pytest.approx(expected[qid]["null_odds"], abs=1e-4)
        assert (record["prediction"] == "") == (record["null_odds"] > threshold)
        assert set(record["branches"]) == {"text", "image"}


def test_commongen_generates_from_concept_sets_as_its_checkpoint_did(tiny_t5, tmp_path):
    """Generation falls out too: a T5 (tied embeddings: stored once) writes for each concept
    set the sentence `macsc predict` wrote with the checkpoint."""
    from macsc import MaCSC

    sets = [["dog", "frisbee", "catch"], ["cat", "sofa", "sleep"], ["kid", "ball", "kick"]]
    data = tmp_path / "commongen.jsonl"
    data.write_text(
        "".join(json.dumps({"concepts": c, "target": " ".join(c)}) + "\n" for c in sets)
    )
    args = [
        "--config",
        str(ROOT / "lightning_configs" / "commongen.yaml"),
        "--config",
        str(ROOT / "lightning_configs" / "cpu.yaml"),
        f"--model.backbone={tiny_t5}",
        "--model.modalities=[text, image]",
        '--model.prototypes={"image": {"kind": "gaussian", "dim": 16, "k": 4}}',
        "--model.enhancer.heads=4",
        '--model.head_options={"num_beams": 2, "max_new_tokens": 6}',
        f"--data.init_args.data_files={json.dumps({'train': str(data), 'validation': str(data)})}",
        "--data.init_args.predict_on=validation",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
    ]
    assert main(["fit", *args]) == 0
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    assert main(["predict", *args, f"--ckpt_path={checkpoint}"]) == 0
    (written,) = (tmp_path / "runs").rglob("predictions-validation.jsonl")
    expected = [json.loads(line)["prediction"] for line in written.read_text().splitlines()]
    assert main(["export", str(checkpoint), str(tmp_path / "gen")]) == 0
    with safe_open(str(tmp_path / "gen" / "macsc.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    assert "network.backbone.shared.weight" in stored
    assert "network.backbone.decoder.embed_tokens.weight" not in stored  # the same tensor
    model = MaCSC.from_pretrained(tmp_path / "gen")
    records = model.predict([sets[0], " ".join(sets[1]), {"concepts": sets[2], "id": "kid"}])
    assert [r["prediction"] for r in records] == expected
    assert [r["id"] for r in records] == ["0", "1", "kid"]


def test_a_text_tower_model_exports_without_a_backbone_config(tiny_clip, tmp_path):  # noqa: F811
    """The MC-PTM baselines (SPEC 13): the tower is the encoder, rebuilt from its options (its
    published file must be at hand) with every weight, the fine-tuned tower's too, from
    macsc.safetensors; the data is tokenised by the tower's own BPE."""
    from macsc import MaCSC

    _, path = tiny_clip
    assert main(["fit", *tower_args(path, tmp_path)]) == 0
    (checkpoint,) = tmp_path.rglob("last.ckpt")  # step 3, which the fit's validation scored
    expected = validated_records(checkpoint.parent.parent)
    assert main(["export", str(checkpoint), str(tmp_path / "tower")]) == 0
    assert not (tmp_path / "tower" / "config.json").exists()
    model = MaCSC.from_pretrained(tmp_path / "tower")
    records = model.predict([record["text"] for record in expected])
    assert [r["prediction"] for r in records] == [r["prediction"] for r in expected]
    for got, want in zip(records, expected, strict=True):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


def test_a_regression_table_of_sentence_pairs_scores_pairs(tiny_backbone, tmp_path, capsys):
    """Your own table (README "Your own data"): two text segments and a score; the exported
    format reads `--pair FIRST SECOND` and gives the score `macsc validate` gave."""
    rows = [(f"a cat number {i}", f"a {'cat' if i % 2 else 'dog'} here", i % 6) for i in range(24)]
    table = tmp_path / "pairs.csv"
    table.write_text("left,right,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    own = tmp_path / "own.yaml"
    own.write_text(
        "data:\n  class_path: tasks.glue.TableDataModule\n  init_args:\n"
        "    table_format:\n      name: pairs\n      segments: [[left], [right]]\n"
        "      label_columns: [score]\n      label_bins: [0, 1, 2, 3, 4, 5]\n"
        "      metrics: [spearman, pearson]\n"
        f"    data_files: {{train: {table}, validation: {table}}}\n"
    )
    args = [
        "--config",
        str(ROOT / "lightning_configs" / "glue_sst2.yaml"),
        "--config",
        str(ROOT / "lightning_configs" / "cpu.yaml"),
        "--config",
        str(own),
        "--model.backbone",
        tiny_backbone,
        "--model.modalities=[text, image]",
        '--model.prototypes={"image": {"kind": "gaussian", "dim": 16, "k": 4}}',
        "--model.enhancer.heads=4",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
    ]
    assert main(["fit", *args]) == 0
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    assert (
        main(["validate", *args, "--trainer.limit_val_batches=1", f"--ckpt_path={checkpoint}"]) == 0
    )
    expected = validated_records(checkpoint.parent.parent)[:3]
    assert main(["export", str(checkpoint), str(tmp_path / "pairs")]) == 0
    manifest = json.loads((tmp_path / "pairs" / "macsc.json").read_text())
    assert manifest["inputs"]["fields"] == ["left", "right"]
    assert manifest["data"]["init_args"]["data_files"] == {}  # the exporter's files stay home
    capsys.readouterr()
    pairs = [arg for record in expected for arg in ("--pair", *record["text"])]
    assert main(["infer", str(tmp_path / "pairs"), *pairs, "--branches"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == [record["text"] for record in expected]
    for line, record in zip(lines, expected, strict=True):
        assert line["prediction"] == pytest.approx(record["prediction"], abs=1e-5)
        assert line["branches"] == pytest.approx(record["branches"], abs=1e-5)
        assert "probabilities" not in line
