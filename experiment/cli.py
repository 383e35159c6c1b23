"""The command line: ``python train.py {fit,validate,test,predict} --config configs/<system>/<x>.yaml``, and
``python train.py tune --config configs/tuning/<x>.yaml`` (the tuning study, see ``tuning/cli.py``)."""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from experiment.save_config import RunConfigSaver


def main(args: list[str] | None = None) -> LightningCLI | dict:
    """Build the CLI; any LightningModule / LightningDataModule subclass can be named in a config.

    ``tune`` runs a tuning study instead (its own validated config; it returns the best episode)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["tune"]:
        from tuning.cli import main as tune

        return tune(argv[1:])
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        auto_configure_optimizers=False,
        args=args,
    )
