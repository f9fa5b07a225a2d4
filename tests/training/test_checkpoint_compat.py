"""Checkpoints written before the model was split into network, heads and objective still load,
and their optimizer state still pairs with the same parameters."""

import json
from pathlib import Path

import pytest
import torch

from macsc.errors import CheckpointError
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


def legacy_value(model: MaCSC, key: str) -> torch.Tensor:
    """What macsc 0.1 held under ``key`` for ``model``'s weights: its enhancers were one
    module per modality (``enhancers.<m>.<name>``), the rest is renamed."""
    if key.startswith("enhancers."):
        modality, _, name = key[len("enhancers.") :].partition(".")
        return model.network.enhancers.parameters_of(modality)[name]
    (today,) = upgrade_state_dict({key: None})
    return model.state_dict()[today]


def test_a_legacy_state_dict_loads_with_its_values(tiny_backbone):
    source = today_model(tiny_backbone)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.uniform_(-1, 1)
    state = source.state_dict()
    # the same values under macsc 0.1's names (the names come from that version's output)
    old_state = {key: legacy_value(source, key).clone() for key, _ in legacy_layout()}
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
    legacy = list(upgrade_state_dict({key: torch.zeros(shape) for key, shape in legacy_layout()}))
    optimizer = build_optimizer(model, OptimizerOptions())
    for group in optimizer.param_groups:
        members = [names[id(parameter)] for parameter in group["params"]]
        assert members == [key for key in legacy if key in set(members)]


# ------------------------------------------------ enhancers of one module per modality (2026-12)
PER_MODALITY = Path(__file__).parents[1] / "data" / "legacy" / "enhancers_per_modality.safetensors"


def per_modality_data() -> tuple[dict, dict]:
    """What ``tests/data/legacy/make_enhancers_per_modality.py`` wrote with main before the
    enhancers were stacked: the settings, and the tensors (flat keys)."""
    from safetensors import safe_open

    with safe_open(PER_MODALITY, "pt") as handle:
        settings = json.loads(handle.metadata()["settings"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return settings, tensors


@pytest.mark.parametrize("variant", ["separate", "shared_feed_forward", "no_enhancement"])
def test_a_state_dict_of_per_modality_enhancers_loads_and_computes_what_it_did(
    tiny_backbone, variant
):
    """The weights of one enhancer module per modality, as main wrote them (d0eeeae), load into
    the stacked enhancers, each modality's as its own slice, and the model computes on a fixed
    batch what that version computed."""
    settings, tensors = per_modality_data()
    prefix = f"{variant}/state/"
    old = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    assert "network.enhancers.audio.project.weight" in old  # the old layout, one module each
    batch = {}
    for key, value in tensors.items():
        if key.startswith("batch/prototypes/"):
            _, _, name, field = key.split("/")
            batch.setdefault("prototypes", {}).setdefault(name, {})[field] = value
        elif key.startswith("batch/"):
            batch[key[len("batch/") :]] = value
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio", "video"],
        prototypes=settings["prototypes"],
        task={"kind": "classification", "num_labels": 3},
        enhancer=settings["variants"][variant],
        objective={"proj_dim": 8},
    )
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("network.backbone.")}
    model.load_state_dict({**backbone, **old})
    enhancers = model.network.enhancers
    assert "network.enhancers.audio.project.weight" not in model.state_dict()
    for name in ("image", "audio", "video"):
        mine = enhancers.parameters_of(name)
        theirs = {
            key.removeprefix(f"network.enhancers.{name}."): value
            for key, value in old.items()
            if key.startswith(f"network.enhancers.{name}.")
        }
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), (name, key)
    model.eval()
    with torch.no_grad():
        forward = model(batch)
        loss = model.compute_losses(batch, forward)["total"]
    torch.testing.assert_close(forward.outputs, tensors[f"{variant}/outputs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        forward.features, tensors[f"{variant}/features"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(loss, tensors[f"{variant}/loss"], rtol=1e-5, atol=1e-5)


def test_separate_blocks_do_not_load_into_a_shared_enhancer_silently(tiny_backbone):
    _, tensors = per_modality_data()
    prefix = "separate/state/"
    old = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    with pytest.raises(CheckpointError, match=r"model.enhancer.shared: false"):
        upgrade_state_dict(old, ["image", "audio", "video"], shared=True)
