"""The base of every LightningModule here, and the non-finite guard it attaches to every Trainer it runs in.

``GuardedModule``:
- refuses a checkpoint written by another class (``--ckpt_path`` of another phase), naming both;
- never saves a checkpoint with a non-finite weight;
- attaches ``NonFiniteGuard`` (``configure_callbacks``), so no config has to name it.

``NonFiniteGuard`` (a Lightning callback):
- skips an update whose gradients are not finite (the gradients are dropped before the optimiser step);
- rolls the trainable weights and the optimiser back to the last finite state when a step leaves a non-finite
  weight;
- stops with a clear error after ``max_in_a_row`` skipped or rolled-back steps in a row.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def non_finite_names(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's contents (tensors and plain values only), or an error of one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (init_from / reward_model_from: run that phase first)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an empty, truncated or foreign file
        why = str(error).strip() or "empty or cut short?"
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(error).__name__}: {why})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class NonFiniteGuard(Callback):
    """Skips updates with non-finite gradients and rolls back steps that leave non-finite weights."""

    def __init__(self, max_in_a_row: int = 5) -> None:
        """
        Args:
            max_in_a_row: Skipped or rolled-back steps in a row before training stops with an error.
        """
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0
        self._last_good: tuple[dict[str, Tensor], list[dict]] | None = None
        self._skipped_this_step = False

    @staticmethod
    def _trainable(module: LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def _snapshot(self, trainer: Trainer, module: LightningModule) -> None:
        weights = {n: p.detach().clone() for n, p in self._trainable(module).items()}
        self._last_good = (weights, [copy.deepcopy(o.state_dict()) for o in trainer.optimizers])

    def _count(self, trainer: Trainer, what: str) -> None:
        self.in_a_row += 1
        self.skipped += 1
        rank_zero_warn(f"non-finite {what} at step {trainer.global_step}: update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(f"{self.in_a_row} updates in a row had non-finite {what}: training stopped "
                                     "(lower the learning rate, clip gradients, or check the data)")

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        bad = non_finite_names(self._trainable(module))
        if bad:
            raise FloatingPointError(f"the model starts with non-finite weights: {bad[:5]}")
        self._snapshot(trainer, module)

    def on_before_optimizer_step(self, trainer: Trainer, module: LightningModule, optimizer) -> None:
        grads = {n: p.grad for n, p in self._trainable(module).items() if p.grad is not None}
        if non_finite_names(grads):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # the optimiser skips parameters without a gradient
            self._skipped_this_step = True
            self._count(trainer, "gradients")

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch, batch_idx: int) -> None:
        trainable = self._trainable(module)
        if non_finite_names(trainable):
            weights, optimizer_states = self._last_good
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(weights[name])
            for optimizer, state in zip(trainer.optimizers, optimizer_states):
                optimizer.load_state_dict(state)
            if not self._skipped_this_step:  # a step whose gradients were skipped already counts
                self._count(trainer, "weights")
        elif not self._skipped_this_step:
            self.in_a_row = 0
            self._snapshot(trainer, module)
        self._skipped_this_step = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)


class GuardedModule(LightningModule):
    """A LightningModule that checks the checkpoints it writes and reads and runs under ``NonFiniteGuard``."""

    def configure_callbacks(self) -> list[Callback]:
        return [NonFiniteGuard()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_names(checkpoint["state_dict"])
        if bad:
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights: {bad[:5]}")
        checkpoint["module_class"] = class_path(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("module_class")
        if saved is not None and saved != class_path(self):
            raise ValueError(f"this checkpoint was written by {saved}, not by {class_path(self)}: resume a run with "
                             "its own config, or start this phase from it with init_from")
