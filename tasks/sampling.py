"""Which training examples are used, the training order, and the loader that can resume it
mid-epoch.

:func:`training_indices` picks the examples ``data_fraction`` and ``max_train_examples`` keep.

:class:`ResumableSampler` (and :class:`LengthGroupedSampler`) fix the order of every epoch from
``(seed, epoch)`` alone; :class:`ResumableDataLoader` counts the batches it has handed out in
the current epoch, so that a checkpoint can say where training stood and a resumed run can
start the same epoch at the next batch (SPEC: an exact resume sees the batches the
uninterrupted run would have seen).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

#: fewer training batches an epoch than this, because data_fraction or max_train_examples cut
#: the split, is warned about: the run would train on a sliver of the data
FEW_BATCHES = 4


def fraction_indices(size: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``fraction`` of ``size`` examples (at least one).

    Depends only on ``(size, fraction, seed)``, so every DDP rank, and ``prepare_data`` and
    ``setup``, pick the same subset.
    """
    if fraction >= 1.0:
        return list(range(size))
    return sample_indices(size, max(1, round(size * fraction)), seed)


def sample_indices(size: int, count: int, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``count`` of ``size`` examples (all when ``count``
    is ``size`` or more); depends only on ``(size, count, seed)``."""
    if count >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


def training_indices(
    size: int, fraction: float, max_examples: int | None, seed: int
) -> tuple[list[int], list[str]]:
    """The training examples in use out of ``size``: a ``fraction`` of them, then at most
    ``max_examples`` of those; and the options that cut something (``data_fraction=0.02``),
    none when every example is used."""
    indices, cuts = list(range(size)), []
    if fraction < 1.0:
        indices = fraction_indices(size, fraction, seed)
        cuts.append(f"data_fraction={fraction:g}")
    if max_examples is not None and len(indices) > max_examples:
        indices = [indices[i] for i in sample_indices(len(indices), max_examples, seed)]
        cuts.append(f"max_train_examples={max_examples}")
    return indices, cuts


def warn_if_few_batches(
    used: int, total: int, cuts: list[str], batch_size: int, world_size: int = 1
) -> None:
    """Warn, naming the options in ``cuts``, when they leave fewer than :data:`FEW_BATCHES`
    batches an epoch of the ``total`` training examples."""
    batches = -(-used // (batch_size * world_size))
    if cuts and used < total and batches < FEW_BATCHES:
        rank_zero_warn(
            f"data option {' and '.join(cuts)} leaves {used} of the {total} training examples: "
            f"{batches} batch{'es' if batches > 1 else ''} of {batch_size} an epoch; raise it "
            "(--data.init_args.data_fraction 1.0 and --data.init_args.max_train_examples null "
            "use every example)"
        )


class ResumableSampler(DistributedSampler):
    """The training order: a permutation seeded by ``(seed, epoch)``, this rank's share of it,
    and the option to start an epoch part-way (a mid-epoch resume).

    Being a ``DistributedSampler``, Lightning uses it as is (no re-wrapping, no reshuffling) and
    calls ``set_epoch`` on it. Under DDP each rank gets ``ceil(N / world_size)`` examples (a few
    repeated to even out), so every rank's k-th batch has the same size, which the all-gather of
    ``gather_across_devices`` needs.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self._skip = 0

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next epoch this sampler starts."""
        self._skip = count

    def __iter__(self):
        skip, self._skip = self._skip, 0
        return itertools.islice(self.indices(), skip, None)

    def indices(self):
        """This rank's indices for the current epoch, in order."""
        return super().__iter__()


class LengthGroupedSampler(ResumableSampler):
    """Shuffled order in which neighbouring examples have similar lengths (less padding).

    Each epoch: a seeded permutation, cut into mega-batches of 50 batches, each sorted by length,
    cut into batches whose order is shuffled again. Under DDP each rank takes every
    ``world_size``-th index of that order, so its batches stay length-homogeneous.
    """

    MEGA_BATCHES = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        super().__init__(lengths, seed)
        self.lengths = lengths
        self.batch_size = batch_size

    def indices(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        step = self.batch_size * self.num_replicas  # one batch on every rank
        span = step * self.MEGA_BATCHES
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i : i + step] for i in range(0, len(chunk), step)]
        grouped = [i for b in torch.randperm(len(batches), generator=generator) for i in batches[b]]
        grouped += grouped[: self.total_size - len(grouped)]
        return iter(grouped[self.rank : self.total_size : self.num_replicas])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch, so a resumed run sees the batches the
    uninterrupted run would have seen.

    Lightning saves :meth:`state_dict` (the epoch, the batches handed out in it, and how many
    batches an epoch has) in every checkpoint and calls :meth:`load_state_dict` before the first
    batch of a resumed fit (``macsc.training.resume.RunState`` makes sure it does); the next epoch
    started in the saved epoch then skips those batches, in the sampler (no skipped batch is
    loaded). Needs a :class:`ResumableSampler` to resume; with any other sampler it is a plain
    DataLoader.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._yielded = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        # a generator: nothing is read before the first batch is asked for, by which time
        # Lightning has called set_epoch on the sampler (and a resumed run has loaded the state)
        epoch = getattr(self.sampler, "epoch", 0)
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume and resume["epoch"] == epoch else 0
        if skip >= len(self):  # saved at the end of that epoch: nothing is left of it
            skip = 0
        if skip:
            self.sampler.skip_next(skip * self.batch_size)
        self._epoch, self._yielded = epoch, skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded, "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(
                f"cannot resume a DataLoader with a {type(self.sampler).__name__} mid-epoch; "
                "it needs a ResumableSampler"
            )
        saved = state.get("num_batches")
        if saved is not None and int(saved) != len(self) and 0 < int(state["batches"]) < saved:
            rank_zero_warn(
                f"the checkpoint was saved after batch {state['batches']} of {saved} in epoch "
                f"{state['epoch']}, but an epoch now has {len(self)} batches (another batch size, "
                "data_fraction, data or number of devices): the resumed run skips "
                f"{state['batches']} batches of a different order, so it is not the "
                "uninterrupted run's continuation"
            )
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
