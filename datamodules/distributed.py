"""How a global batch is shared out among the processes of a (possibly distributed) run."""

from __future__ import annotations

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
    import torch

    return torch.Generator(device=device or "cpu").manual_seed(step_seed(base, rank, step, attempt))
