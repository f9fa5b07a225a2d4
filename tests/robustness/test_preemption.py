"""Surviving a cluster, through the ``macsc`` command: SLURM's requeue signal, a checkpoint
write killed midway, and a DDP rank that dies. Each run is compared with what an uninterrupted
run wrote (``--trainer.deterministic true``, a checkpoint after every step)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from macsc.training.checkpoints import PARTIAL_PREFIX, AtomicCheckpointIO
from macsc.training.module import MaCSC
from tests.robustness.test_resume_cli import (
    STEPS,
    assert_same_state,
    batch_log,
    checkpoint,
    finish,
    fit_command,
    read_log,
    start,
)

SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "macsc-test",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


#: a guard against a run that hangs (neither progresses nor exits), never a measure of speed:
#: every wait below ends on an event (a file appears, a log line is written, the process exits)
HANG = 3600


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until true; fail if ``process`` ended first (or hung for :data:`HANG`)."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"the run hung: no {what} after {HANG} s"
        time.sleep(0.05)


def test_requeue_signal_saves_a_clean_checkpoint_that_resumes_exactly(tiny_backbone, tmp_path):
    """SIGUSR1 under SLURM (``#SBATCH --signal=SIGUSR1@90``): the hpc checkpoint is written at
    the end of the step the signal arrived in, the job is requeued with ``scontrol``, and
    ``--ckpt_path hpc`` resumes it exactly."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (stubs / "scontrol").chmod(0o755)
    env = {
        **SLURM,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    root = tmp_path / "root"  # default_root_dir: where Lightning keeps hpc checkpoints
    first = tmp_path / "first"
    command = fit_command(tiny_backbone, first, "--trainer.default_root_dir", str(root))
    run = start(command, tmp_path, "first.log", **env)
    wait_for((first / "steps/step=4.ckpt").exists, run, "step 4")
    run.send_signal(signal.SIGUSR1)
    finish(run, tmp_path, "first.log")

    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    saved = checkpoint(root / "hpc_ckpt_1.ckpt")
    step = saved["global_step"]
    assert 4 < step < STEPS and saved["macsc_run_state"]["not_exact"] is None

    second = tmp_path / "second"
    command = fit_command(
        tiny_backbone, second, "--trainer.default_root_dir", str(root), "--ckpt_path", "hpc"
    )
    finish(start(command, tmp_path, "second.log", **env), tmp_path, "second.log")
    want, _ = read_log(first / "batches.jsonl")
    got, _ = read_log(second / "batches.jsonl")
    assert sorted(got) == list(range(step + 1, STEPS + 1))
    assert all(got[s] == want[s] for s in got)
    for later in range(step + 1, STEPS + 1):
        assert_same_state(second / f"steps/step={later}.ckpt", first / f"steps/step={later}.ckpt")


class StallCheckpointWrite(L.Callback):
    """Used below, as slow storage: after step ``step`` the next checkpoint write stops after its
    first bytes and hangs, having touched ``marker``; ``last.ckpt`` in ``folder`` is copied to
    ``kept`` first, as it was before that write began."""

    def __init__(self, step: int, folder: str, marker: str, kept: str) -> None:
        self.step, self.folder, self.marker, self.kept = step, folder, marker, kept

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        shutil.copy(Path(self.folder) / "last.ckpt", self.kept)
        save, marker = torch.save, self.marker

        class Stalling:
            def __init__(self, file) -> None:
                self.file = file

            def write(self, data) -> int:
                self.file.write(bytes(data)[:4096])
                self.file.flush()
                Path(marker).touch()
                time.sleep(600)

            def __getattr__(self, name):
                return getattr(self.file, name)

        torch.save = lambda obj, file, *args, **kwargs: save(obj, Stalling(file), *args, **kwargs)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(tiny_backbone, tmp_path):
    folder, marker, kept = tmp_path / "ckpts", tmp_path / "stalled", tmp_path / "kept.ckpt"
    callbacks = (
        "    - class_path: tests.robustness.test_preemption.StallCheckpointWrite\n"
        f"      init_args: {{step: 3, folder: {folder}, marker: {marker}, kept: {kept}}}\n"
        "    - class_path: macsc.training.checkpoints.LastCheckpoint\n"
        f"      init_args: {{dirpath: {folder}, every_n_train_steps: 1}}\n"
    )
    command = fit_command(tiny_backbone, tmp_path / "run", callbacks=callbacks)
    run = start(command, tmp_path, "run.log")
    wait_for(marker.exists, run, "the stalled write")
    run.kill()
    run.wait()

    # the write was under way: a partial file, not loadable
    (partial,) = [p for p in folder.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert 0 < partial.stat().st_size < kept.stat().st_size
    # last.ckpt is still the complete file of step 2, byte for byte, and loads
    assert (folder / "last.ckpt").read_bytes() == kept.read_bytes()
    assert checkpoint(folder / "last.ckpt")["global_step"] == 2
    MaCSC.load_from_checkpoint(folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".ckpt") == ["last.ckpt"]


DDP = [
    "--trainer.devices",
    "2",
    "--trainer.strategy",
    "lightning.pytorch.strategies.DDPStrategy",
]


def wait_for_rank(root: Path, rank: int, step: int, run: subprocess.Popen) -> int:
    """Wait until DDP rank ``rank`` has finished step ``step``; return its pid."""
    path = batch_log(root / "batches.jsonl", rank)
    wait_for(lambda: step in read_log(path)[0], run, f"rank {rank} at step {step}")
    return next(json.loads(line)["pid"] for line in path.read_text().splitlines())


def test_a_dead_rank_stops_the_run_with_a_clear_error_and_last_resumes_it(tiny_backbone, tmp_path):
    """SIGKILL one of two DDP ranks mid-epoch: the other stops with one clear line, and
    ``--ckpt_path last`` resumes exactly (3 steps an epoch on each rank; ``last.ckpt`` is written
    after each epoch's validation). No clock: the survivor's exit is the event waited for, and
    its error shows it saw the dead rank's connection close -- not the process-group timeout,
    which is set far beyond any start-up so that a loaded machine cannot trip it."""
    first = tmp_path / "first"
    options = [*DDP, "--trainer.strategy.timeout", "1:00:00"]
    run = start(fit_command(tiny_backbone, first, *options), tmp_path, "first.log")
    pid = wait_for_rank(first, 1, 8, run)  # mid-way through the third epoch
    os.kill(pid, signal.SIGKILL)
    code = run.wait()
    output = (tmp_path / "first.log").read_text()
    assert code == 1, (code, output[-3000:])
    assert "macsc: error: rank 0: a collective operation with the other ranks failed" in output
    error = next(line for line in output.splitlines() if line.startswith("macsc: error:"))
    assert "Connection closed by peer" in error or "Connection reset by peer" in error, error
    assert "Resume with --ckpt_path last" in output
    last = next(first.rglob("last.ckpt"))
    saved_at = checkpoint(last)["global_step"]
    written = sorted(int(p.stem.split("=")[1]) for p in (first / "steps").glob("step=*.ckpt"))
    assert saved_at == 6 and written[-1] > saved_at, (saved_at, written)

    # the resumed run logs beside the first (same save_dir), so `last` finds its last.ckpt
    second = tmp_path / "second"
    resume = ["--ckpt_path", "last", "--trainer.logger.init_args.save_dir", str(first)]
    finish(
        start(fit_command(tiny_backbone, second, *options, *resume), tmp_path, "second.log"),
        tmp_path,
        "second.log",
    )
    for rank in (0, 1):
        want, _ = read_log(batch_log(first / "batches.jsonl", rank))
        got, _ = read_log(batch_log(second / "batches.jsonl", rank))
        assert min(got) == saved_at + 1
        assert all(got[s] == want[s] for s in want if s > saved_at), rank
    for step in (s for s in written if s > saved_at):
        assert_same_state(second / f"steps/step={step}.ckpt", first / f"steps/step={step}.ckpt")


def test_a_write_that_fails_leaves_the_previous_checkpoint_and_no_partial_file(
    tmp_path, monkeypatch
):
    """A full disk: the error reaches the caller, the previous file is untouched."""
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.arange(1000.0)}, target)
    before = target.read_bytes()

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(1000)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
