"""Reading finished runs: what a run folder holds and which paper row it stands for.

A run folder is Lightning's log folder (``runs/<name>/version_N/``) with the ``config.yaml``
LightningCLI wrote and the ``metrics-<split>.json`` / ``predictions-<split>.jsonl`` files of each
evaluation. :func:`row_id` turns a resolved config into the id of a row of the paper's tables
(``bert-base/ours/T+I+A+V``, the ids of ``macsc/analysis/paper_results.json``) and :func:`task_key` into
the task its columns name (``glue/sst2``, ``squad/2.0``); ``macsc report`` and ``macsc overlap``
read runs only through this module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError, DataError
from macsc.training.legacy import upgrade_config

MODALITY_LETTERS = {"text": "T", "image": "I", "audio": "A", "video": "V"}
#: the paper's prototype extractor of each modality (SPEC 1), by extractor kind
PAPER_SOURCES = {"image": "open_clip", "audio": "audioclip", "video": "clip_vip"}
PAPER_IMAGE_MODEL = "vit-b-32"
#: extractor kinds that read retrieved-image features instead of prototypes (SPEC 14, "+Image")
IMAGE_FEATURE_KINDS = ("features", "image_features", "retrieved_images")
#: the MC-PTM whose text tower ``model.text_tower`` of each kind is (SPEC 13), as row ids spell it
TEXT_TOWER_SLUGS = {"open_clip": "clip", "audioclip": "audioclip", "clip_vip": "clip-vip"}
#: how the backbones of the paper's rows are spelled in their ids
BACKBONE_SLUGS = {
    "bert-base-uncased": "bert-base",
    "bert-base-cased": "bert-base",
    "roberta-base": "roberta-base",
    "xlnet-large-cased": "xlnet-large",
    "t5-3b": "t5-3b",
}
PRETTY_BACKBONES = {
    "bert-base": "BERT-base",
    "roberta-base": "RoBERTa-base",
    "xlnet-large": "XLNet-large",
    "t5-3b": "T5-3b",
    "clip": "CLIP",
    "audioclip": "AudioCLIP",
    "clip-vip": "CLIP-ViP",
}
GLUE_TASKS = ("sst2", "qnli", "qqp", "mnli", "mrpc", "stsb")
PROBE_TASKS = {
    "memorycolor": "memorycolor",
    "colorterms": "colorterms",
    "colorterm": "colorterms",
    "objectshape": "objectshape",
    "shape": "objectshape",
}
DEFAULT_MODALITIES = ["text", "image", "audio", "video"]


def normalize_name(name: Any) -> str:
    """Lower case without punctuation: ``Bleu_4`` and ``bleu-4`` are both ``bleu4``."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


# ------------------------------------------------------------------------------ run folders
@dataclass
class Run:
    """One run folder. metrics: split -> the parsed ``metrics-<split>.json``; problems: files
    that exist but cannot be read (name -> reason), kept so a report can say why."""

    path: Path
    config: dict[str, Any] | None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def tensorboard_name(self) -> str:
        """``<name>/version_N`` as TensorBoard lists the run."""
        return f"{self.path.parent.name}/{self.path.name}"


