"""Where MaCSC's extra step time goes, part by part, at a backbone's shape (issue 12): what the
end-to-end ratio of ``step_overhead.py`` cannot resolve when the overhead is a few percent of a
long step on a shared machine.

The same models and batches as ``step_overhead.py --shape ...``. Measured, each as a median,
the models' parts taking turns (so that the machine's load swings hit them alike):

- ``text step``: the text-only model's full training step (forward, backward, AdamW, schedule);
- ``after the backbone``: forward and backward of everything that runs after the backbone, the
  backbone replaced by its output computed once (a leaf tensor that takes the gradient), for
  the text-only model (its head), MaCSC without ``L_msb`` (enhancers, branch heads) and MaCSC
  (plus the self-balancing calibration);
- ``AdamW``: one optimizer step (fused, as ``configure_optimizers`` makes it) of each model.

The overhead estimate is ``1 + (extra after-backbone time + extra AdamW time) / text step``.

    python benchmarks/step_parts.py [--shape bert-base] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common
import step_overhead
import torch
from torch import nn

ORDER = ("macsc", "text")


class FixedOutput(nn.Module):
    """Stands in for a backbone (an encoder-only one): returns ``states`` whatever the input."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states
        self.config = SimpleNamespace(is_encoder_decoder=False)

    def forward(self, **_) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.states)


def alternating(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each of ``runs`` (name -> callable), called in turn ``repeats`` times
    after one warm-up call each (alternating cancels the machine's load swings)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_backward(model, batch: dict, states: torch.Tensor):
    """What runs after the backbone, forward and backward, the backbone's output fixed."""
    model.network.backbone = FixedOutput(states)

    def run():
        model.compute_losses(batch, model(batch))["total"].backward()
        states.grad = None
        model.zero_grad(set_to_none=True)

    return run


def run(shape: str = "bert-base", repeats: int = 20, steps: int = 3) -> dict[str, float]:
    common.quiet()
    with tempfile.TemporaryDirectory() as folder:
        backbone = common.BACKBONE
        if shape == "bert-base":
            backbone = common.write_bert_base(Path(folder) / "bert-base")
        tokens = step_overhead.SHAPES[shape]["tokens"]
        batch = step_overhead.prepare_batches(Path(folder), 1, tokens)[0]
        trainees = {v: common.Trainee(common.build_model(v, backbone=backbone)) for v in ORDER}
        text = trainees["text"]
        result = alternating({"text step": functools.partial(text.step, batch)}, steps)
        for trainee in trainees.values():  # every parameter has a gradient
            trainee.model.compute_losses(batch, trainee.model(batch))["total"].backward()
        optimizers = {f"AdamW {v}": t.optimizer.step for v, t in trainees.items()}
        result |= alternating(optimizers, repeats)
        with torch.no_grad():
            states = text.model.network.encode(batch).detach()
        states.requires_grad_(True)
        without = common.build_model("macsc", backbone=backbone).train()
        without.objective.calibration = None  # what objective.lambda_msb: 0 builds
        models = {
            "text": text.model,
            "macsc without L_msb": without,
            "macsc": trainees["macsc"].model,
        }
        parts = {
            f"after the backbone: {n}": forward_backward(m, batch, states)
            for n, m in models.items()
        }
        result |= alternating(parts, repeats)
    extra = (
        result["after the backbone: macsc"]
        - result["after the backbone: text"]
        + result["AdamW macsc"]
        - result["AdamW text"]
    )
    result["estimated time ratio"] = 1 + extra / result["text step"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(step_overhead.SHAPES), default="bert-base")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    for name, value in run(args.shape, args.repeats).items():
        unit = "x" if "ratio" in name else " ms"
        print(f"{name}: {value:.3f}{unit}" if unit == "x" else f"{name}: {value * 1e3:.1f}{unit}")


if __name__ == "__main__":
    main()
