"""A LightningModule base for phases that train a causal LM: build it once the tokenizer is known, export its
merged weights for the next phase.

A subclass implements ``_build`` (usually ``self.lm = self._build_lm(self._init_state(), self.lora)`` plus any
heads) and its own steps. The LM is a tiny model built offline from a config by default, or ``model_name`` = a hub
name / local folder (``models.lm_factory``). Checkpoints carry the LM's merged weights under ``merged_lm`` (LoRA
folded in), so another phase can start from them with ``init_from`` whatever adapters this one trained.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from models.lm_factory import LoraSettings, build_causal_lm, merged_state_dict


def load_phase_checkpoint(path: str) -> dict[str, Any]:
    """An earlier phase's checkpoint (tensors and plain values only: ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (init_from / reward_model_from)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "merged_lm" not in checkpoint:
        raise ValueError(
            f"{path!r} has no merged LM weights: it was not written by an LM phase, or its LM was 4-bit "
            "(train the phase that feeds another one without load_in_4bit)"
        )
    return checkpoint


def warmup_decay(step: int, warmup_steps: int, total_steps: int, decay: str = "linear") -> float:
    """Learning-rate factor: ``0 -> 1`` over ``warmup_steps``, then ``1 -> 0`` at ``total_steps`` along a line
    (``linear``) or a half cosine (``cosine``), or kept at 1 (``constant``)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class LMPhase(LightningModule):
    """Builds the LM in ``configure_model`` (once the DataModule's tokenizer is known) and exports merged weights.

    The tokenizer comes from the DataModule's ``tokenizer`` attribute, or from ``build(tokenizer)`` outside a
    Trainer. The optimiser sees every parameter that requires a gradient (override ``configure_optimizers`` to
    narrow it).
    """

    def __init__(
        self,
        model_name: str = "tiny-llama",
        init_from: str | None = None,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        lora_r: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "auto",
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        """
        Args:
            model_name: ``tiny-llama`` / ``tiny-smollm3`` (built offline from a config), a hub name or a local folder.
            init_from: Checkpoint of an earlier phase whose merged LM weights to start from (``null``: the base).
            hidden_size: Width of a tiny model.
            num_layers: Decoder layers of a tiny model.
            num_heads: Attention heads of a tiny model.
            lora_r: Rank of a LoRA adapter; ``null`` trains every weight.
            lora_alpha: LoRA scale numerator (the update is scaled by ``alpha / r``).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt; ``auto`` = the attention projections of the architecture.
            load_in_4bit: Quantise the base to 4-bit NF4 (bitsandbytes; needs ``lora_r``).
            trust_remote_code: Allow code shipped with a hub model to run (off unless you opt in).
            optimizer: Optimiser factory, called with the trainable parameters.
        """
        super().__init__()
        if min(hidden_size, num_layers, num_heads) < 1:
            raise ValueError("hidden_size, num_layers and num_heads must be >= 1")
        if lora_r is not None and lora_r < 1:
            raise ValueError(f"lora_r must be >= 1 or null, got {lora_r}")
        if load_in_4bit and lora_r is None:
            raise ValueError("load_in_4bit needs a LoRA adapter (set lora_r)")
        # Records this class's arguments and those of a subclass calling it (a subclass may call it again).
        self.save_hyperparameters(ignore=["optimizer"])
        self.lora = LoraSettings(lora_r, lora_alpha, lora_dropout, lora_target_modules) if lora_r else None
        self.optimizer_factory = optimizer
        self.tokenizer = None
        self.lm: nn.Module | None = None

    # --- building ---------------------------------------------------------------------------------------------
    def _tokenizer(self):
        if self.tokenizer is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "tokenizer"):
                raise RuntimeError(f"{type(self).__name__} needs a tokenizer: use a corpus DataModule or call build()")
            self.tokenizer = datamodule.tokenizer
        return self.tokenizer

    def _build_lm(self, state_dict: dict[str, Tensor] | None, lora: LoraSettings | None, **overrides) -> nn.Module:
        """The LM of this phase's settings (``overrides`` replace ``model_name`` / sizes, e.g. for a reward model
        trained at another size), loaded with ``state_dict`` when given and wrapped in ``lora`` when given."""
        hp = self.hparams
        settings = dict(model_name=hp.model_name, hidden_size=hp.hidden_size, num_layers=hp.num_layers,
                        num_heads=hp.num_heads) | overrides
        lm = build_causal_lm(
            settings["model_name"], self.tokenizer, lora=lora, load_in_4bit=hp.load_in_4bit and lora is not None,
            state_dict=state_dict, trust_remote_code=hp.trust_remote_code, hidden_size=settings["hidden_size"],
            num_layers=settings["num_layers"], num_heads=settings["num_heads"],
        )
        rows = lm.get_input_embeddings().weight.shape[0]
        if rows < len(self.tokenizer):
            raise ValueError(f"the model has {rows} token embeddings; the tokenizer has {len(self.tokenizer)} tokens")
        return lm

    def build(self, tokenizer=None) -> None:
        """Build the networks (Lightning calls this through ``configure_model``; call it yourself outside a
        Trainer)."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.lm is None:
            self._tokenizer()
            self._build()

    def configure_model(self) -> None:
        self.build()

    def _build(self) -> None:
        """Set ``self.lm`` (and any heads); ``self.tokenizer`` is known here."""
        raise NotImplementedError(f"{type(self).__name__} must implement _build()")

    def _init_state(self) -> dict[str, Tensor] | None:
        """The merged LM weights of ``init_from`` (``None`` without one)."""
        if self.hparams.init_from is None:
            return None
        return load_phase_checkpoint(self.hparams.init_from)["merged_lm"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    def _scheduled(self, optimizer: torch.optim.Optimizer, warmup_ratio: float, decay: str) -> dict[str, Any]:
        """``optimizer`` with a per-step ``warmup_decay`` schedule over the run's optimiser steps."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_decay(step, warmup, total, decay))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams.load_in_4bit:
            checkpoint["merged_lm"] = merged_state_dict(self.lm)
