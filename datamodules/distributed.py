"""How a global batch is shared out among the processes of a (possibly distributed) run, seeds per rank and
step, and samplers that continue where a resumed run stopped."""

from __future__ import annotations

import itertools
import warnings

import torch
from lightning.pytorch import LightningDataModule


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
