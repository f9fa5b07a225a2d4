"""The `macsc` command end to end: configs parse, the demo trains, TensorBoard gets the weights,
checkpoints reload, DDP (gloo) runs, and bad input stops with one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from macsc.cli import main
from macsc.training.module import MaCSC

ROOT = Path(__file__).resolve().parents[2]
# experiment configs name their data module; overlays (cpu.yaml, ablations/, ...) do not
CONFIGS = sorted(
    p for p in (ROOT / "lightning_configs").glob("*.yaml") if "class_path" in p.read_text()
)
OVERLAYS = sorted(p for p in (ROOT / "lightning_configs").rglob("*.yaml") if p not in CONFIGS)
BASES = {"squad": "squad_v2.yaml", "commongen": "commongen.yaml"}
SMALL_PROTOTYPES = json.dumps(
    {
        "image": {"kind": "gaussian", "dim": 16, "k": 4},
        "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
        "video": {"kind": "gaussian", "dim": 16, "k": 4, "seed": 2},
    }
)


def demo_args(tiny_backbone: str, root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "lightning_configs" / "demo.yaml"),
        "--model.backbone",
        tiny_backbone,
        "--model.prototypes",
        SMALL_PROTOTYPES,
        "--model.enhancer.heads",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.batch_size",
        "16",
        *extra,
    ]


def event_tags(root: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in root.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        images |= set(accumulator.Tags()["images"])
    return scalars, images


def scalar_steps(root: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in root.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars(tag)]
    return steps


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_offline(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_overlay_composes_with_a_base_config(overlay, capsys):
    base = BASES.get(overlay.parent.name, "glue_sst2.yaml")
    if not (ROOT / "lightning_configs" / base).exists():
        pytest.skip(f"{base} not shipped")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "lightning_configs" / base),
                "--config",
                str(overlay),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("demo_run")
    assert main(["fit", *demo_args(tiny_backbone, root)]) == 0
    return root


def test_demo_fit_logs_modality_weights_to_tensorboard(demo_run):
    scalars, images = event_tags(demo_run)
    for modality in ("text", "image", "audio", "video"):
        assert f"weights/rho/{modality}" in scalars
    for pair in ("text->image", "image->audio", "video->text"):
        assert f"weights/pair/{pair}" in scalars
        assert f"loss/pair/{pair}" in scalars
    assert {
        "loss/total",
        "loss/wa",
        "loss/msb",
        "lr",
        "val/accuracy",
        "val/accuracy/image",
    } <= scalars
    assert {"weights/pi_z", "weights/W_fine"} <= images


def test_checkpoint_reloads_with_what_only_the_data_knew(demo_run):
    checkpoint = next(demo_run.rglob("last.ckpt"))
    model = MaCSC.load_from_checkpoint(checkpoint, map_location="cpu")
    assert model.spec.kind == "classification" and model.spec.num_labels == 2
    assert model.modalities == ["text", "image", "audio", "video"]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.objective.class_prior, state["objective.class_prior"])
    # the prior came from the demo's balanced training split (add-one smoothed)
    assert torch.allclose(model.objective.class_prior, torch.tensor([0.5, 0.5]))


def test_resume_with_ckpt_path_continues_the_run(demo_run, tiny_backbone, tmp_path):
    checkpoint = next(demo_run.rglob("last.ckpt"))
    saved_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    args = demo_args(
        tiny_backbone, tmp_path, "--trainer.max_steps", "6", "--ckpt_path", str(checkpoint)
    )
    assert main(["fit", *args]) == 0
    steps = scalar_steps(tmp_path, "loss/total")
    # it continued from the saved step instead of starting over, and ran to max_steps (6)
    assert saved_at > 0 and min(steps) == saved_at and max(steps) == 5, (saved_at, steps)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.modalities", "[text, smell]"], "unknown modality 'smell'"),
        (["--model.modalities", "[]"], "must start with 'text'"),
        (["--data.init_args.data_fraction", "1.5"], "data_fraction"),
        (
            ["--model.objective.weight_normalization", "rows"],
            "model.objective.weight_normalization: 'rows' is not one of balanced, batch, positives",
        ),
        (["--model.optimizer.name", "sgd"], "model.optimizer.name: 'sgd' is not one of adamw"),
    ],
)
def test_bad_options_stop_with_one_clear_line(tiny_backbone, tmp_path, capsys, extra, message):
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("macsc: error:") and message in err[-1]


@pytest.mark.parametrize(
    "option,suggestion",
    [
        (["--model.objective.lamda_msb", "0.3"], "did you mean 'model.objective.lambda_msb'?"),
        (["--model.no_such_option", "1"], "unknown option 'model.no_such_option'"),
        (["--data.init_args.batch_sise", "3"], "did you mean 'data.init_args.batch_size'?"),
        (
            ["--model.objective.lambda_msb", "abc"],
            "option 'model.objective.lambda_msb': expected float, got 'abc'",
        ),
    ],
)
def test_a_bad_option_is_one_line_naming_the_closest_key(
    tiny_backbone, tmp_path, capsys, option, suggestion
):
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, *option)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("macsc: error: ") and suggestion in err[0], err


def test_a_missing_backbone_folder_says_so(tiny_backbone, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, "--model.backbone", missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"macsc: error: model.backbone: the folder {missing!r} does not exist; give an "
        "existing folder in save_pretrained layout, or a hub name such as bert-base-uncased"
    )


def test_an_unlisted_modality_names_the_default_it_fell_back_to(tiny_backbone, tmp_path, capsys):
    only_image = '{"image": {"kind": "gaussian", "dim": 16, "k": 4}}'
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, "--model.prototypes", only_image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.prototypes has no entry for 'audio', so the paper's extractor" in err
    assert "--model.prototypes.audio '{kind: ...}' sets one modality" in err


def test_the_prototype_source_of_each_modality_is_logged(tiny_backbone, caplog):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio"],
        prototypes={"image": {"kind": "gaussian", "dim": 16}, "audio": {"kind": "gaussian"}},
        enhancer={"heads": 4},
    )
    with caplog.at_level("INFO"):
        model.setup("validate")
    assert (
        "prototype sources: image <- {kind: gaussian, dim: 16} (model.prototypes); "
        "audio <- {kind: gaussian} (model.prototypes)"
    ) in caplog.text


def test_a_typo_in_a_config_file_is_one_line_too(tiny_backbone, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  objective:\n    lamda_msb: 0.3\n")
    assert main(["fit", *demo_args(tiny_backbone, tmp_path, "--config", str(typo))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'model.objective.lambda_msb'?" in err[0]


@pytest.mark.parametrize("given", ["missing.yaml", "a_folder"])
def test_a_config_file_that_is_not_there_is_named(tmp_path, monkeypatch, capsys, given):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_folder").mkdir()
    demo = str(ROOT / "lightning_configs" / "demo.yaml")
    assert main(["fit", "--config", demo, "--config", given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    what = "does not exist" if given == "missing.yaml" else "is not a file"
    assert err == [
        f"macsc: error: option 'config': {str(tmp_path / given)!r} {what}; give the path of a "
        f"YAML file (relative to the current folder, {str(tmp_path)!r})"
    ]


def test_missing_data_file_names_it(tiny_backbone, tmp_path, capsys):
    config = tmp_path / "glue.yaml"
    config.write_text(
        "data:\n  class_path: tasks.glue.GLUEDataModule\n  init_args:\n    task: sst2\n"
        f"    data_files: {{train: {tmp_path}/missing_train.tsv, validation: {tmp_path}/dev.tsv}}\n"
    )
    args = [
        "--config",
        str(config),
        "--model.backbone",
        tiny_backbone,
        "--model.modalities",
        "[text]",
    ]
    args += [
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
    ]
    assert main(["fit", *args]) == 2
    assert "missing_train.tsv" in capsys.readouterr().err


def test_prototypes_command_fills_the_cache_ahead_of_training(tiny_backbone, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = demo_args(tiny_backbone, tmp_path, "--data.init_args.cache_dir", str(cache))
    assert main(["prototypes", *args]) == 0
    captured = capsys.readouterr()
    assert "args parameter is intended" not in captured.err
    # one entry per (modality, split, segment): 3 modalities x (train, validation) x 1 segment
    entries = sorted(cache.glob("*.protos"))
    assert len(entries) == 6, sorted(p.name for p in entries)
    # and the tokenised splits (train, validation), which prepare_data stores too
    assert len(list(cache.glob("*.tokens"))) == 2
    written = sum(p.stat().st_size for p in entries) / 2**20
    assert f"prototype cache {cache}: {written:.1f} MiB written" in captured.out
    assert "  image: 0 read from the cache, 2 extracted" in captured.out
    assert main(["prototypes", *args]) == 0  # again: every table is a hit
    out = capsys.readouterr().out
    assert "0.0 MiB written" in out and "  audio: 2 read from the cache, 0 extracted" in out
    # the cache off: nothing stored, and it says so (`false` is the boolean, not a folder name)
    off = demo_args(tiny_backbone, tmp_path, "--data.init_args.cache_dir", "false")
    assert main(["prototypes", *off]) == 0
    assert "prototypes extracted but not stored: the cache is off" in capsys.readouterr().out
    assert not (Path.cwd() / "false").exists()


def test_predict_writes_one_line_per_example_by_default(demo_run, tiny_backbone, tmp_path):
    checkpoint = next(demo_run.rglob("last.ckpt"))
    args = demo_args(tiny_backbone, tmp_path, "--ckpt_path", str(checkpoint))
    assert main(["predict", *args]) == 0
    (written,) = tmp_path.rglob("predictions-validation.jsonl")
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(200))  # the demo's validation split
    assert {line["prediction"] for line in lines} <= {"cool", "warm"}
    assert all(0.5 <= line["probability"] <= 1.0 for line in lines)  # of the chosen class
    assert lines[0]["text"].endswith(".") and lines[0]["gold"] in {"cool", "warm"}
    assert set(lines[0]["branches"]) == {"text", "image", "audio", "video"}
    assert not list(written.parent.glob("metrics-*.json"))  # nothing is scored in predict


def test_prototypes_verify_reports_each_file_ok_or_damaged(tiny_backbone, tmp_path, capsys):
    from macsc.prototypes import sampled_ranges

    cache = tmp_path / "cache"
    # image prototypes of the paper's shape: the train file (800 texts) is larger than the
    # sample that every open checks
    prototypes = json.loads(SMALL_PROTOTYPES) | {"image": {"kind": "gaussian", "dim": 512, "k": 8}}
    args = demo_args(tiny_backbone, tmp_path, "--data.init_args.cache_dir", str(cache))
    args += ["--model.prototypes", json.dumps(prototypes)]
    assert main(["prototypes", *args, "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nok ") == 6 and "6 prototype cache files checked: 6 ok, 0 damaged" in out

    largest = max(cache.glob("*.protos"), key=lambda p: p.stat().st_size)
    data_end = largest.stat().st_size - 800 * 8  # the mask follows the features
    sampled = [range(offset, offset + length) for offset, length in sampled_ranges(largest)]
    offset = next(o for o in range(4096, data_end, 4096) if not any(o in r for r in sampled))
    with open(largest, "r+b") as handle:  # damage the open does not see (it reads the sample)
        handle.seek(offset)
        handle.write(b"\xff\xff")
    assert main(["prototypes", *args, "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"damaged  {largest}: its data does not match the checksum" in out
    assert "6 prototype cache files checked: 5 ok, 1 damaged" in out

    # without a config: every file in the folder
    (cache / "image-old.protos").write_bytes(b"MACSC-PROTOTYPES\n" + b'{"format": 1}'.ljust(4079))
    assert main(["prototypes", "--verify", "--cache_dir", str(cache)]) == 1
    captured = capsys.readouterr()
    assert "7 prototype cache files checked: 5 ok, 1 damaged, 1 stale" in captured.out
    assert "stale    " in captured.out and "delete each damaged file" in captured.err


def test_ckpt_path_to_a_folder_or_a_yaml_file_names_what_it_is(
    demo_run, tiny_backbone, tmp_path, capsys
):
    folder = next(demo_run.rglob("last.ckpt")).parent
    assert main(["test", *demo_args(tiny_backbone, tmp_path, "--ckpt_path", str(folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and f"checkpoint {str(folder)!r} is a folder, not a checkpoint file" in err[0]
    )
    assert "last.ckpt" in err[0]  # what it holds
    hparams = next(demo_run.rglob("hparams.yaml"))
    assert main(["test", *demo_args(tiny_backbone, tmp_path, "--ckpt_path", str(hparams))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a YAML file (it starts" in err[0]
    assert "not a PyTorch checkpoint" in err[0] and "weights_only" not in err[0]


def test_default_root_dir_decides_where_runs_go(tiny_backbone, tmp_path):
    args = demo_args(tiny_backbone, tmp_path)
    at = args.index("--trainer.logger.init_args.save_dir")
    del args[at : at + 2]  # the config's save_dir: runs, relative
    root = tmp_path / "root"
    assert (
        main(["fit", *args, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1"])
        == 0
    )
    assert list(root.glob("runs/demo/version_0/checkpoints/*.ckpt"))


def test_a_failed_evaluation_leaves_no_empty_run_folder(demo_run, tiny_backbone, tmp_path, capsys):
    saved = torch.load(next(demo_run.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    del saved["state_dict"]["head.linear.bias"]  # fails when the weights load, after setup
    broken = tmp_path / "broken.ckpt"
    torch.save(saved, broken)
    runs = tmp_path / "runs"
    args = demo_args(tiny_backbone, runs, "--ckpt_path", str(broken))
    assert main(["validate", *args]) == 2
    assert "missing keys ['head.linear.bias']" in capsys.readouterr().err
    assert not list(runs.glob("demo/version_*"))


def test_your_own_table_data_through_a_config(tiny_backbone, tmp_path):
    """The README's "your own data": a table with your columns and label names, no code."""
    rows = "review\tstars\nthe food was great\tgood\nawful service\tbad\nlovely place\tgood\n"
    (tmp_path / "train.tsv").write_text(rows + "never again\tbad\n")
    (tmp_path / "dev.tsv").write_text(rows)
    own = tmp_path / "own.yaml"
    own.write_text(
        "data:\n  class_path: tasks.glue.TableDataModule\n  init_args:\n"
        "    table_format: {name: reviews, segments: [[review]], label_columns: [stars],"
        " label_names: [bad, good]}\n"
        f"    data_files: {{train: {tmp_path}/train.tsv, validation: {tmp_path}/dev.tsv}}\n"
        "    batch_size: 2\n"
    )
    args = demo_args(tiny_backbone, tmp_path / "runs", "--config", str(own))
    args += ["--trainer.max_steps", "2", "--trainer.val_check_interval", "null"]
    args += ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping"]
    args += ["--trainer.callbacks.monitor", "val/accuracy", "--trainer.callbacks.mode", "max"]
    assert main(["fit", *args]) == 0
    (summary,) = (tmp_path / "runs").rglob("metrics-validation.json")
    assert json.loads(summary.read_text())["task"] == "reviews"
    records = [
        json.loads(line) for line in (summary.parent / "predictions-validation.jsonl").open()
    ]
    assert {r["gold"] for r in records} == {"good", "bad"} and records[0][
        "text"
    ] == "the food was great"


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """`macsc report --list-rows | head`: the reader closes the pipe; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` has exited
    try:
        done = subprocess.run(
            [sys.executable, "-m", "macsc.cli", "report", "--list-rows"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 141, (done.returncode, done.stderr)
