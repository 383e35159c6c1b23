"""LeWorld's baselines: a BLM alone, with no memory or with oracle reads."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_modules.leworld_base import Batch, EvalMetrics, LeWorldModule, flatten_steps
from models.leworld import ArtificialMemory, BigLeWorldModel, blm_only_step


class LeWorldBaseline(LeWorldModule):
    """A BLM alone on the same data: ``no_memory`` (states only: the upper bound on error) or ``oracle`` (reads of
    the true relevant ranges, routed to the relevant slots: the lower bound). Teacher-forced next-state MSE; all
    steps as one batch.

    Logged: ``train/loss`` and the evaluation metrics (no hit rate or usage).
    """

    def __init__(
        self,
        blm: BigLeWorldModel,
        mode: Literal["no_memory", "oracle"] = "no_memory",
        memory: ArtificialMemory | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        horizons: int = 4,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        """
        Args:
            blm: The BLM (``num_slots: 0`` for ``no_memory``, ``3`` for ``oracle``).
            mode: ``no_memory`` or ``oracle``.
            memory: The memory (``oracle`` only): its bits come from the data, its bit encoder is trained.
            optimizer: Optimiser factory.
            horizons: Open-loop horizons evaluated.
            max_grad_norm: Clip the gradient's global norm.
        """
        super().__init__(optimizer, horizons, max_grad_norm, 0)
        if mode not in ("no_memory", "oracle"):
            raise ValueError(f"unknown mode {mode!r}; expected 'no_memory' or 'oracle'")
        if mode == "oracle" and (memory is None or blm.num_slots == 0):
            raise ValueError("mode='oracle' needs a `memory` and a BLM with num_slots > 0")
        if mode == "no_memory" and (memory is not None or blm.num_slots != 0):
            raise ValueError("mode='no_memory' needs a BLM with num_slots: 0 and no memory")
        self.save_hyperparameters(ignore=["blm", "memory", "optimizer"])
        self.blm, self._memory, self.mode = blm, memory, mode

    @property
    def memory(self) -> ArtificialMemory | None:
        return self._memory

    def step(self, past: Tensor, current: Tensor, oracle: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Next-state prediction from past and current state (and, ``oracle`` mode, the reads of the true ranges)."""
        if self.mode == "no_memory":
            return blm_only_step(self.blm, None, past, current, None)
        starts, ends, valid = oracle
        k = self.blm.num_slots
        return blm_only_step(self.blm, self._memory, past, current, (starts[:, :k], ends[:, :k], valid[:, :k]))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        past, current, nxt, _, oracle = flatten_steps(batch)
        loss = F.mse_loss(self.step(past, current, oracle), nxt)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["states"]))
        return self.touch_unused(loss)

    def evaluate(self, batch: Batch, metrics: EvalMetrics) -> None:
        states = batch["states"]
        past, current, nxt, _, oracle = flatten_steps(batch)
        pred = self.step(past, current, oracle)
        metrics["mse"].update(pred, nxt)
        metrics["mae"].update(pred, nxt)
        past, current = states[:, 0], states[:, 0]
        for k in range(self._horizons(batch)):
            oracle_k = (batch["starts"][:, k], batch["ends"][:, k], batch["valid"])
            pred = self.step(past, current, oracle_k)
            metrics[f"mse/h{k + 1}"].update(pred, states[:, k + 1].contiguous())
            past, current = current, pred

    def predict(self, batch: Batch) -> dict[str, Tensor]:
        states = batch["states"]
        past, current, nxt, _, oracle = flatten_steps(batch)
        shape = (states.shape[0], states.shape[1] - 1, states.shape[2])
        pred = self.step(past, current, oracle).reshape(shape)
        return {"predictions": pred, "targets": states[:, 1:], "sq_error": ((pred - states[:, 1:]) ** 2).mean(-1)}
