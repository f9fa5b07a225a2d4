"""The baseline and source rows scripts/run_table.py launches (the +None rows with their own
papers' settings, the +Image rows of Tables 2-3, the MC-PTM rows of Table 4, the prototype
sources of Tables 5-6) compose from their configs, and each resolved config names the row it is
launched for, so `macsc report` files it in its cell; the +None rows train with their papers'
settings; modalities that share one frozen prototype source share its weights."""

from pathlib import Path

import pytest
import yaml

from macsc.analysis.runs import row_id
from macsc.cli import main
from macsc.method.network import MaCSCNetwork
from macsc.method.options import EnhancerOptions

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "scripts" / "table_rows.yaml").read_text())
ROW_OVERLAYS = (
    "baselines/",
    "tables/",
    "ablations/gaussian_prototypes",
    "ablations/trainable_extractors",
)


def overlays(row: dict, base: str) -> list[str]:
    """A row's overlays with its base config's: an entry may map base configs to files."""
    return [entry[base] if isinstance(entry, dict) else entry for entry in row.get("overlays", [])]


#: (row, column) -> overlays: each row's first column, and one column of every other base config
#: where the row's overlays depend on it
RUNS = {
    (row["row"], column): overlays(row, SPEC["columns"][column]["base"])
    for table in SPEC["tables"].values()
    for row in table["rows"]
    for column in {
        SPEC["columns"][c]["base"]: c
        for c in reversed(table["columns"])
        if c == table["columns"][0] or any(isinstance(e, dict) for e in row.get("overlays", []))
    }.values()
    if any(name.startswith(ROW_OVERLAYS) for name in overlays(row, SPEC["columns"][column]["base"]))
}
#: each baseline's own fine-tuning settings (SPEC 10) as its paper gives them: the batch in all
#: (the papers' sizes are totals), the learning rate (of a grid, the point the overlay holds),
#: epochs, weight decay, warm-up ratio, Adam epsilon (None: Adafactor has none)
PAPER_SETTINGS = {
    "baselines/glue/bert_base.yaml": (32, 2e-5, 3, 0.01, 0.1, 1e-6),  # Devlin et al. §4.1
    "baselines/squad/bert_base_v1.yaml": (32, 5e-5, 3, 0.01, 0.1, 1e-6),  # §4.2
    "baselines/squad/bert_base_v2.yaml": (48, 5e-5, 2, 0.01, 0.1, 1e-6),  # §4.3
    "baselines/glue/roberta_base.yaml": (32, 2e-5, 10, 0.1, 0.06, 1e-6),  # Liu et al. Table 10
    "baselines/squad/roberta_base.yaml": (48, 1.5e-5, 2, 0.01, 0.06, 1e-6),  # Table 10, SQuAD
    "baselines/squad/xlnet_large.yaml": (48, 3e-5, 3, 0.0, 0.125, 1e-6),  # Yang et al., SQuAD
    "baselines/commongen/t5_3b.yaml": (128, 1e-3, 3, 0.0, 0.0, None),  # Raffel et al. §3.1.2
}


@pytest.mark.parametrize(("row", "column"), sorted(RUNS), ids=lambda value: str(value))
def test_each_row_composes_and_its_config_names_the_row(row, column, capsys):
    setting = SPEC["columns"][column]
    names = [setting["base"], *setting.get("overlays", []), *RUNS[(row, column)]]
    configs = [
        item for name in names for item in ("--config", str(ROOT / "lightning_configs" / name))
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert row_id(config) == row
    baseline = next((name for name in names if name.startswith("baselines/")), None)
    if baseline is None:
        return
    optimizer, trainer = config["model"]["optimizer"], config["trainer"]
    total = config["data"]["init_args"]["batch_size"] * trainer["devices"]
    adam_epsilon = optimizer["adam_epsilon"] if optimizer["name"] == "adamw" else None
    resolved = (total, optimizer["learning_rate"], trainer["max_epochs"], optimizer["weight_decay"])
    assert (*resolved, optimizer["warmup_ratio"], adam_epsilon) == PAPER_SETTINGS[baseline]
    if row.startswith("t5-3b"):
        assert (optimizer["name"], optimizer["schedule"]) == ("adafactor", "constant")


def test_every_baseline_overlay_is_launched():
    folder = ROOT / "lightning_configs"
    shipped = {str(p.relative_to(folder)) for p in (folder / "baselines").rglob("*.yaml")}
    launched = {name for names in RUNS.values() for name in names}
    assert shipped == set(PAPER_SETTINGS) and shipped <= launched


def test_modalities_with_the_same_frozen_source_share_one_copy(tiny_backbone):
    shared = {"kind": "hf", "model_name": tiny_backbone, "k": 2}
    noise = {"kind": "gaussian", "dim": 4, "k": 2}
    network = MaCSCNetwork(
        tiny_backbone,
        ["text", "image", "audio", "video"],
        {"image": shared, "audio": dict(shared), "video": noise},
        enhancer=EnhancerOptions(heads=4),
    )
    extractors = network.extractors
    assert extractors["image"] is extractors["audio"]
    both = MaCSCNetwork(
        tiny_backbone,
        ["text", "image", "audio"],
        {"image": noise, "audio": noise},
        enhancer=EnhancerOptions(heads=4),
    ).extractors
    # noise with the same options is still one stream per modality (Table 5's control)
    assert both["image"] is not both["audio"]
    image, audio = (both[m].extract(["a sentence"]).features for m in ("image", "audio"))
    assert not image.equal(audio)
