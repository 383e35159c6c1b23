"""The command line: ``python train.py {fit,validate,test,predict} --config configs/<system>/<x>.yaml``."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from experiment.save_config import RunConfigSaver


def main(args: list[str] | None = None) -> LightningCLI:
    """Build the CLI; any LightningModule / LightningDataModule subclass can be named in a config."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        auto_configure_optimizers=False,
        args=args,
    )
