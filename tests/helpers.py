"""Callbacks used by tests that run the CLI in a subprocess."""

import os

import torch
from lightning.pytorch import Callback


class SaveRankParameters(Callback):
    """After fitting, every rank writes its parameters to ``<folder>/rank<k>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        os.makedirs(self.folder, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))
