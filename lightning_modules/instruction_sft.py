"""LoRA SFT on instruction data with the learning-rate schedule of a tuning trial (linear warmup, linear decay)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_modules.rlhf import CausalLMSFT


class InstructionSFT(CausalLMSFT):
    """``CausalLMSFT`` (loss on the labelled response tokens; ``val/loss``, ``val/ppl``) with a warmup/decay
    schedule, so a tuning trial's ``warmup_ratio`` means what it means in ``transformers.Trainer``."""

    def __init__(
        self,
        model_name: str = "tiny-llama",
        init_from: str | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        lora_r: int | None = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "auto",
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.0,
    ) -> None:
        """
        Args:
            model_name: ``tiny-llama`` / ``tiny-smollm3`` (built offline from a config), a hub name or a local folder.
            init_from: Checkpoint of an earlier phase whose merged LM weights to start from (``null``: the base).
            hidden_size: Width of a tiny model.
            num_layers: Decoder layers of a tiny model.
            num_heads: Attention heads of a tiny model.
            lora_r: Rank of a LoRA adapter on the attention projections; ``null`` trains every weight.
            lora_alpha: LoRA scale numerator (the update is scaled by ``alpha / r``).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt; ``auto`` = the attention projections of the architecture.
            load_in_4bit: Quantise the base to 4-bit NF4 (bitsandbytes; needs ``lora_r``).
            trust_remote_code: Allow code shipped with a hub model to run (off unless you opt in).
            optimizer: Optimiser factory, called with the trainable parameters.
            warmup_ratio: Share of the training steps over which the learning rate rises linearly from zero; it
                then falls linearly to zero at the last step.
        """
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        super().__init__(model_name=model_name, init_from=init_from, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_target_modules=lora_target_modules, load_in_4bit=load_in_4bit,
                         trust_remote_code=trust_remote_code, optimizer=optimizer)
        self.save_hyperparameters(ignore=["optimizer"])

    def configure_optimizers(self) -> dict[str, Any]:
        return self._scheduled(super().configure_optimizers(), self.hparams.warmup_ratio, "linear")
