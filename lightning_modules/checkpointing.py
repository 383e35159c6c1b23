"""A ModelCheckpoint that deletes only the files it wrote itself in this run, and saves the last step.

Lightning's ``ModelCheckpoint`` restores its state (the best and last paths) from the checkpoint a run resumes from,
and deletes the "previous best" file after it writes a new one. With a fixed folder shared by several configs (e.g.
``checkpoints/leworld``), a run resumed from another run's checkpoint deleted that run's file (a copy resumed with
``--ckpt_path`` left the original's path in the state). ``RunCheckpoint`` keeps every file it did not write.

A run that ends before its first validation (``--trainer.max_steps 3`` with ``val_check_interval: 150``) wrote no
checkpoint, so the next phase's ``init_from`` found none, or a stale file of an earlier run. ``RunCheckpoint`` also
saves the last step, unless it saved at that step already (or its monitored metric was never logged); a run that
stops at ``max_steps`` mid-epoch saves it before the epoch is marked finished, so a resume from it is exact.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that never deletes a file this run did not write and saves the final
    step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._written: set[Path] = set()

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._written.add(Path(filepath).absolute())

    def _should_remove_checkpoint(self, trainer: Trainer, previous: str, current: str) -> bool:
        return Path(previous).absolute() in self._written and super()._should_remove_checkpoint(
            trainer, previous, current)

    def _save_final(self, trainer: Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None or self.monitor in candidates:
                self._save_topk_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            # Here, before the loop marks the epoch finished, the saved state resumes within the epoch.
            self._save_final(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_final(trainer)  # any other end (time limit, early stop): a resume starts the next epoch
        super().on_train_end(trainer, pl_module)
