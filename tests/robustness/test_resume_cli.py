"""Exact resume through the ``macsc`` command, from each checkpoint a user gets.

One uninterrupted run (``--trainer.deterministic true``, as docs/reliability.md tells
users to check) writes every kind of checkpoint: ``ModelCheckpoint(every_n_train_steps)`` after
every step, ``every_n_epochs`` at each epoch's end, a monitored one after each validation (one
of them mid-epoch), and the shipped pair ``best.ckpt`` / ``last.ckpt``. Runs resumed from several
of them, at different steps, must write bit-identical later checkpoints (weights, optimiser
moments, scheduler) and train on the same batches. The run's monitored score gets worse after
its best validation, so ``best.ckpt`` and ``last.ckpt`` must differ.

48 training examples in batches of 8: six steps per epoch; validation every 3 steps; stop at
step 14, in the third epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from macsc.cli import main
from tests.cli.test_cli import demo_args

MACSC = str(Path(sys.executable).parent / "macsc")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 14
RUN_OPTIONS = [
    "--trainer.max_steps",
    str(STEPS),
    "--trainer.max_epochs",
    "3",
    "--trainer.deterministic",
    "true",
    "--trainer.val_check_interval",
    "3",
    "--trainer.limit_val_batches",
    "1",
    "--data.init_args.batch_size",
    "8",
    "--data.init_args.data_fraction",
    "0.06",
    "--model.modalities",
    "[text, image, audio]",
]


class BatchLog(L.Callback):
    """Used in the runs below: appends each training step's example ids, and each validation's
    ``val/loss``, to ``path`` (JSON lines; :func:`batch_log` names each DDP rank's file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, trainer, record: dict) -> None:
        with open(batch_log(Path(self.path), trainer.global_rank), "a") as file:
            file.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, {"pid": os.getpid()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        examples = batch["example_index"].tolist()
        self._write(trainer, {"step": trainer.global_step, "examples": examples})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            loss = float(trainer.callback_metrics["val/loss"])
            self._write(trainer, {"step": trainer.global_step, "val_loss": loss})


def batch_log(path: Path, rank: int = 0) -> Path:
    """The :class:`BatchLog` file of DDP rank ``rank``: ``path``, ``path.rank1``, ..."""
    return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")


def standard_callbacks(root: Path) -> str:
    """The shipped pair, ``best.ckpt`` monitoring ``val/loss`` in mode max (so that the best
    validation is an early one), a checkpoint after every step (the reference the resumed runs
    are compared with) and :class:`BatchLog`, as config-file lines."""
    return (
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/loss, mode: max, filename: best}\n"
        "    - class_path: macsc.training.checkpoints.LastCheckpoint\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {root / 'steps'}, filename: '{{step}}', "
        "every_n_train_steps: 1, save_top_k: -1}\n"
        "    - class_path: tests.robustness.test_resume_cli.BatchLog\n"
        f"      init_args: {{path: {root / 'batches.jsonl'}}}\n"
    )


def fit_command(backbone: str, root: Path, *extra: str, callbacks: str | None = None) -> list[str]:
    """``macsc fit`` on the demo config with :data:`RUN_OPTIONS`, logging into ``root``, with
    ``callbacks`` (config-file lines; :func:`standard_callbacks` by default)."""
    root.mkdir(parents=True, exist_ok=True)
    overlay = root / "callbacks.yaml"
    overlay.write_text("trainer:\n  callbacks:\n" + (callbacks or standard_callbacks(root)))
    args = demo_args(backbone, root, "--config", str(overlay))
    return [MACSC, "fit", *args, *RUN_OPTIONS, *extra]


def run_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        # this checkout's code, and the callbacks of this file (tests.robustness.test_resume_cli)
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def start(command: list[str], cwd: Path, log: str, **env: str) -> subprocess.Popen:
    """Start ``command`` (single-threaded), its output going to ``cwd/log``."""
    with open(cwd / log, "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=run_env(**env), cwd=cwd
        )


def finish(process: subprocess.Popen, cwd: Path, log: str) -> None:
    """Wait for a command of :func:`start` to exit (no deadline: however loaded the machine);
    fail with the end of its output unless it ran."""
    code = process.wait()
    assert code == 0, f"{log}: exit {code}\n" + (cwd / log).read_text()[-3000:]


def run_all(commands: dict[str, list[str]], cwd: Path) -> None:
    """Run the commands side by side."""
    processes = {name: start(command, cwd, f"{name}.log") for name, command in commands.items()}
    for name, process in processes.items():
        finish(process, cwd, f"{name}.log")


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(got: Path, want: Path) -> None:
    """Two checkpoints hold the same training state: the same step, epoch and position in that
    epoch's order, and bit-identical weights, optimiser state and scheduler."""
    a, b = checkpoint(got), checkpoint(want)
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]), got.name
    loader = ("loops", "fit_loop", "state_dict", "combined_loader")
    assert _get(a, loader) == _get(b, loader), got.name
    assert_same_weights(got, want)


