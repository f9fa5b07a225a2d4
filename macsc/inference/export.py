"""``macsc export``: a checkpoint as a folder a user can share (:mod:`macsc.inference.folder`).

The checkpoint is loaded as ``load_from_checkpoint`` loads it (safely: no code from the file
runs unless trusted); the data options come from the run's ``config.yaml`` (or a config file
given), the metrics for the model card from its ``metrics-<split>.json``. The folder is written
beside its destination and renamed into place, so a failed export leaves no half folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macsc import __version__
from macsc.analysis.runs import is_run_folder, load_run, read_config
from macsc.analysis.weights import read_weights as read_modality_weights
from macsc.errors import CheckpointError, ConfigError, DataError
from macsc.inference.card import model_card
from macsc.inference.folder import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    write_manifest,
    write_weights,
)
from macsc.inference.model import MaCSC
from macsc.inference.predict import build_data_module
from macsc.method.network import DEFAULT_PROTOTYPES, effective_source
from macsc.paths import load_tokenizer

#: data options that name the exporter's files and folders: an exported model reads no data
#: file (``data_files: {}``: its inputs are given), and uses its user's prototype cache
MACHINE_OPTIONS = ("data_files", "cache_dir")


@dataclass
class Export:
    """What :func:`export_checkpoint` wrote. checkpoint: the file exported, and how it was
    chosen; folder: the export; files: its files; tensors: stored in ``macsc.safetensors``."""

    checkpoint: Path
    how: str
    folder: Path
    files: list[str]
    tensors: int


def resolve_checkpoint(target: str | Path) -> tuple[Path, str, Path | None]:
    """(checkpoint file, how it was chosen, its run folder or None). A run folder means its
    ``checkpoints/best.ckpt`` (the best validation score), else ``last.ckpt``, else its newest
    ``.ckpt``; a file in a run's ``checkpoints/`` folder belongs to that run."""
    path = Path(target).expanduser()
    if path.is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, "the file given", run if run is not None and is_run_folder(run) else None
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder or a .ckpt file")
    for name, how in (("best.ckpt", "the run's best.ckpt"), ("last.ckpt", "the run's last.ckpt")):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name, how, path
    candidates = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"run folder {str(path)!r} holds no .ckpt file")
    return candidates[-1], "the run's newest .ckpt", path


def data_options(run: Path | None, config: str | Path | None, checkpoint: Path) -> dict[str, Any]:
    """The ``data`` section (``class_path``, ``init_args``) of ``config`` when given, else of
    the run's ``config.yaml``."""
    if config is not None:
        source, content = str(config), _read_config_file(Path(config).expanduser())
    elif run is not None and (run / "config.yaml").is_file():
        source, content = str(run / "config.yaml"), read_config(run)
    else:
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} is not in a run folder with a config.yaml, so its "
            "data options (tokenisation, text segments) are unknown: pass --config with the "
            "config it was trained with"
        )
    data = (content or {}).get("data")
    if isinstance(data, str):
        data = {"class_path": data}
    if not isinstance(data, dict) or "class_path" not in data:
        raise ConfigError(
            f"{source} has no data section with a class_path; give the training config"
        )
    return {"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})}


def _read_config_file(path: Path) -> dict[str, Any]:
    """A training config (YAML), in today's option names."""
    import yaml

    from macsc.training.legacy import upgrade_config

    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r} does not exist; give the training config")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML ({error})") from error
    if not isinstance(content, dict):
        raise ConfigError(f"--config {str(path)!r} should hold a YAML mapping (a config)")
    return upgrade_config(content)[0]


