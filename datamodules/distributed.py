"""How a global batch is shared out among the processes of a (possibly distributed) run."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule


def per_device_batch(datamodule: LightningDataModule, batch_size: int) -> tuple[int, int, int]:
    """``(per-device batch size, rank, world size)`` for the global ``batch_size``; a clear error if it doesn't divide.

    Outside a Trainer the run counts as one process.
    """
    trainer = datamodule.trainer
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
    return batch_size // world_size, rank, world_size
