"""What earlier macsc versions wrote, in today's names: one table per kind of name.

- :data:`LEGACY_OPTIONS`: the model's flat options (``model.lambda_msb``), which became fields of
  the option groups (``model.objective.lambda_msb``) in 2026-12. Checkpoints' hyperparameters,
  ``config.yaml`` files and ``--model.<option>`` on the command line are read through it.
- :data:`LEGACY_MODULES`: the modules of the flat package layout (before 2026-12) whose classes a
  config names by class path (callbacks, strategies, checkpoint plugins, the LightningModule).
- :data:`LEGACY_PREFIXES`, :data:`LEGACY_KEYS`: state-dict keys of checkpoints written before
  the model was split into network, heads and objective (macsc 0.1).
- :func:`stack_enhancers`: checkpoints written before the enhancers were stacked (2026-12), with
  one module per non-text modality (``network.enhancers.<m>.attention.in_proj_weight``).

No Lightning here, so that ``macsc report`` and ``macsc overlap`` read old run folders without
importing it.
"""

from __future__ import annotations

import copy
from typing import Any

from macsc.errors import ConfigError

#: old flat option of ``model`` -> its group and field today
LEGACY_OPTIONS: dict[str, str] = {
    "enhancement": "enhancer.enabled",
    "share_enhancer": "enhancer.shared",
    "enhancer_heads": "enhancer.heads",
    "enhancer_feed_forward": "enhancer.feed_forward",
    "lambda_msb": "objective.lambda_msb",
    "alpha": "objective.alpha",
    "tau": "objective.tau",
    "proj_dim": "objective.proj_dim",
    "weight_normalization": "objective.weight_normalization",
    "reduction": "objective.reduction",
    "gather_across_devices": "objective.gather_across_devices",
    "learning_rate": "optimizer.learning_rate",
    "weight_decay": "optimizer.weight_decay",
    "warmup_ratio": "optimizer.warmup_ratio",
    "adam_epsilon": "optimizer.adam_epsilon",
    "optimizer": "optimizer.name",
    "lr_schedule": "optimizer.schedule",
    "modality_weight_lr_scale": "optimizer.modality_weight_lr_scale",
}
#: the option groups of ``model``
OPTION_GROUPS = ("enhancer", "objective", "optimizer")

#: old module -> today's, for class paths
LEGACY_MODULES: dict[str, str] = {
    "macsc.model": "macsc.training.module",
    "macsc.checkpoint_files": "macsc.training.checkpoints",
    "macsc.strategies": "macsc.training.strategies",
    "macsc.guards": "macsc.training.guards",
    "macsc.heatmaps": "macsc.training.heatmaps",
    "macsc.run_folders": "macsc.training.result_files",
    "macsc.run_state": "macsc.training.resume",
}

#: state-dict key prefixes of checkpoints written before the model was split into network,
#: heads and objective (macsc 0.1, before 2026-12): old prefix -> new prefix
LEGACY_PREFIXES: dict[str, str] = {
    "backbone.": "network.backbone.",
    "enhancers.": "network.enhancers.",
    "trainable_extractors.": "network.trainable_extractors.",
    "calibration.": "objective.calibration.",
}
LEGACY_KEYS: dict[str, str] = {
    "rho_logits": "objective.rho_logits",
    "class_prior": "objective.class_prior",
    "skipped_batches": "guard.skipped_batches",
}

#: a rename: (old name, today's name), each as a config spells it
Rename = tuple[str, str]


def is_legacy_option(key: str, value: Any) -> bool:
    """Whether ``model.<key>: value`` is an old flat option. ``optimizer`` is both: the old
    optimiser's name (a string) and today's group (a mapping)."""
    return key in LEGACY_OPTIONS and not (key in OPTION_GROUPS and isinstance(value, dict))


def upgrade_model_options(options: dict[str, Any]) -> tuple[dict[str, Any], list[Rename]]:
    """The model's options (a config's ``model`` section, a checkpoint's hyperparameters) with
    each old flat option moved into its group, and the renames made. An old option and its new
    key set to different values is a ConfigError: which one was meant cannot be told."""
    upgraded = {
        key: dict(value) if key in OPTION_GROUPS and isinstance(value, dict) else value
        for key, value in options.items()
        if not is_legacy_option(key, value)
    }
    renamed = []
    for key, value in options.items():
        if not is_legacy_option(key, value):
            continue
        group, field = LEGACY_OPTIONS[key].split(".")
        if not isinstance(upgraded.get(group), dict):
            upgraded[group] = {}
        if field in upgraded[group] and upgraded[group][field] != value:
            raise ConfigError(
                f"model.{key} (the old name of model.{group}.{field}) is {value!r} but "
                f"model.{group}.{field} is {upgraded[group][field]!r}; keep only "
                f"model.{group}.{field}"
            )
        upgraded[group][field] = value
        renamed.append((f"model.{key}", f"model.{group}.{field}"))
    return upgraded, renamed


def upgrade_class_path(path: str) -> str:
    """``macsc.checkpoint_files.LastCheckpoint`` -> ``macsc.training.checkpoints.LastCheckpoint``;
    a class path of today's layout as it is."""
    module, _, name = path.rpartition(".")
    return f"{LEGACY_MODULES[module]}.{name}" if module in LEGACY_MODULES else path


