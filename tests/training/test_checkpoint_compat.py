"""Checkpoints written before the model was split into network, heads and objective still load,
and their optimizer state still pairs with the same parameters."""

from pathlib import Path

import torch

from macsc.training.checkpoints import upgrade_state_dict
from macsc.training.module import MaCSC
from macsc.training.optim import OptimizerOptions, build_optimizer

LEGACY = Path(__file__).parents[1] / "data" / "legacy_state_dict_keys.txt"


def legacy_layout() -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) in the order macsc 0.1 wrote them (read from that version's own output)."""
    rows = []
    for line in LEGACY.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, *shape = line.split(" ")
        rows.append((key, tuple(int(n) for n in shape if n)))
    return rows


def today_model(backbone: str) -> MaCSC:
    return MaCSC(
        backbone=backbone,
        modalities=["text", "image", "audio"],
        prototypes={
            "image": {"kind": "gaussian", "dim": 16, "k": 4},
            "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
        },
        task={"kind": "classification", "num_labels": 3},
        enhancer={"heads": 4},
    )


def test_every_legacy_key_maps_onto_todays_model_with_its_shape(tiny_backbone):
    model = today_model(tiny_backbone)
    state = model.state_dict()
    legacy = legacy_layout()
    upgraded = upgrade_state_dict({key: torch.zeros(shape) for key, shape in legacy})
    assert sorted(upgraded) == sorted(state)  # one to one: nothing lost, nothing left over
    for key, value in upgraded.items():
        assert value.shape == state[key].shape, key


def test_a_legacy_state_dict_loads_with_its_values(tiny_backbone):
    source = today_model(tiny_backbone)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.uniform_(-1, 1)
    state = source.state_dict()
    legacy_keys = [key for key, _ in legacy_layout()]
    # the same values under macsc 0.1's names (the names come from that version's output)
    upgraded = upgrade_state_dict(dict.fromkeys(legacy_keys))
    inverse = dict(zip(upgraded, legacy_keys, strict=True))
    old_state = {inverse[key]: value for key, value in state.items()}
    target = today_model(tiny_backbone)
    target.load_state_dict(old_state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_optimizer_groups_keep_their_legacy_order_so_saved_states_pair_up(tiny_backbone):
    """AdamW's saved state is a list per parameter group: a parameter must keep its position
    in its group (macsc 0.1 put rho first among the module's parameters, before the backbone,
    which does not matter because rho and Z form a group of their own)."""
    model = today_model(tiny_backbone)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    legacy = list(upgrade_state_dict(dict.fromkeys(key for key, _ in legacy_layout())))
    optimizer = build_optimizer(model, OptimizerOptions())
    for group in optimizer.param_groups:
        members = [names[id(parameter)] for parameter in group["params"]]
        assert members == [key for key in legacy if key in set(members)]
