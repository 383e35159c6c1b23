"""Saves the resolved LightningCLI config into each run's own folder and into the W&B run config."""

from __future__ import annotations

import os

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger


def run_dir(trainer: Trainer) -> str:
    """The folder of this run: versioned for every logger, so repeated runs never share it."""
    logger = trainer.logger
    if logger is None:
        return trainer.default_root_dir
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return logger.log_dir
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), str(logger.version))


class RunConfigSaver(SaveConfigCallback):
    """Writes ``config.yaml`` next to the run's checkpoints and the whole config into W&B.

    The stock callback writes to the logger's shared ``save_dir`` and refuses a second run there; this one
    writes under the run's own versioned folder (rank zero only, so DDP is safe).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.config_filename)
        config = self.config.clone()
        if "base" in config:
            config.base = None  # the saved config is fully resolved: it overlays nothing
        self.parser.save(config, path, skip_none=False, overwrite=True, multifile=self.multifile)
        for logger in trainer.loggers:  # a W&B logger beside the CSV log of a benchmark too
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": config.as_dict()}, allow_val_change=True)