def export_checkpoint(
    target: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
) -> Export:
    """Export the checkpoint ``target`` (a run folder or a ``.ckpt``) to the folder ``out``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(
                f"{str(out)!r} exists and is not empty; choose another folder or pass --overwrite"
            )
        if not (out / MANIFEST).is_file():
            raise ConfigError(
                f"{str(out)!r} is not a folder macsc export wrote (it has no {MANIFEST}), so "
                "--overwrite leaves it alone; choose another folder"
            )
    checkpoint, how, run = resolve_checkpoint(target)
    data = data_options(run, config, checkpoint)
    model = MaCSC.load_from_checkpoint(
        checkpoint, map_location="cpu", trust_checkpoint=trust_checkpoint
    )
    content = _checkpoint_summary(checkpoint, trust_checkpoint)
    metrics = _run_metrics(run, model.spec.val_names)
    data, source = _portable(data, metrics)
    datamodule = build_data_module(data, cache_dir=False)  # the options must rebuild it
    with contextlib.suppress(ConfigError):
        source["fields"] = datamodule.input_fields()
    manifest = _manifest(model, data, source, checkpoint, how, run, content)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tensors = write_weights(model.state_dict(), staging / WEIGHTS)
        _write_backbone(model, staging)
        weights = (
            read_modality_weights(
                {"state_dict": model.state_dict(), "hyper_parameters": manifest["model"]}
            )
            if model.objective.rho_logits is not None
            else None
        )
        manifest["weights"] = {"file": WEIGHTS, "tensors": tensors}
        write_manifest(staging, manifest)
        (staging / "README.md").write_text(
            model_card(manifest, weights, metrics, out.name), encoding="utf-8"
        )
        _shareable(staging)
        if out.exists():
            shutil.rmtree(out)  # an earlier export, or an empty folder
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Export(checkpoint, how, out, sorted(p.name for p in out.iterdir()), tensors)


def _shareable(folder: Path) -> None:
    """The modes a folder and files made by hand get (``mkdtemp`` makes the folder private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _checkpoint_summary(checkpoint: Path, trusted: bool) -> dict[str, Any]:
    """The checkpoint's step, epoch and recorded head options, read memory-mapped."""
    from macsc.analysis.weights import load_checkpoint
    from macsc.training.checkpoints import HEAD_OPTIONS_KEY

    content = load_checkpoint(checkpoint, trusted)
    return {
        "global_step": content.get("global_step"),
        "epoch": content.get("epoch"),
        "head_options": content.get(HEAD_OPTIONS_KEY) or {},
    }


def _run_metrics(run: Path | None, val_names: list[str]) -> dict[str, dict[str, Any]]:
    """The run's ``metrics-<split>.json`` of each validation split it has."""
    if run is None:
        return {}
    try:
        found = load_run(run).metrics
    except DataError:
        return {}
    return {name: found[name] for name in val_names if name in found}


def _portable(
    data: dict[str, Any], metrics: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data options without the exporter's files and folders, with the null-score threshold
    tuned on the validation split when the run has one (SQuAD v2); and what they were read from
    (the hub dataset, the threshold's origin) for ``macsc.json`` and the model card."""
    init_args = dict(data["init_args"])
    source: dict[str, Any] = {}
    if not init_args.get("data_files") and init_args.get("hub_name"):
        source["dataset"] = init_args["hub_name"]
    for option in MACHINE_OPTIONS:
        init_args.pop(option, None)
    if "data_files" in data["init_args"]:
        init_args["data_files"] = {}
    for split, record in metrics.items():
        threshold = record.get("metrics", {}).get("best_f1_thresh")
        if "null_threshold" in init_args and isinstance(threshold, int | float):
            init_args["null_threshold"] = float(threshold)
            source["null_threshold"] = (
                f"best_f1_thresh of metrics-{split}.json (step {record.get('global_step')})"
            )
            break
    return {"class_path": data["class_path"], "init_args": init_args}, source


def _manifest(
    model: Any,
    data: dict[str, Any],
    source: dict[str, Any],
    checkpoint: Path,
    how: str,
    run: Path | None,
    content: dict[str, Any],
) -> dict[str, Any]:
    hparams = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_")}
    configured = hparams.get("prototypes") or {}
    prototypes = {}
    for name, extractor in model.extractors.items():
        options = effective_source(name, configured.get(name) or DEFAULT_PROTOTYPES[name])
        prototypes[name] = {
            "options": options,
            "identity": extractor.identity(),
            "trainable": extractor.trainable,
            "weights": _weights_of(extractor),
        }
    hparams["prototypes"] = {name: entry["options"] for name, entry in prototypes.items()}
    text_tower = model.network.is_text_tower
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "macsc_version": __version__,
        "model": hparams,
        "head_options": content["head_options"],
        "backbone": {
            "base_model": None if text_tower else hparams.get("backbone"),
            "config": None if text_tower else "config.json",
        },
        "prototypes": prototypes,
        "data": data,
        "inputs": {"fields": source.pop("fields", None)},
        "sources": source,
        "checkpoint": {
            "path": str(checkpoint),
            "chosen": how,
            "run": None if run is None else str(run),
            "global_step": content["global_step"],
            "epoch": content["epoch"],
        },
    }


def _weights_of(extractor: Any) -> str:
    if extractor.trainable:
        return f"fine-tuned, in {WEIGHTS}"
    if not any(True for _ in extractor.parameters()):
        return "none (a function of the text and its options)"
    return "frozen: the published weights its options name (not in this folder)"


def _write_backbone(model: Any, folder: Path) -> None:
    """The backbone's configuration and tokenizer files (a text tower has neither: it is
    rebuilt from its options, ``model.text_tower``)."""
    if model.network.is_text_tower:
        return
    backbone = model.network.backbone
    backbone.config.save_pretrained(folder)
    if getattr(backbone, "generation_config", None) is not None:
        backbone.generation_config.save_pretrained(folder)
    load_tokenizer(model.backbone_name).save_pretrained(folder)
