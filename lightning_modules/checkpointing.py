"""A ModelCheckpoint that deletes only the files it wrote itself in this run.

Lightning's ``ModelCheckpoint`` restores its state (the best and last paths) from the checkpoint a run resumes from,
and deletes the "previous best" file after it writes a new one. With a fixed folder shared by several configs (e.g.
``checkpoints/leworld``), a run resumed from another run's checkpoint deleted that run's file (a copy resumed with
``--ckpt_path`` left the original's path in the state). ``RunCheckpoint`` keeps every file it did not write.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that never deletes a file this run did not write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._written: set[Path] = set()

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._written.add(Path(filepath).absolute())

    def _should_remove_checkpoint(self, trainer: Trainer, previous: str, current: str) -> bool:
        return Path(previous).absolute() in self._written and super()._should_remove_checkpoint(
            trainer, previous, current)
