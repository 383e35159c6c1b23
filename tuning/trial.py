"""One tuning trial: a fresh LoRA on the base model, fitted by a Lightning Trainer on the instruction data and
evaluated by validation loss (response tokens only) and perplexity."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_modules.sft import CausalLMSFT
from models.lm_factory import DEFAULT_CACHE, TINY_ARCHITECTURES, LMSettings, LoraSettings, merged_state_dict
from tuning.space import check_minimums

SEED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrialSettings:
    """The model every trial fine-tunes and how long a trial runs."""

    lm: LMSettings = field(default_factory=lambda: LMSettings(
        hidden_size=64, lora=LoraSettings(target_modules=list(SEED_TARGETS))))
    """The model every trial adapts: a tiny model, a hub name or a local folder, 4-bit or not. Its ``lora`` names the
    modules that get an adapter (the attention and MLP projections of a Llama-style model, as in the original;
    ``auto`` = the attention projections of any architecture); each trial sets the adapter's rank, alpha and
    dropout."""
    max_steps: int = 60
    """Cap on optimiser steps per trial (-1: none), so a trial takes seconds; ``epochs`` still matters when an
    epoch is shorter than the cap (large batches)."""
    accelerator: str = "cpu"
    """Lightning accelerator (``cpu``, ``gpu``, ``auto``): trials of the offline tiny model are fastest on a CPU."""
    precision: str = "32-true"
    """Lightning precision (``bf16-mixed`` on a GPU)."""
    pretrain_steps: int = 600
    """Steps of full-weight pre-training of a tiny model before any trial (cached on disk), so that LoRA adapts
    a model that already follows instructions, as it would adapt a hub "instruct" model; 0: no pre-training.
    Hub models and local folders are never pre-trained here."""
    pretrain_lr: float = 3e-3
    """Learning rate of that pre-training."""
    threads: int | None = 1
    """CPU threads of torch (``null``: torch's default); 1 is fastest for tiny trials on a machine with few cores."""
    cache_dir: str | None = None
    """Folder of pre-trained base models (``null``: ``~/.cache/experiential-agents/tuning_base``)."""
    seed: int = 0
    """Seed of every trial (the same seed for every configuration, so configurations are compared fairly)."""

    def __post_init__(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 or >= 1, got {self.max_steps}")
        if self.lm.lora is None:
            raise ValueError("lm.lora must name the adapter's target modules: every trial trains a LoRA")
        check_minimums(self, {"pretrain_steps": 0}, above={"pretrain_lr": 0})
        if self.threads is not None:
            check_minimums(self, {"threads": 1})


def quiet_lightning() -> None:
    """Trials run dozens of Trainers: keep their banners out of the study's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _trainer(settings: TrialSettings, **kwargs) -> Trainer:
    return Trainer(accelerator=settings.accelerator, devices=1, precision=settings.precision, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, **kwargs)


def validate(module: CausalLMSFT, data, settings: TrialSettings) -> dict[str, float]:
    """``val_loss`` (token-weighted mean over response tokens) and ``val_ppl`` of ``module`` on ``data``."""
    metrics = _trainer(settings).validate(module, datamodule=data, verbose=False)[0]
    return {"val_loss": float(metrics["val/loss"]), "val_ppl": float(metrics["val/ppl"])}


def pretrained_base(data, settings: TrialSettings) -> str | None:
    """Path of the pre-trained base checkpoint (``{"merged_lm": ...}``), trained once and cached by a hash of
    the text and settings; ``None`` when ``pretrain_steps`` is 0."""
    lm = settings.lm
    if settings.pretrain_steps == 0 or lm.model_name not in TINY_ARCHITECTURES:
        return None  # a hub model or local folder is already pre-trained
    texts = data.pretraining_texts()
    key = [texts, len(data.tokenizer), lm.model_name, lm.hidden_size, lm.num_layers, lm.num_heads,
           settings.pretrain_steps, settings.pretrain_lr, settings.seed]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    folder = Path(os.path.expanduser(settings.cache_dir or os.path.join(DEFAULT_CACHE, "tuning_base")))
    path = folder / f"{digest}.ckpt"
    if path.exists():
        return str(path)
    quiet_lightning()
    seed_everything(settings.seed, verbose=False)
    module = CausalLMSFT(lm=replace(lm, lora=None, load_in_4bit=False), lr_decay="linear", warmup_ratio=0.05,
                         optimizer=partial(torch.optim.AdamW, lr=settings.pretrain_lr), export=False)
    module.build(data.tokenizer)
    trainer = _trainer(settings, max_steps=settings.pretrain_steps, max_epochs=-1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=data.text_loader(texts, 16))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{digest}.{os.getpid()}.tmp"
    torch.save({"merged_lm": merged_state_dict(module.lm)}, tmp)
    os.replace(tmp, path)  # concurrent workers never read a half-written file
    return str(path)


def run_trial(hparams: dict[str, Any], data, settings: TrialSettings) -> tuple[CausalLMSFT, dict[str, float]]:
    """Fit a fresh LoRA with ``hparams`` and return the module and its validation metrics."""
    quiet_lightning()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    init_from = pretrained_base(data, settings)
    seed_everything(settings.seed, verbose=False)
    data.batch_size = int(hparams["batch_size"])
    lora = replace(settings.lm.lora, r=int(hparams["lora_r"]), alpha=float(hparams["lora_alpha"]),
                   dropout=float(hparams["lora_dropout"]))
    # Linear warmup then linear decay: a trial's warmup_ratio means what it means in transformers.Trainer.
    module = CausalLMSFT(lm=replace(settings.lm, lora=lora), init_from=init_from, lr_decay="linear",
                         warmup_ratio=float(hparams["warmup_ratio"]), export=False,  # a study keeps its best episode
                         optimizer=partial(torch.optim.AdamW, lr=float(hparams["lr"])))
    started = time.perf_counter()
    trainer = _trainer(settings, max_epochs=int(hparams["epochs"]), max_steps=settings.max_steps,
                       limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    metrics = validate(module, data, settings)
    metrics |= {"steps": int(trainer.global_step), "train_seconds": round(time.perf_counter() - started, 3)}
    return module, metrics