def assert_same_weights(got: Path, want: Path) -> None:
    """Bit-identical weights, optimiser state and scheduler of two checkpoints."""
    a, b = checkpoint(got), checkpoint(want)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in b["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{got.name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_b["state"].items():
        for name, value in state.items():
            assert torch.equal(opt_a["state"][index][name], value), (got.name, index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def _get(tree: dict, keys: tuple[str, ...]):
    for key in keys:
        tree = tree[key]
    return tree


def read_log(path: Path) -> tuple[dict[int, list[int]], dict[int, float]]:
    """(step -> example ids, step -> val/loss) from a :class:`BatchLog` file."""
    batches, validations = {}, {}
    lines = path.read_text().splitlines() if path.exists() else []
    for record in map(json.loads, lines):
        if "examples" in record:
            batches[record["step"]] = record["examples"]
        elif "val_loss" in record:
            validations[record["step"]] = record["val_loss"]
    return batches, validations


# where each checkpoint a user gets is written (relative to a run's folder), and at which step
# 8:  every_n_train_steps, after step 8: mid-way through the second epoch (skip 2 batches)
# 6:  every_n_epochs, at the end of the first epoch (its validation is behind it)
# 9:  monitored, after the mid-epoch validation of step 9 (skip 3 batches of epoch 2)
CASES = {
    "every_n_train_steps": ("steps/step=8.ckpt", 8),
    "every_n_epochs": ("epochs/epoch=0.ckpt", 6),
    "monitor_after_mid_epoch_validation": ("validations/step=9.ckpt", 9),
}
EXTRA_CALLBACKS = (
    "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
    "      init_args: {dirpath: ROOT/epochs, filename: '{epoch}', every_n_epochs: 1,"
    " save_top_k: -1, save_on_train_epoch_end: true}\n"
    "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
    "      init_args: {dirpath: ROOT/validations, filename: '{step}', monitor: val/accuracy,"
    " mode: max, save_top_k: -1}\n"
)


@pytest.fixture(scope="module")
def runs(tiny_backbone, tmp_path_factory):
    """The uninterrupted run (``reference``), then one run resumed from each of :data:`CASES`,
    side by side."""
    base = tmp_path_factory.mktemp("resume_cli")
    reference = base / "reference"
    callbacks = standard_callbacks(reference) + EXTRA_CALLBACKS.replace("ROOT", str(reference))
    run_all({"reference": fit_command(tiny_backbone, reference, callbacks=callbacks)}, base)
    resumed = {}
    for case, (source, _) in CASES.items():
        resumed[case] = fit_command(
            tiny_backbone, base / case, "--ckpt_path", str(reference / source)
        )
    run_all(resumed, base)
    return base


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_equals_the_uninterrupted_one(runs, case):
    source, step = CASES[case]
    reference, resumed = runs / "reference", runs / case
    assert checkpoint(reference / source)["global_step"] == step
    want_batches, _ = read_log(reference / "batches.jsonl")
    got_batches, _ = read_log(resumed / "batches.jsonl")
    assert sorted(got_batches) == list(range(step + 1, STEPS + 1))
    for later in got_batches:
        assert got_batches[later] == want_batches[later], later
    for later in range(step + 1, STEPS + 1):
        assert_same_state(
            resumed / f"steps/step={later}.ckpt", reference / f"steps/step={later}.ckpt"
        )


def test_best_and_last_checkpoints_after_a_run_whose_score_gets_worse(runs):
    reference = runs / "reference"
    _, validations = read_log(reference / "batches.jsonl")
    assert sorted(validations) == [3, 6, 9, 12]
    best_step = max(validations, key=lambda s: (validations[s], -s))  # the first of the best
    assert best_step < 12, validations  # the score got worse after its best: last != best
    folder = next(reference.rglob("checkpoints"))
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert checkpoint(folder / "best.ckpt")["global_step"] == best_step
    assert_same_state(folder / "best.ckpt", reference / f"steps/step={best_step}.ckpt")
    # the final state, though the run stopped (max_steps) between two validations; written at
    # the end of training, so its loops count the last epoch complete
    assert_same_weights(folder / "last.ckpt", reference / f"steps/step={STEPS}.ckpt")


def test_ckpt_path_last_finds_nothing_is_an_error(tiny_backbone, tmp_path, capsys):
    """Lightning would warn and train from scratch (or test an untrained model)."""
    args = demo_args(tiny_backbone, tmp_path, "--ckpt_path", "last")
    assert main(["fit", *args]) == 2
    assert "macsc: error: --ckpt_path last: no last.ckpt in" in capsys.readouterr().err


def test_every_shipped_config_writes_best_and_last():
    configs = [  # the experiment configs (overlays such as cpu.yaml name no data module)
        path
        for path in (ROOT / "lightning_configs").glob("*.yaml")
        if "class_path" in yaml.safe_load(path.read_text()).get("data", {})
    ]
    assert len(configs) >= 10
    for config in configs:
        callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
        classes = [callback["class_path"] for callback in callbacks]
        assert classes.count("macsc.training.checkpoints.LastCheckpoint") == 1, config.name
        (best,) = [c for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")]
        assert best["init_args"]["filename"] == "best", config.name
        assert "save_last" not in best["init_args"], config.name