def is_run_folder(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or any(folder.glob("metrics-*.json"))


def find_run_folders(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run folder, or every run folder below it (``runs/`` finds them all),
    in sorted order; a path that does not exist is a DataError."""
    found: list[Path] = []
    for value in paths:
        path = Path(value)
        if not path.exists():
            raise DataError(f"run folder {str(path)!r} does not exist")
        if path.is_file():
            raise DataError(f"{str(path)!r} is a file; give a run folder (runs/<name>/version_N)")
        if is_run_folder(path):
            found.append(path)
            continue
        below = sorted(
            {p.parent for p in path.rglob("config.yaml")}
            | {p.parent for p in path.rglob("metrics-*.json")}
        )
        if not below:
            raise DataError(
                f"{str(path)!r} holds no run folder (a folder with config.yaml or metrics-<split>.json)"
            )
        found.extend(below)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_config(folder: Path) -> dict[str, Any] | None:
    """The resolved LightningCLI config of a run, in today's option names (a run of an earlier
    macsc wrote flat model options: :func:`macsc.training.legacy.upgrade_config`), or None
    when the folder has none."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(config, dict):
        raise DataError(f"{path} should hold a YAML mapping (the config LightningCLI saved)")
    try:
        return upgrade_config(config)[0]
    except ConfigError as error:
        raise DataError(f"{path}: {error}") from error


def read_metrics_file(path: Path) -> dict[str, Any]:
    """One ``metrics-<split>.json``: ``{"stage", "split", "task", "global_step", "epoch",
    "metrics": {name: value}}``; a DataError names the file when it is not that."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise DataError(f"{path} should be a JSON object with a 'metrics' object")
    return record


def load_run(folder: Path) -> Run:
    config = None
    problems: dict[str, str] = {}
    try:
        config = read_config(folder)
    except DataError as error:
        problems["config.yaml"] = str(error)
    metrics: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("metrics-*.json")):
        split = path.name[len("metrics-") : -len(".json")]
        try:
            metrics[split] = read_metrics_file(path)
        except DataError as error:
            problems[path.name] = str(error)
    return Run(folder, config, metrics, problems)


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """The fused value of ``metric`` in a metrics record (names compared by
    :func:`normalize_name`, with the aliases of :data:`METRIC_ALIASES`); branch metrics
    (``name/<modality>``) are never taken."""
    wanted = METRIC_ALIASES.get(metric, {metric})
    for name, value in record.get("metrics", {}).items():
        if "/" in str(name) or normalize_name(name) not in wanted:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return None
        return float(value)
    return None


METRIC_ALIASES = {
    "exact": {"exact", "exactmatch", "em"},
    "accuracy": {"accuracy", "acc"},
    "spearman": {"spearman", "spearmanr", "spearmancorrcoef"},
    "cider": {"cider", "ciderd"},
}


# ------------------------------------------------------------------------ what a run is
def _section(config: dict[str, Any] | None, name: str) -> dict[str, Any]:
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


def backbone_slug(value: Any) -> str:
    """How a row id spells a backbone: the paper's backbones by their short names
    (``bert-base-uncased`` -> ``bert-base``), the MC-PTM text towers (a ``model.text_tower``
    dict, or a name that says so) as ``clip``, ``audioclip``, ``clip-vip`` (an open_clip tower
    other than the paper's ViT-B/32 as ``clip:<model>``); anything else by its last path
    component, lower case."""
    if isinstance(value, dict):
        kind = str(value.get("kind", ""))
        if kind == "open_clip":
            model = normalize_name(value.get("model_name") or PAPER_IMAGE_MODEL)
            return "clip" if model == normalize_name(PAPER_IMAGE_MODEL) else f"clip:{model}"
        if kind in TEXT_TOWER_SLUGS:
            return TEXT_TOWER_SLUGS[kind]
        value = value.get("model_name") or value.get("checkpoint") or kind
    last = re.split(r"[/\\]", str(value).strip().rstrip("/\\"))[-1]
    lowered = last.lower()
    if any(key in lowered for key in ("clip_vip", "clipvip", "clip-vip")):
        return "clip-vip"
    if "audioclip" in lowered:
        return "audioclip"
    if "clip" in lowered:
        return "clip"
    name = lowered.split(":")[-1]
    return BACKBONE_SLUGS.get(name, name)


def modality_string(modalities: list[str]) -> str:
    return "+".join(MODALITY_LETTERS.get(m, m) for m in modalities)


def _source_slug(modality: str, spec: dict[str, Any] | None) -> str | None:
    """None for the paper's extractor of ``modality``; else a name for the source."""
    spec = dict(spec or {"kind": PAPER_SOURCES.get(modality, "?")})
    kind = str(spec.get("kind", ""))
    model = spec.get("model_name")
    if kind.startswith("hf:"):
        kind, model = "hf", kind[3:]
    if kind == PAPER_SOURCES.get(modality):
        model_ok = kind != "open_clip" or normalize_name(model or PAPER_IMAGE_MODEL) == "vitb32"
        if model_ok:
            return None
    if kind == "gaussian":
        return "gaussian"
    if kind == "hf":
        name = re.split(r"[/\\]", str(model or "").rstrip("/\\"))[-1].lower()
        return "bert-base-cc3m" if "cc3m" in name else name
    return f"{kind}:{model}" if model else kind


def row_id(config: dict[str, Any]) -> str:
    """The paper-table row id of a run, from its resolved config (see the ``row id`` convention
    in ``macsc/analysis/paper_results.json``), e.g. ``roberta-base/no-msb/T+I+A+V`` or
    ``roberta-base/ours/T+I+A+V/prototypes=gaussian``."""
    model = _section(config, "model")
    backbone = backbone_slug(
        model.get("text_tower") or model.get("backbone") or "bert-base-uncased"
    )
    modalities = list(model.get("modalities") or DEFAULT_MODALITIES)
    prototypes = model.get("prototypes") or {}
    if not isinstance(prototypes, dict):
        prototypes = {}
    if modalities == ["text"]:
        return f"{backbone}/none/T"
    specs = {m: prototypes.get(m) for m in modalities[1:]}
    image_kind = str((specs.get("image") or {}).get("kind", ""))
    if image_kind in IMAGE_FEATURE_KINDS:
        variant = "image"
        specs.pop("image")
    else:
        no_enhancement = _section(model, "enhancer").get("enabled", True) is False
        weight = _section(model, "objective").get("lambda_msb")
        no_msb = weight is not None and float(weight) == 0.0
        variant = {
            (False, False): "ours",
            (True, False): "no-enhancement",
            (False, True): "no-msb",
            (True, True): "no-enhancement+no-msb",
        }[(no_enhancement, no_msb)]
    identity = f"{backbone}/{variant}/{modality_string(modalities)}"
    sources = {m: _source_slug(m, spec) for m, spec in specs.items()}
    named = set(sources.values())
    if named != {None} and named:
        if len(named) == 1:
            identity += f"/prototypes={named.pop()}"
        else:
            mixed = ",".join(f"{m}={s or 'paper'}" for m, s in sources.items())
            identity += f"/prototypes=mixed({mixed})"
    if any(isinstance(spec, dict) and spec.get("trainable") for spec in specs.values()):
        identity += "/trainable-extractors"
    return identity


def task_key(config: dict[str, Any] | None, metrics_task: str | None = None) -> str | None:
    """The task of a run as the paper's columns name it: ``glue/<task>``, ``squad/1.1``,
    ``squad/2.0``, ``commongen``, ``probe/<name>`` (``other/<name>`` for the rest); from the data
    module in ``config.yaml``, else from the ``task`` a metrics file names; None if neither."""
    data = _section(config, "data")
    class_name = str(data.get("class_path", "")).rsplit(".", 1)[-1].lower()
    options = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
    if "glue" in class_name:
        return f"glue/{normalize_name(options.get('task', ''))}"
    if "squad" in class_name:
        return f"squad/{_squad_version(options.get('version', '2.0'))}"
    if "commongen" in class_name:
        return "commongen"
    if metrics_task is None:
        return f"other/{normalize_name(class_name)}" if class_name else None
    name = normalize_name(metrics_task)
    if name in GLUE_TASKS:
        return f"glue/{name}"
    if name in ("squad", "squadv1", "squad11", "squadv11"):
        return "squad/1.1"
    if name in ("squadv2", "squad2", "squad20", "squadv20"):
        return "squad/2.0"
    if name == "commongen":
        return "commongen"
    if name in PROBE_TASKS:
        return f"probe/{PROBE_TASKS[name]}"
    return f"other/{name}"


def _squad_version(value: Any) -> str:
    text = str(value).lower().lstrip("v")
    return {"1": "1.1", "2": "2.0"}.get(text, text)


#: the fine-tuning settings a grid varies (SPEC 10: the baselines' papers chose among them on
#: dev), by the name a report gives them, and where a resolved config keeps each
TRAINING_SETTINGS = {
    "lr": ("model", "optimizer", "learning_rate"),
    "batch": ("data", "init_args", "batch_size"),
    "devices": ("trainer", "devices"),
    "nodes": ("trainer", "num_nodes"),
    "accumulate": ("trainer", "accumulate_grad_batches"),
    "epochs": ("trainer", "max_epochs"),
    "steps": ("trainer", "max_steps"),
    "weight decay": ("model", "optimizer", "weight_decay"),
    "warm-up": ("model", "optimizer", "warmup_ratio"),
    "adam epsilon": ("model", "optimizer", "adam_epsilon"),
    "optimizer": ("model", "optimizer", "name"),
    "schedule": ("model", "optimizer", "schedule"),
}


def training_settings(config: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The fine-tuning settings of a run, ``(name, value)`` in :data:`TRAINING_SETTINGS` order
    (None where the config does not say): two runs of one cell that differ in them are two
    points of a grid, two that do not are repeats."""
    settings = []
    for name, path in TRAINING_SETTINGS.items():
        node: Any = config or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        hashable = json.dumps(node, sort_keys=True) if isinstance(node, list | dict) else node
        settings.append((name, hashable))
    return tuple(settings)


def data_fraction(config: dict[str, Any] | None) -> float:
    options = _section(config, "data").get("init_args")
    value = options.get("data_fraction", 1.0) if isinstance(options, dict) else 1.0
    return float(value if value is not None else 1.0)


def max_train_examples(config: dict[str, Any] | None) -> int | None:
    """The cap on training examples a run was given (``cpu.yaml``'s smoke tests), or None."""
    options = _section(config, "data").get("init_args")
    value = options.get("max_train_examples") if isinstance(options, dict) else None
    return None if value is None else int(value)


def display_name(config: dict[str, Any] | None) -> str | None:
    """A short human name for a run (``RoBERTa-base``, ``BERT-base T+I+A+V``,
    ``BERT-base T+I+A+V w/o L_msb``) from its config, or None without one."""
    if not config or not _section(config, "model"):
        return None
    identity = row_id(config)
    backbone, variant, modalities, *rest = identity.split("/")
    parts = [PRETTY_BACKBONES.get(backbone, backbone)]
    if variant != "none":
        parts.append(modalities)
    parts += {
        "image": ["+Image"],
        "no-enhancement": ["w/o enhancement"],
        "no-msb": ["w/o L_msb"],
        "no-enhancement+no-msb": ["w/o enhancement, L_msb"],
    }.get(variant, [])
    parts += rest
    return " ".join(parts)


def parse_names(pairs: list[str] | None) -> dict[Path, str]:
    """``--name RUN=LABEL`` options as {resolved run folder: label}."""
    names: dict[Path, str] = {}
    for pair in pairs or []:
        run, sep, label = pair.partition("=")
        if not sep or not run or not label:
            raise ConfigError(f"--name {pair!r}: write it as RUN=LABEL (a run folder, '=', a name)")
        names[Path(run).resolve()] = label
    return names


def check_named_runs(names: dict[Path, str], runs: list[Path]) -> None:
    given = {p.resolve() for p in runs}
    for path in names:
        if path not in given:
            raise ConfigError(
                f"--name names {str(path)!r}, which is not one of the runs given; "
                "give the same folder as a RUN argument"
            )
