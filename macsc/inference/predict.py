"""A trained model on raw inputs: sentences, sentence pairs, ``(question, context)`` pairs,
concept sets.

The inputs go through the model's own data module, rebuilt from the options an exported model
keeps (``macsc.json``'s ``data``): tokenised by the code that tokenised its training data, with
prototypes from the same sources (read from the prototype cache when it holds them), in
batches. The model's head then makes the very records ``macsc predict`` writes to
``predictions-<split>.jsonl``, in eval mode, without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from macsc.errors import ConfigError, MacscError, first_line
from macsc.method.heads import EvaluationContext

#: record fields that only labelled data fills (``None`` or absent for raw inputs)
GOLD_FIELDS = ("gold", "correct", "exact", "f1")


def build_data_module(data: dict[str, Any], **options: Any) -> Any:
    """The data module ``data`` (``{"class_path", "init_args"}``, as LightningCLI configures
    one) with ``options`` replacing its init arguments; instantiated as the CLI does."""
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    if not isinstance(data, dict) or "class_path" not in data:
        raise ConfigError(
            f"the data options {data!r:.80} name no data module (class_path and init_args)"
        )
    init_args = {**(data.get("init_args") or {}), **options}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    MacscError.last = None
    try:
        config = parser.parse_object({"data": {**data, "init_args": init_args}})
        return parser.instantiate_classes(config).data
    except MacscError:
        raise
    except Exception as error:  # jsonargparse wraps what the data module raised
        if MacscError.last is not None and str(MacscError.last) in str(error):
            raise MacscError.last from error
        raise ConfigError(
            f"the data module {data['class_path']!r} cannot be built from the exported options "
            f"({first_line(error)})"
        ) from error


def predict_inputs(
    model: Any,
    data: dict[str, Any],
    inputs: Sequence[Any],
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    branches: bool = False,
    cache_dir: str | bool | None = None,
) -> list[dict[str, Any]]:
    """One record per input, in order: the head's prediction record (``prediction``:
    a label name, a score, an answer or a sentence; ``probability`` of the label, ``null_odds``
    of a SQuAD v2 answer) without the gold fields, plus ``probabilities`` per label for a
    classifier; with ``branches``, each modality's own prediction too (``branches``, and
    ``branch_probabilities`` for a classifier).

    model: a :class:`macsc.training.module.MaCSC`. data: the data module's options
    (``macsc.json``'s ``data``). batch_size: inputs per forward pass (default: the data's
    ``eval_batch_size``). device: where to run (default: where the model is). cache_dir: the
    prototype cache (None: ``$MACSC_CACHE`` or ``~/.cache/macsc``; False: none).
    """
    options: dict[str, Any] = {"cache_dir": cache_dir, "num_workers": 0}
    if batch_size is not None:
        options["eval_batch_size"] = batch_size
    datamodule = build_data_module(data, **options)
    datamodule.connect(model.tokenizer, model.extractors, model.modalities)
    split_name = model.spec.val_names[0]
    split = datamodule.inputs_split(datamodule.evaluated_split_name("predict", split_name), inputs)
    loader = datamodule.inputs_dataloader(split)
    if device is not None:
        model.to(device)
    model.eval()
    state = model.metrics[f"predict_{split_name}"]
    for metric in state.modules():
        if isinstance(metric, Metric):
            metric.reset()  # what an interrupted call may have left
    probabilities: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rho_logits = model.objective.rho_logits
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, model.device)
            forward = model(batch)
            model.head.update_metrics(
                state, forward.head, forward.representations, rho_logits, batch
            )
            found = model.head.class_probabilities(forward.outputs, rho_logits)
            if found is not None:
                fused, each = (values.cpu() for values in found)
                for row, index in enumerate(batch["example_index"].tolist()):
                    probabilities[index] = (fused[row], each[:, row])
    result = model.head.compute_metrics(state, EvaluationContext("predict", split_name, datamodule))
    positions = {identity: position for position, identity in enumerate(split.ids)}
    records = []
    for record in result.records:
        out = {key: value for key, value in record.items() if key not in GOLD_FIELDS}
        out.pop("branches", None)
        found = probabilities.get(positions.get(record["id"], -1))
        if found is not None:
            out["probabilities"] = _named(found[0], model.spec.label_names)
        if branches and "branches" in record:
            out["branches"] = record["branches"]
            if found is not None:
                out["branch_probabilities"] = {
                    name: _named(values, model.spec.label_names)
                    for name, values in zip(model.modalities, found[1], strict=True)
                }
        records.append(out)
    return records


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def _named(values: torch.Tensor, names: list[str] | None) -> dict[str, float]:
    labels = names or [str(index) for index in range(values.shape[-1])]
    return {label: round(float(value), 6) for label, value in zip(labels, values, strict=True)}
