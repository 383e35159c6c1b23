"""How a global batch is shared out among the processes of a (possibly distributed) run, seeds per rank and
step, samplers that continue where a resumed run stopped, and evaluation batches dealt whole to the processes."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def rank_and_world_size(datamodule: LightningDataModule) -> tuple[int, int]:
    """``(rank, world size)`` of this process; outside a Trainer the run counts as one process."""
    trainer = datamodule.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def per_device_batch(datamodule: LightningDataModule, batch_size: int) -> tuple[int, int, int]:
    """``(per-device batch size, rank, world size)`` for the global ``batch_size``; a clear error if it doesn't divide.

    Outside a Trainer the run counts as one process.
    """
    rank, world_size = rank_and_world_size(datamodule)
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
    return batch_size // world_size, rank, world_size


def step_seed(base: int, rank: int = 0, step: int = 0, attempt: int = 0) -> int:
    """A seed for one rank at one step (an epoch, an optimiser step): different across ranks, steps and attempts
    (e.g. a retry after a rollback), and the same when a resumed run reaches the same step again."""
    return int(base) + 1_000_003 * int(rank) + 7_919 * int(step) + 104_729 * int(attempt)


def step_generator(base: int, rank: int = 0, step: int = 0, attempt: int = 0, device=None):
    """A ``torch.Generator`` on ``device`` seeded with ``step_seed``."""
    return torch.Generator(device=device or "cpu").manual_seed(step_seed(base, rank, step, attempt))


class EpochPermutation(torch.utils.data.Sampler[int]):
    """A shuffle whose order depends only on the seed and the epoch (one permutation per pass), so an epoch's order
    does not depend on how much of the previous one was read."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=step_generator(self.seed, step=self.epoch))
        self.epoch += 1
        yield from order.tolist()

    def __len__(self) -> int:
        return self.size


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A deterministic sampler whose first pass starts where a resumed run stopped: it replays (and discards) what
    the epochs and batches before drew, so the samples that follow are those of the uninterrupted run."""

    def __init__(self, sampler: torch.utils.data.Sampler[int], skip_epochs: int, skip_samples: int,
                 samples_per_epoch: int) -> None:
        self.sampler, self.skip_epochs, self.skip_samples = sampler, skip_epochs, skip_samples
        self.samples_per_epoch = samples_per_epoch

    def __iter__(self):
        skip_epochs, skip_samples = self.skip_epochs, self.skip_samples
        self.skip_epochs = self.skip_samples = 0  # later epochs run whole
        for _ in range(skip_epochs):  # as much as a training epoch reads of it
            for _ in itertools.islice(iter(self.sampler), self.samples_per_epoch):
                pass
        yield from itertools.islice(iter(self.sampler), skip_samples, None)

    def __len__(self) -> int:
        return len(self.sampler)


def resumable(datamodule: LightningDataModule, sampler: torch.utils.data.Sampler[int], batch_size: int,
              drop_last: bool = False) -> torch.utils.data.Sampler[int]:
    """``sampler`` (seeded: the same draws on every run) continued from the trainer's restored position: the epoch
    in progress and the batches it already trained on. One process only: under DDP Lightning shards the sampler and
    a resumed run restarts the epoch."""
    trainer = datamodule.trainer
    if trainer is None or trainer.world_size > 1:
        return sampler
    per_epoch = len(sampler) // batch_size if drop_last else -(-len(sampler) // batch_size)
    epochs = trainer.current_epoch
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batches >= per_epoch:  # saved at the end of an epoch: the next one starts afresh
        epochs, batches = epochs + 1, 0
    # Lightning cannot see that this loader continues mid-epoch and would warn that it restarts the epoch.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return ResumableSampler(sampler, epochs, batches * batch_size, min(len(sampler), per_epoch * batch_size))


# --- evaluation ------------------------------------------------------------------------------------------------
class Chunks(Sequence):
    """``items`` cut into consecutive batches of ``batch_size``, each made by ``collate`` when it is read."""

    def __init__(self, items: Sequence, batch_size: int, collate: Callable[[list], Any] = list) -> None:
        self.items, self.batch_size, self.collate = items, batch_size, collate

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.collate(list(self.items[index * self.batch_size:(index + 1) * self.batch_size]))


class RankBatches(IterableDataset):
    """One process's share of whole evaluation batches, none repeated: batch ``i`` goes to rank ``i mod world_size``.

    A ``DistributedSampler`` would pad the data to a multiple of the world size by repeating samples, so metrics
    summed over the ranks would count those twice. Here a rank with fewer batches gets ``empty`` (an empty batch,
    which evaluation steps skip) instead, so every rank runs the same number of steps, and the ranks together
    evaluate each sample exactly once, in the same batches as one process does: the ``j``-th batch of rank ``r`` is
    batch ``global_batch_index`` = ``j * world_size + r`` of one process. (An ``IterableDataset``: Lightning adds no
    sampler of its own. DataLoader workers each take every n-th of the rank's batches; the loader's round robin
    returns them in order.)
    """

    def __init__(self, batches: Sequence, rank: int = 0, world_size: int = 1, empty: Any = None) -> None:
        """
        Args:
            batches: Every evaluation batch, in one process's order (indexing may build a batch).
            rank: This process's rank.
            world_size: Number of processes.
            empty: What a rank gets for a batch it lacks.
        """
        self.batches, self.rank, self.world_size, self.empty = batches, rank, world_size, empty

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.world_size)

    def __iter__(self):
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for local in range(first, len(self), step):
            index = local * self.world_size + self.rank
            yield self.batches[index] if index < len(self.batches) else self.empty


def evaluation_loader(datamodule: LightningDataModule, batches: Sequence, empty: Any,
                      num_workers: int = 0) -> DataLoader:
    """A DataLoader of this process's share of ``batches`` (``RankBatches``); ``empty`` stands in for the batches
    this rank lacks."""
    rank, world_size = rank_and_world_size(datamodule)
    return DataLoader(RankBatches(batches, rank, world_size, empty), batch_size=None, num_workers=num_workers)


def global_batch_index(trainer: Trainer | None, batch_idx: int) -> int:
    """The index one process gives the evaluation batch that this rank sees as ``batch_idx`` (``RankBatches``); on
    one process (or outside a Trainer) ``batch_idx`` itself, so seeds keyed on it do not change with the world
    size."""
    if trainer is None:
        return batch_idx
    return batch_idx * trainer.world_size + trainer.global_rank


def on_any_rank(flags: Sequence[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Each flag or-ed over the processes of a distributed run (a collective: every process calls it, with as many
    flags); the flags themselves on one process."""
    if not flags or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]
