"""The model card of an exported model (``README.md``), in the Hugging Face Hub's format: YAML
front matter (``library_name``, ``tags``, ``base_model``, ``datasets``, ``metrics``,
``model-index`` with the run's validation metrics), then the learned modality weights (ρ per
modality, π_z per pair), the prototype sources, the training settings, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from macsc.analysis.weights import ModalityWeights, format_weights
from macsc.paths import PACKAGE_PREFIX, looks_like_path

#: the Hub's pipeline tag (and model-index task type) of each task kind
PIPELINE_TAGS = {
    "classification": "text-classification",
    "regression": "text-classification",
    "span": "question-answering",
    "generation": "text2text-generation",
}


def front_matter(manifest: dict[str, Any], metrics: dict[str, dict[str, Any]], name: str) -> str:
    """The card's YAML metadata block, ``---`` lines included."""
    import yaml

    model = manifest["model"]
    task = model.get("task") or {}
    kind = task.get("kind", "classification")
    pipeline = PIPELINE_TAGS.get(kind, kind)
    meta: dict[str, Any] = {
        "library_name": "macsc",
        "pipeline_tag": pipeline,
        "tags": ["macsc", "multimodal", "conceptual-prototypes", pipeline],
    }
    if is_hub_name(manifest["backbone"].get("base_model")):
        meta["base_model"] = manifest["backbone"]["base_model"]
    dataset = manifest.get("sources", {}).get("dataset")
    if dataset:
        meta["datasets"] = [dataset]
    if task.get("metrics"):
        meta["metrics"] = list(task["metrics"])
    results = []
    task_name = manifest["data"]["class_path"].rsplit(".", 1)[-1]
    for split, record in metrics.items():
        if other_step(record, manifest):
            continue
        fused = {k: v for k, v in record.get("metrics", {}).items() if "/" not in k}
        results.append(
            {
                "task": {"type": pipeline},
                "dataset": {
                    "name": str(record.get("task") or task_name),
                    "type": dataset or str(record.get("task") or task_name),
                    "split": str(record.get("split") or split),
                },
                "metrics": [
                    {"type": metric, "value": round(float(value), 6), "name": f"{metric} ({split})"}
                    for metric, value in fused.items()
                    if isinstance(value, int | float)
                ],
            }
        )
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def is_hub_name(name: Any) -> bool:
    """A Hugging Face hub id, not a local folder or ``package:`` weights (when the export was
    made: a folder of that name there is a folder)."""
    return (
        isinstance(name, str)
        and not name.startswith(PACKAGE_PREFIX)
        and not looks_like_path(name)
        and not Path(name).expanduser().exists()
    )


def other_step(record: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """Whether a metrics record is known to score another state than the exported checkpoint:
    one written by a fit's validation at another step (``macsc validate --ckpt_path`` with
    the checkpoint scores that one)."""
    step = manifest["checkpoint"].get("global_step")
    return record.get("stage") == "fit" and step is not None and record.get("global_step") != step


def model_card(
    manifest: dict[str, Any],
    weights: ModalityWeights | None,
    metrics: dict[str, dict[str, Any]],
    name: str,
) -> str:
    """The whole ``README.md``."""
    model = manifest["model"]
    task = model.get("task") or {}
    modalities = model.get("modalities") or ["text"]
    base = manifest["backbone"].get("base_model") or "a text tower (model.text_tower)"
    checkpoint = manifest["checkpoint"]
    lines = [
        front_matter(manifest, metrics, name),
        f"# {name}",
        "",
        f"A MaCSC model (multimodal-augmented PLM fine-tuning with conceptual prototypes and "
        f"self-balancing calibration, NAACL 2024) fine-tuned from `{base}` for a "
        f"{task.get('kind', 'classification')} task"
        + (f" with the labels {', '.join(task['label_names'])}" if task.get("label_names") else "")
        + f". Modalities: {', '.join(modalities)}. Exported by macsc "
        f"{manifest['macsc_version']} from `{checkpoint['path']}` ({checkpoint['chosen']}; step "
        f"{checkpoint['global_step']}, epoch {checkpoint['epoch']}).",
        "",
        "## Validation results",
        "",
    ]
    lines += _results(metrics, modalities, manifest)
    lines += ["", "## Learned modality weights", ""]
    if weights is None:
        lines.append("None: the model has one output (no late fusion, no self-balancing loss).")
    else:
        lines += ["```", format_weights(weights), "```"]
    lines += ["", "## Prototype sources", "", "| modality | source | weights |", "|---|---|---|"]
    for modality, source in manifest["prototypes"].items():
        options = json.dumps(source["options"])
        lines.append(f"| {modality} | `{options}` | {source['weights']} |")
    lines += ["", "## Training settings", "", "| group | options |", "|---|---|"]
    for group in ("enhancer", "objective", "optimizer"):
        options = ", ".join(f"{k}: {v}" for k, v in (model.get(group) or {}).items())
        lines.append(f"| {group} | {options} |")
    data = manifest["data"]
    shown = ", ".join(f"{k}: {json.dumps(v)}" for k, v in data["init_args"].items())
    lines.append(f"| data | `{data['class_path']}`: {shown} |")
    lines += _usage(manifest, name)
    return "\n".join(lines) + "\n"


def _results(
    metrics: dict[str, dict[str, Any]], modalities: list[str], manifest: dict[str, Any]
) -> list[str]:
    if not metrics:
        return ["No validation metrics: the run folder held no metrics-<split>.json."]
    lines = []
    for split, record in metrics.items():
        values = record.get("metrics", {})
        names = [k for k in values if "/" not in k]
        branches = [m for m in modalities if any(f"{n}/{m}" in values for n in names)]
        lines.append(
            f"Split `{split}` ({record.get('stage')}): the "
            + ("fused prediction and each modality's branch alone." if branches else "prediction.")
        )
        if other_step(record, manifest):
            lines[-1] += (
                f" These are of the run's validation at step {record.get('global_step')}, not of "
                f"the exported checkpoint (step {manifest['checkpoint']['global_step']}), so the "
                "model-index above leaves them out; `macsc validate --ckpt_path CKPT` before "
                "exporting scores the checkpoint itself."
            )
        lines += [
            "",
            "| metric | " + " | ".join(["fused", *branches]) + " |",
            "|---" * (len(branches) + 2) + "|",
        ]
        for metric in names:
            cells = [values[metric], *(values.get(f"{metric}/{m}", "") for m in branches)]
            lines.append(f"| {metric} | " + " | ".join(_cell(v) for v in cells) + " |")
        lines.append("")
    return lines[:-1]


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else str(value)


def _usage(manifest: dict[str, Any], name: str) -> list[str]:
    fields = manifest.get("inputs", {}).get("fields") or ["text"]
    example = (
        '"A sentence."' if len(fields) == 1 else "(" + ", ".join(f'"{f}"' for f in fields) + ")"
    )
    command = (
        f'macsc infer {name} --text "A sentence."'
        if len(fields) == 1
        else f"macsc infer {name} --pair " + " ".join(f'"{f}"' for f in fields)
    )
    return [
        "",
        "## How to use",
        "",
        "With macsc installed; it runs offline when the prototype sources above are at hand as "
        "for training (their published weights; Gaussian noise needs nothing).",
        "",
        "```python",
        "from macsc import MaCSC",
        "",
        f'model = MaCSC.from_pretrained("{name}")',
        f"model.predict([{example}])",
        "```",
        "",
        "```bash",
        command,
        f"macsc infer {name} --input inputs.jsonl   # one JSON object per line: "
        + ", ".join(f'"{f}"' for f in fields),
        "```",
    ]
