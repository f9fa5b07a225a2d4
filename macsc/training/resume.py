"""The run state an exact resume needs beyond what Lightning saves, as one callback.

Lightning's checkpoint holds the weights, the optimiser and scheduler, the loop counters and the
training loader's position (``ResumableDataLoader.state_dict``). :class:`RunState` adds the rest
and makes each part take effect, in every checkpoint a user can get (``ModelCheckpoint``,
``last.ckpt``, the SLURM requeue checkpoint, ``trainer.save_checkpoint``):

- the random streams dropout draws from (torch CPU and CUDA, Python, NumPy), saved with the
  checkpoint and restored when the resumed fit starts;
- the training loader's position, which Lightning drops when ``configure_optimizers`` reads
  ``trainer.estimated_stepping_batches`` (Lightning issue 20550), loaded here in that case;
- where in a step the checkpoint was written: one written inside a training step (a signal
  handler, an exception) or between the micro-batches of an accumulated step cannot be resumed
  exactly, and resuming from it warns, naming why;
- SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``): Lightning saves ``hpc_ckpt_N.ckpt``
  from inside the signal handler, wherever training is; here the save waits for the end of the
  current optimizer step (on every rank at the same step), so the checkpoint is a clean one;
- checkpoint files are written atomically (:class:`macsc.training.checkpoints.AtomicCheckpointIO`).

The MaCSC model adds this callback itself (``configure_callbacks``); nothing needs configuring.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from macsc.errors import first_line
from macsc.training.checkpoints import AtomicCheckpointIO

#: the checkpoint key of the run state; checkpoints of earlier versions have ``macsc_rng`` only
CHECKPOINT_KEY = "macsc_run_state"
LEGACY_RNG_KEY = "macsc_rng"


def collect_rng(device: torch.device) -> dict[str, Any]:
    """The global random streams, in types that load with ``weights_only=True``."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the streams saved by :func:`collect_rng` (or the ``cpu``/``cuda`` pair of earlier
    checkpoints)."""
    torch.set_rng_state(state.get("torch", state.get("cpu")))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
        )


def mid_step_reason(trainer: L.Trainer) -> str | None:
    """Why a checkpoint written now could not be resumed exactly, or None when it can: it is
    written inside a training step, or after a micro-batch whose gradients are still being
    accumulated (neither the partial step nor accumulated gradients are saved)."""
    if trainer.state.fn != "fit" or trainer.sanity_checking:
        return None
    epoch_loop = trainer.fit_loop.epoch_loop
    progress = epoch_loop.batch_progress.current
    if not progress.ready == progress.started == progress.processed:
        return (
            f"it was written inside training step {trainer.global_step + 1} (by a signal handler "
            "or an exception), and the partial step is not in it"
        )
    accumulate = trainer.accumulate_grad_batches
    if (
        accumulate > 1
        and progress.processed % accumulate != 0
        and not epoch_loop.batch_progress.is_last_batch
        and progress.processed != trainer.num_training_batches
    ):
        return (
            f"it was written after micro-batch {progress.processed % accumulate} of "
            f"{accumulate} of an accumulated step, and the accumulated gradients are not in it"
        )
    return None


def _pending_loader_states(trainer: L.Trainer) -> list[dict[str, Any]]:
    """The training loader states Lightning read from the checkpoint but has not loaded.

    When ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, Lightning builds
    the training loader before it restores the checkpoint, and never loads the saved states
    into it (Lightning issue 20550): the resumed run would repeat the epoch from its first batch.
    Those states wait in a private list of the fit loop; empty when Lightning did load them.
    """
    return list(getattr(trainer.fit_loop, "_combined_loader_states_to_load", None) or [])


def _start_next_epoch(trainer: L.Trainer) -> None:
    """Resume a checkpoint written at the end of an epoch (``on_train_epoch_end``: an
    ``every_n_epochs`` ModelCheckpoint, or a monitored one when validation runs once per epoch)
    at the start of the next epoch, as an uninterrupted run goes on.

    When ``max_steps`` is set, Lightning 2.6 restarts such a checkpoint inside the finished
    epoch: it runs no batch, ends that epoch a second time (its end hooks run again) and counts
    it twice, so the next epoch gets the data order of the one after it, and ``max_epochs``
    stops training an epoch early. (Without ``max_steps`` Lightning resumes it correctly, along
    the path taken here: the epoch counted complete, the next one started afresh.)
    """
    fit_loop = trainer.fit_loop
    fit_loop.epoch_progress.increment_completed()
    fit_loop.reset_restart_stage()
    fit_loop.epoch_loop.reset_restart_stage()
    # not restarting: the epoch loop resets its per-epoch counters and starts the epoch
    fit_loop._restarting = False
    fit_loop.epoch_loop.restarting = False


#: where the Python frames that call a collective live: ``torch.distributed`` itself, and DDP's
#: module, whose forward broadcasts buffers (``_sync_buffers``) before every step
COLLECTIVE_CALLERS = (
    os.path.join("torch", "distributed", ""),
    os.path.join("torch", "nn", "parallel", "distributed.py"),
)
#: autograd's engine: DDP's gradient all-reduce runs inside ``backward()`` in C++, so a rank that
#: dies then fails the others with no Python frame of ``torch.distributed`` in the traceback
AUTOGRAD_ENGINE = os.path.join("torch", "autograd", "")
#: what a collective backend's own error names (gloo: ``.../third_party/gloo/gloo/transport/...``)
BACKEND_MARKERS = ("gloo", "NCCL", "ProcessGroup")


def _raised_by_torch_distributed(exception: BaseException) -> bool:
    """Whether the exception comes from a ``torch.distributed`` collective (gloo and NCCL
    raise plain RuntimeErrors): the innermost Python frame is one of :data:`COLLECTIVE_CALLERS`,
    or autograd's engine with the backend named in the message (DDP's gradient all-reduce in
    ``backward()``). A rank that dies while another is in DDP's buffer broadcast fails in
    ``torch/nn/parallel``, not in ``torch/distributed``."""
    if isinstance(exception, getattr(torch.distributed, "DistError", ())):
        return True
    if not isinstance(exception, RuntimeError):
        return False
    traceback, innermost = exception.__traceback__, None
    while traceback is not None:
        innermost, traceback = traceback.tb_frame, traceback.tb_next
    where = innermost.f_code.co_filename if innermost is not None else ""
    if any(caller in where for caller in COLLECTIVE_CALLERS):
        return True
    return AUTOGRAD_ENGINE in where and any(marker in str(exception) for marker in BACKEND_MARKERS)


def lost_rank_message(exception: BaseException) -> str | None:
    """The one-line explanation :class:`RunState` attached to an exception that ended a DDP
    run because another rank died or hung, or None for any other exception."""
    return getattr(exception, "macsc_lost_rank", None)


class RunState(L.Callback):
    """Saves and restores the run state of an exact resume (see the module docstring)."""

    def __init__(self) -> None:
        self._rng_to_restore: dict[str, Any] | None = None
        self._requeue = _DeferredRequeue()

    # ------------------------------------------------------------------------ set-up and end
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # only Lightning's plain default is replaced; a configured CheckpointIO is the user's
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # restored here: between this and the first step nothing draws random numbers
        # (validation runs in eval mode, the loaders have their own generators)
        state, self._rng_to_restore = self._rng_to_restore, None
        if state is not None:
            restore_rng(state, pl_module.device)
        if _pending_loader_states(trainer) and trainer.fit_loop.restarting:
            trainer.fit_loop._load_combined_loader_states()
            # the loader's iterator was made before the restore: make it again from the state
            iter(trainer.fit_loop._data_fetcher)
        if getattr(trainer.fit_loop, "restarted_on_epoch_end", False):
            _start_next_epoch(trainer)
        self._requeue.install(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._requeue.step_started(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._requeue.step_ended(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requeue.uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._requeue.uninstall()
        if trainer.world_size > 1 and _raised_by_torch_distributed(exception):
            timeout = getattr(trainer.strategy, "_timeout", None)
            exception.macsc_lost_rank = (
                f"rank {trainer.global_rank}: a collective operation with the other ranks failed "
                f"({first_line(exception)}): another rank died or stopped answering, so the run "
                "stopped. Resume with --ckpt_path last (or a checkpoint's path); a rank waits "
                f"for a silent one at most the process-group timeout ({timeout}; set it with "
                "--trainer.strategy lightning.pytorch.strategies.DDPStrategy "
                "--trainer.strategy.timeout H:MM:SS)"
            )
            # the ranks this process started would wait for it until their own timeout
            launcher = trainer.strategy.launcher
            if launcher is not None and hasattr(launcher, "kill"):
                launcher.kill(signal.SIGKILL)

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "rng": every_rank(trainer, collect_rng(pl_module.device)),
            "not_exact": mid_step_reason(trainer),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return
        state = checkpoint.get(CHECKPOINT_KEY)
        where = f"checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else "the checkpoint"
        if state is None:
            self._rng_to_restore = checkpoint.get(LEGACY_RNG_KEY)
            if self._rng_to_restore is None:
                rank_zero_warn(
                    f"{where} has no random-number state (it was not written by a macsc model): "
                    "the resumed run's dropout differs from the uninterrupted run's, so the "
                    "resume is not exact"
                )
            elif trainer.world_size > 1:
                rank_zero_warn(
                    f"{where} holds the random-number state of rank 0 only (it was written by an "
                    "earlier macsc): the other ranks' dropout differs from the uninterrupted "
                    "run's, so the resume is not exact"
                )
            return
        states = state["rng"]
        self._rng_to_restore = states[min(trainer.global_rank, len(states) - 1)]
        reasons = [state["not_exact"]] if state.get("not_exact") else []
        if len(states) != trainer.world_size:
            reasons.append(
                f"it was written by {len(states)} process(es) and this run has "
                f"{trainer.world_size}, so each one's share of the data and random numbers differ"
            )
        if reasons:
            rank_zero_warn(
                f"resuming from {where} is not exact: {'; '.join(reasons)}. Resume from a "
                "checkpoint written between optimizer steps (ModelCheckpoint, last.ckpt, or the "
                "hpc checkpoint macsc writes on SLURM's requeue signal), on as many devices"
            )


def every_rank(trainer: L.Trainer, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (one collective under DDP: every rank writes each
    checkpoint together). Each rank's random streams are its own: the ranks' batches differ in
    length, so dropout draws a different count of numbers on each."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    values: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


class _DeferredRequeue:
    """Holds SLURM's requeue signal until the end of the current optimizer step, then lets
    Lightning's own handler save ``hpc_ckpt_N.ckpt`` and requeue the job.

    Lightning saves the checkpoint from inside the signal handler, wherever the main thread is
    (in a forward pass, between a backward and its optimizer step, on one DDP rank before the
    others): such a checkpoint cannot be resumed exactly, and under DDP the ranks' collectives
    can interleave. Here the handler only takes note; at the end of each optimizer step the
    ranks agree whether any of them was signalled (one all-reduce per step, only while SLURM
    auto-requeue is on and there are several ranks) and, if so, all save together.
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._lightning_handler: Any = None
        self._signalled = False
        self._done = False
        self._step_at_start = 0

    def install(self, trainer: L.Trainer) -> None:
        connector = getattr(trainer, "_accelerator_connector", None)
        environment = getattr(connector, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        signum = environment.requeue_signal
        handler = signal.getsignal(signum)
        if not callable(handler):  # Lightning installed none: nothing to defer
            return
        self._signal, self._lightning_handler = signum, handler
        self._signalled = self._done = False
        signal.signal(signum, self._note)

    def uninstall(self) -> None:
        if self._signal is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signal, self._lightning_handler)
        self._signal = None

    def _note(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def step_started(self, trainer: L.Trainer) -> None:
        self._step_at_start = trainer.global_step

    def step_ended(self, trainer: L.Trainer) -> None:
        if self._signal is None or self._done or trainer.global_step == self._step_at_start:
            return  # not on SLURM, already requeued, or between micro-batches of one step
        signalled = self._signalled
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled:
            return
        self._done = True
        name = signal.Signals(self._signal).name
        rank_zero_info(f"SLURM requeue signal {name}: hpc checkpoint of step {trainer.global_step}")
        self._lightning_handler(self._signal, None)