#: LightningCLI's subcommands, under which a config given before the subcommand nests its keys
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def upgrade_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[Rename]]:
    """A LightningCLI config (a run's ``config.yaml``, an experiment file) in today's names:
    the model's options in their groups and every ``class_path`` of the flat layout moved; the
    renames made, each once. The input is not modified."""
    config = copy.deepcopy(config)
    renamed: list[Rename] = []
    sections = [config, *(config[s] for s in SUBCOMMANDS if isinstance(config.get(s), dict))]
    for section in sections:
        if isinstance(section.get("model"), dict):
            section["model"], moved = upgrade_model_options(section["model"])
            renamed += moved
    renamed += _upgrade_class_paths(config)
    return config, list(dict.fromkeys(renamed))


def _upgrade_class_paths(node: Any) -> list[Rename]:
    renamed = []
    if isinstance(node, dict):
        path = node.get("class_path")
        if isinstance(path, str) and upgrade_class_path(path) != path:
            node["class_path"] = upgrade_class_path(path)
            renamed.append((path, node["class_path"]))
        for value in node.values():
            renamed += _upgrade_class_paths(value)
    elif isinstance(node, list):
        for value in node:
            renamed += _upgrade_class_paths(value)
    return renamed


def describe_renames(renamed: list[Rename], shown: int = 3) -> str:
    """What was renamed, for a note: ``18 flat model options (model.enhancement ->
    model.enhancer.enabled, ... and 15 more) and 1 class path of the flat package layout (...)``."""

    def listed(pairs: list[Rename]) -> str:
        text = ", ".join(f"{old} -> {new}" for old, new in pairs[:shown])
        return text + (f" and {len(pairs) - shown} more" if len(pairs) > shown else "")

    options = [pair for pair in renamed if pair[0].startswith("model.")]
    classes = [pair for pair in renamed if not pair[0].startswith("model.")]
    parts = []
    if options:
        plural = "s" if len(options) > 1 else ""
        parts.append(f"{len(options)} flat model option{plural} ({listed(options)})")
    if classes:
        plural = "es" if len(classes) > 1 else ""
        parts.append(
            f"{len(classes)} class path{plural} of the flat package layout ({listed(classes)})"
        )
    return " and ".join(parts)


def upgrade_state_dict(
    state_dict: dict[str, Any], modalities: list[str] | None = None, shared: bool = False
) -> dict[str, Any]:
    """``state_dict`` with the keys of an earlier layout renamed to today's, and per-modality
    enhancers stacked (:func:`stack_enhancers`; ``modalities``, ``shared``: the model's); a dict
    of today's layout is returned unchanged."""
    if any(key in state_dict for key in LEGACY_KEYS) or any(
        key.startswith(tuple(LEGACY_PREFIXES)) for key in state_dict
    ):
        upgraded = {}
        for key, value in state_dict.items():
            new = LEGACY_KEYS.get(key, key)
            for old, prefix in LEGACY_PREFIXES.items():
                if key.startswith(old):
                    new = prefix + key[len(old) :]
                    break
            upgraded[new] = value
        state_dict = upgraded
    return stack_enhancers(state_dict, modalities, shared)


#: where the enhancers' parameters live in the state dict
ENHANCERS = "network.enhancers."


def per_modality_enhancers(state_dict: dict[str, Any]) -> list[str]:
    """The modalities whose enhancer ``state_dict`` holds one module each, as before 2026-12
    (``network.enhancers.<m>.type_embedding``; macsc 0.1: ``enhancers.<m>.type_embedding``), in
    the order of their keys; [] for today's layout."""
    found = []
    for key in state_dict:
        bare = key.removeprefix("network.")
        if bare.startswith("enhancers.") and bare.endswith(".type_embedding"):
            name = bare[len("enhancers.") : -len(".type_embedding")]
            if name and "." not in name:
                found.append(name)
    return found


def stack_enhancers(
    state_dict: dict[str, Any], modalities: list[str] | None = None, shared: bool = False
) -> dict[str, Any]:
    """One enhancer module per non-text modality, as checkpoints before 2026-12 hold them, in
    today's stacked layout (:class:`macsc.method.fusion.ConceptEnhancers`): each
    ``<m>.<name>`` of the modalities (in ``modalities`` order, else their keys') stacked along a
    new leading axis into ``<name>``, and the projections' weights ``<m>.project.weight``
    ``(d, d_m)`` put side by side into ``project.weight`` ``(d, Σ d_m)``. ``shared``: the
    model shares one attention block (``model.enhancer.shared``), which such a checkpoint holds
    once per modality: it is kept once. The entries keep their place in the dict."""
    found = per_modality_enhancers(state_dict)
    if not found:
        return state_dict
    order = [m for m in modalities if m in found] if modalities else found
    if sorted(order) != sorted(found):
        order = found  # other modalities than the model's: the mismatch check names them
    prefixes = [f"{ENHANCERS}{m}." for m in order]
    names = [key[len(prefixes[0]) :] for key in state_dict if key.startswith(prefixes[0])]
    per_modality = {name: [state_dict[p + name] for p in prefixes] for name in names}
    upgraded: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not key.startswith(tuple(prefixes)):
            upgraded[key] = value
        elif key.startswith(prefixes[0]):
            name = key[len(prefixes[0]) :]
            upgraded[ENHANCERS + name] = _stacked(name, per_modality[name], shared)
    return upgraded


def _stacked(name: str, values: list[Any], shared: bool) -> Any:
    import torch

    from macsc.errors import CheckpointError

    if name == "project.weight":
        return torch.cat(values, dim=1)
    if not shared or name in ("project.bias", "type_embedding"):
        return torch.stack(values)
    if any(not torch.equal(value, values[0]) for value in values[1:]):
        raise CheckpointError(
            f"the checkpoint has a separate enhancer {name} per modality, but this model "
            "shares one attention block (model.enhancer.shared: true); load it with "
            "model.enhancer.shared: false, the setting it was trained with"
        )
    return values[0].unsqueeze(0)
