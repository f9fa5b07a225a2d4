"""Writes tests/data/legacy/enhancers_per_modality.safetensors with the macsc of main before the
enhancers were stacked (d0eeeae), where each modality has its own ConceptEnhancer module:

    git archive d0eeeae | tar -x -C /tmp/main_tree
    PYTHONPATH=/tmp/main_tree HF_HUB_OFFLINE=1 python make_enhancers_per_modality.py OUT d0eeeae

For three enhancer settings, the state dict of a tiny MaCSC T+I+A+V (the tests' tiny BERT, which
is left out: the tests write the same one), every weight moved away from its initial value, and
what that model computed in eval mode on a fixed batch (stored too). Flat keys:
``batch/<field>``, ``<variant>/state/<key>``, ``<variant>/outputs``, ``<variant>/features``,
``<variant>/loss``; the metadata holds the settings as JSON.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from macsc.cli.tiny_model import write_tiny_bert
from macsc.training.module import MaCSC

out = Path(sys.argv[1])
commit = sys.argv[2]
PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 16, "k": 4},
    "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
    "video": {"kind": "gaussian", "dim": 16, "k": 4, "seed": 2},
}
VARIANTS = {
    "separate": {"heads": 4},
    "shared_feed_forward": {"heads": 4, "shared": True, "feed_forward": True},
    "no_enhancement": {"enabled": False},
}
folder = Path(tempfile.mkdtemp())
backbone = str(write_tiny_bert(folder / "tiny_bert"))
sentences = ["a red apple", "the sky is very blue today", "snow", "a dog barks at the cat"]
tokenizer = AutoTokenizer.from_pretrained(backbone)
batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
batch["labels"] = torch.tensor([0, 1, 2, 0])
generator = torch.Generator().manual_seed(5)
batch["prototypes"] = {}
for name, spec in PROTOTYPES.items():
    mask = torch.ones(4, spec["k"], dtype=torch.bool)
    mask[1, -1] = False
    batch["prototypes"][name] = {
        "features": torch.randn(4, spec["k"], spec["dim"], generator=generator).half(),
        "mask": mask,
    }
tensors = {f"batch/{k}": v for k, v in batch.items() if k != "prototypes"}
for name, source in batch["prototypes"].items():
    tensors[f"batch/prototypes/{name}/features"] = source["features"]
    tensors[f"batch/prototypes/{name}/mask"] = source["mask"]
for variant, enhancer in VARIANTS.items():
    torch.manual_seed(0)
    model = MaCSC(
        backbone=backbone,
        modalities=["text", "image", "audio", "video"],
        prototypes=PROTOTYPES,
        task={"kind": "classification", "num_labels": 3},
        enhancer=enhancer,
        objective={"proj_dim": 8},
    )
    with torch.no_grad():  # every weight away from its initial value (norms, zero biases)
        for name, parameter in model.named_parameters():
            if not name.startswith("network.backbone."):
                parameter.add_(torch.empty_like(parameter).uniform_(-0.3, 0.3, generator=generator))
    model.eval()
    with torch.no_grad():
        forward = model(batch)
        losses = model.compute_losses(batch, forward)
    for key, value in model.state_dict().items():
        if not key.startswith("network.backbone."):
            # shared blocks are one tensor under every modality's key: stored once each
            tensors[f"{variant}/state/{key}"] = value.clone()
    tensors[f"{variant}/outputs"] = forward.outputs
    tensors[f"{variant}/features"] = forward.features
    tensors[f"{variant}/loss"] = losses["total"]
metadata = {"commit": commit, "prototypes": PROTOTYPES, "variants": VARIANTS}
save_file(tensors, out, metadata={"settings": json.dumps(metadata)})
