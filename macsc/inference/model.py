"""``macsc.MaCSC``: the MaCSC LightningModule with what a user of a trained model needs.

:class:`MaCSC` is :class:`macsc.training.module.MaCSC` (it trains, validates and loads
checkpoints as that one does) with :meth:`MaCSC.from_pretrained`, which loads the folder
``macsc export`` writes without unpickling anything, and :meth:`MaCSC.predict`, which runs it
on raw inputs. It lives above the training side because reading raw inputs takes the task's
data module (:mod:`tasks`), which the training side never imports.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from macsc.errors import CheckpointError, ConfigError
from macsc.inference.folder import WEIGHTS, as_plain, read_manifest, read_weights
from macsc.inference.predict import predict_inputs
from macsc.method.network import backbone_architecture_only
from macsc.training.legacy import upgrade_state_dict
from macsc.training.module import MaCSC as TrainingMaCSC


class MaCSC(TrainingMaCSC):
    """The MaCSC model (:class:`macsc.training.module.MaCSC`), loadable from an exported
    folder and runnable on raw inputs::

        from macsc import MaCSC

        model = MaCSC.from_pretrained("models/demo")
        model.predict(["A ripe banana lay on the table."])
        # [{"id": 0, "text": "...", "prediction": "warm", "probability": 0.61,
        #   "probabilities": {"cool": 0.39, "warm": 0.61}}]
    """

    #: ``macsc.json`` of the folder the model was loaded from (None for a model built or
    #: loaded otherwise)
    manifest: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, map_location: str | torch.device | None = None
    ) -> MaCSC:
        """The model exported to ``folder`` (``macsc export RUN_OR_CKPT DIR``), in eval mode.

        The backbone is built from the folder's ``config.json`` and tokenizer, every tensor of
        the state dict is loaded strictly from ``macsc.safetensors`` (no pickle is read
        anywhere), and each prototype source is rebuilt from its options in ``macsc.json``: a
        frozen extractor's published weights must be at hand as for training (a missing file
        is the usual one-line error), Gaussian noise is reproduced from its seed and stream.
        A source whose identity (its weights' digest, its options) differs from the one the
        model was exported with is warned about: its prototypes, and so the predictions, would
        differ."""
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder)
        options = dict(manifest["model"])
        config = manifest["backbone"].get("config")
        if config and not (folder / config).is_file():
            raise CheckpointError(
                f"{folder} has no {config} (the backbone's configuration) beside macsc.json: "
                "copy the whole exported folder, or export the model again"
            )
        options["backbone"] = str(folder) if config else None
        options["prototypes"] = {
            name: dict(source["options"]) for name, source in manifest["prototypes"].items()
        }
        try:
            with backbone_architecture_only():
                model = cls(**options)
        except TypeError as error:
            raise CheckpointError(
                f"{folder / 'macsc.json'}: its model options do not fit this macsc ({error})"
            ) from error
        describe = f"the model {folder / 'macsc.json'} describes"
        enhancers = model.network.enhancers
        shared = enhancers is not None and enhancers.shared
        state = read_weights(
            folder / WEIGHTS,
            model.state_dict(),
            describe,
            upgrade=lambda state: upgrade_state_dict(state, model.modalities[1:], shared),
        )
        model.load_state_dict(state, strict=True)
        note = model.head.restore_options(manifest.get("head_options") or {})
        if note is not None:
            warnings.warn(note, stacklevel=2)
        _warn_on_other_sources(model, manifest["prototypes"])
        model.manifest = manifest
        if map_location is not None:
            model.to(map_location)
        return model.eval()

    def predict(
        self,
        inputs: Sequence[Any],
        *,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        branches: bool = False,
        cache_dir: str | bool | None = None,
    ) -> list[dict[str, Any]]:
        """The model's predictions on raw inputs, one record per input, in order.

        inputs: for a one-segment task, strings; for a pair task (QNLI, MNLI, STS-B, ...),
        ``(first, second)`` pairs; for SQuAD, ``(question, context)`` pairs; for CommonGen,
        concept lists; or mappings with the field names (``macsc.json``'s ``inputs``) and an
        optional ``id``. Each record holds ``id`` (the given id, else the input's position),
        ``prediction`` (a label name, a score, an answer -- ``""`` for none, at the exported
        null threshold -- or a sentence) and, by kind, ``probability`` and ``probabilities``
        (a classifier: the fused distribution of Eq. 11) or ``null_odds`` (SQuAD v2);
        ``branches=True`` adds each modality's own prediction (and its probabilities).
        batch_size: inputs per forward pass (default: the training config's eval batch size);
        device: where to run (default: where the model is); cache_dir: the prototype cache
        (default ``$MACSC_CACHE`` or ``~/.cache/macsc``; False computes in memory)."""
        data = (self.manifest or {}).get("data")
        if data is None:
            raise ConfigError(
                "predict() reads raw inputs with the options of the data the model was trained "
                "on, which an exported model keeps: export the checkpoint (macsc export "
                "RUN_OR_CKPT DIR) and load it with MaCSC.from_pretrained(DIR)"
            )
        return predict_inputs(
            self,
            data,
            inputs,
            batch_size=batch_size,
            device=device,
            branches=branches,
            cache_dir=cache_dir,
        )


def _warn_on_other_sources(model: TrainingMaCSC, exported: dict[str, Any]) -> None:
    for name, extractor in model.extractors.items():
        expected = (exported.get(name) or {}).get("identity")
        found = as_plain(extractor.identity())
        if expected is not None and found != expected:
            changed = sorted(
                key for key in set(found) | set(expected) if found.get(key) != expected.get(key)
            )
            warnings.warn(
                f"the {name} prototype source differs from the one the model was exported with "
                f"(in {', '.join(changed)}: {json.dumps({k: found.get(k) for k in changed})} "
                f"instead of {json.dumps({k: expected.get(k) for k in changed})}); its "
                "prototypes, and so the predictions, may differ",
                stacklevel=3,
            )
