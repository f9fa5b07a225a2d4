"""The baseline and source rows scripts/run_table.py launches (the +Image rows of Tables 2-3,
the MC-PTM rows of Table 4, the prototype sources of Tables 5-6) compose from their configs,
and each resolved config names the row it is launched for, so `macsc report` files it in its
cell; modalities that share one frozen prototype source share its weights."""

from pathlib import Path

import pytest
import yaml

from macsc.cli import main
from macsc.network import MaCSCNetwork
from macsc.runs import row_id

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "scripts" / "table_rows.yaml").read_text())
ROW_OVERLAYS = ("tables/", "ablations/gaussian_prototypes", "ablations/trainable_extractors")
RUNS = {
    (row["row"], table["columns"][0]): row["overlays"]
    for table in SPEC["tables"].values()
    for row in table["rows"]
    if any(name.startswith(ROW_OVERLAYS) for name in row.get("overlays", []))
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


def test_modalities_with_the_same_frozen_source_share_one_copy(tiny_backbone):
    shared = {"kind": "hf", "model_name": tiny_backbone, "k": 2}
    noise = {"kind": "gaussian", "dim": 4, "k": 2}
    network = MaCSCNetwork(
        tiny_backbone,
        ["text", "image", "audio", "video"],
        {"image": shared, "audio": dict(shared), "video": noise},
        enhancer_heads=4,
    )
    extractors = network.extractors
    assert extractors["image"] is extractors["audio"]
    both = MaCSCNetwork(
        tiny_backbone,
        ["text", "image", "audio"],
        {"image": noise, "audio": noise},
        enhancer_heads=4,
    ).extractors
    # noise with the same options is still one stream per modality (Table 5's control)
    assert both["image"] is not both["audio"]
    image, audio = (both[m].extract(["a sentence"]).features for m in ("image", "audio"))
    assert not image.equal(audio)
