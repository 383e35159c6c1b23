"""An LM agent trained on its early experience: IL, IWM then IL, or SR, with LoRA and optional 4-bit weights.

The recipe is chosen by the DataModule (``datamodules.early_experience``); this module owns the LM, the
completion-only causal-LM loss and the evaluation episodes. The policy acts by scoring every candidate action of
the page after the prompt ``<observation>\\nAction:`` (``models.action_scorer``) and taking the best.

Logged: ``train/loss``; per split (``train``, ``held_out``, ``out_of_domain``) ``val/success/<split>``,
``val/reward/<split>``, ``val/invalid_rate/<split>`` (share of actions the environment rejected),
``val/episode_length/<split>``; the same under ``test/``.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from datamodules.early_experience import policy_prompt, reflection_request
from datamodules.text_corpus import pad
from envs.text_env import TextEnv
from experiment.save_config import run_dir
from lightning_modules.lm_phase import LMPhase
from models.action_scorer import completion_loss, encode_prompts, score_candidates
from models.lm_rollout import sample

SPLITS = ("train", "held_out", "out_of_domain")
EPISODE_METRICS = ("success", "reward", "invalid_rate", "episode_length")


class EpisodeStats(nn.Module):
    """Success, reward, invalid-action rate and length per evaluation split (one MeanMetric each)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict({f"{name}/{split}": MeanMetric() for name in EPISODE_METRICS for split in SPLITS})

    def update(self, split: str, reward: float, steps: int, invalid: int) -> None:
        values = {
            "success": float(reward >= 1.0),
            "reward": reward,
            "invalid_rate": invalid / max(steps, 1),
            "episode_length": float(steps),
        }
        for name, value in values.items():
            self.metrics[f"{name}/{split}"].update(value)

    def compute_and_reset(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/{key}": m.compute() for key, m in self.metrics.items() if m.update_called}
        for metric in self.metrics.values():
            metric.reset()
        return out


class EarlyExperienceAgent(LMPhase):
    """Causal LM policy trained with the completion-only LM loss on IL / IWM / SR examples."""

    def __init__(
        self,
        model_name: str = "tiny-smollm3",
        init_from: str | None = None,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        lora_r: int | None = None,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = "auto",
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        length_normalize: bool = False,
        save_adapter: bool = True,
        evaluate_before_training: bool = True,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        warmup_ratio: float = 0.0,
    ) -> None:
        """
        Args:
            model_name: ``tiny-smollm3`` / ``tiny-llama`` (built from a config, offline), a hub name or a local folder.
            init_from: Checkpoint of an earlier LM phase whose merged weights to start from (``null``: the base).
            hidden_size: Width of a tiny model.
            num_layers: Depth of a tiny model.
            num_heads: Attention heads of a tiny model.
            lora_r: LoRA rank; ``null`` trains every weight.
            lora_alpha: LoRA scale numerator (the seed: r 16, alpha 32, dropout 0.05).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt (``auto``: the attention projections).
            load_in_4bit: 4-bit NF4 base weights (bitsandbytes; needs ``lora_r``).
            trust_remote_code: Let a hub model run its own code (off unless you opt in).
            optimizer: Optimiser factory.
            length_normalize: Score candidate actions by mean instead of summed token log-probability.
            save_adapter: After fitting, save the LoRA adapter in peft format to ``<run folder>/adapter``.
            evaluate_before_training: Run the evaluation episodes once before the first update and log them at
                step 0 (the "before training" row of the results).
            lr_decay: Learning-rate schedule after the warmup, per optimiser step to ``trainer.max_steps``.
            warmup_ratio: Share of the optimiser steps over which the learning rate rises linearly from zero.
        """
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        super().__init__(
            model_name, init_from, hidden_size, num_layers, num_heads, lora_r, lora_alpha, lora_dropout,
            lora_target_modules, load_in_4bit, trust_remote_code, optimizer,
        )
        self.save_hyperparameters(ignore=["optimizer"])
        self.val_stats = EpisodeStats()
        self.test_stats = EpisodeStats()

    def _build(self) -> None:
        self.lm = self._build_lm(self._init_state(), self.lora)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        optimizer = super().configure_optimizers()
        if self.hparams.lr_decay == "constant" and self.hparams.warmup_ratio == 0:
            return optimizer
        return self._scheduled(optimizer, self.hparams.warmup_ratio, self.hparams.lr_decay)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = completion_loss(self.lm, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    # --- acting -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, envs: list[TextEnv]) -> list[str]:
        """The best-scoring candidate action of each environment's current page, all scored in one batch."""
        candidates = [env.candidate_actions() for env in envs]
        prompts = [policy_prompt(env.observation()) for env in envs]
        scores = score_candidates(self.lm, self.tokenizer, prompts, candidates, self.hparams.length_normalize)
        return [c[int(s.argmax())] for c, s in zip(candidates, scores)]

    def run_episodes(self, envs: list[TextEnv]) -> list[tuple[float, int, int]]:
        """Greedy episodes in copies of ``envs``: ``(reward, steps, invalid actions)`` each."""
        was_training = self.lm.training
        self.lm.eval()
        envs = [env.copy() for env in envs]
        for env in envs:
            env.reset()
        outcomes = [[0.0, 0, 0] for _ in envs]
        done = [False] * len(envs)
        active = list(range(len(envs)))
        while active:
            for i, action in zip(active, self.act([envs[i] for i in active])):
                result = envs[i].step(action)
                outcomes[i][0] = result.reward
                outcomes[i][1] += 1
                outcomes[i][2] += result.error is not None
                done[i] = result.done or outcomes[i][1] >= envs[i].max_steps
            active = [i for i in active if not done[i]]
        self.lm.train(was_training)
        return [tuple(o) for o in outcomes]

    def _evaluate(self, batch: list[tuple[str, TextEnv]], stats: EpisodeStats) -> None:
        splits, envs = zip(*batch)
        for split, outcome in zip(splits, self.run_episodes(list(envs))):
            stats.update(split, *outcome)

    def validation_step(self, batch: list[tuple[str, TextEnv]], batch_idx: int) -> None:
        self._evaluate(batch, self.val_stats)

    def test_step(self, batch: list[tuple[str, TextEnv]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_stats)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_stats.compute_and_reset("val"))

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_stats.compute_and_reset("test"))

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "needs_policy_rationales", False):
            requests = [reflection_request(b) for b in datamodule.branches]
            rationales = self.write(requests, datamodule.hparams.rationale_tokens, datamodule.hparams.eval_batch_size)
            kept = datamodule.set_policy_rationales(rationales)
            self.print(f"policy-written rationales: kept {kept} of {len(rationales)} (the others concluded otherwise)")

    @torch.no_grad()
    def write(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """Greedy continuations of ``prompts`` (batched, left-padded), decoded up to ``<eos>``."""
        was_training = self.lm.training
        self.lm.eval()
        texts, tokenizer = [], self.tokenizer
        for start in range(0, len(prompts), batch_size):
            rows = encode_prompts(tokenizer, prompts[start : start + batch_size])
            ids = pad(rows, tokenizer.pad_token_id, left=True).to(self.device)
            mask = pad([[1] * len(r) for r in rows], 0, left=True).to(self.device)
            tokens, valid = sample(
                self.lm, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True
            )
            texts += tokenizer.batch_decode(tokens * valid, skip_special_tokens=True)
        self.lm.train(was_training)
        return [t.strip() for t in texts]

    def on_train_start(self) -> None:
        # Outside Lightning's validation loop (which would not run before the first update): every rank plays all
        # episodes, rank 0 logs them at step 0.
        if not self.hparams.evaluate_before_training or self.global_step > 0:
            return
        loader = self.trainer.datamodule.val_dataloader()
        limit = self.trainer.limit_val_batches  # honoured as in validation (fast_dev_run sets it to 1)
        limit = limit if isinstance(limit, int) else math.ceil(limit * len(loader))
        for batch in itertools.islice(loader, limit):
            self._evaluate(batch, self.val_stats)
        metrics = {k: float(v) for k, v in self.val_stats.compute_and_reset("val").items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

    def on_fit_end(self) -> None:
        if self.hparams.save_adapter and self.lora is not None and self.trainer.is_global_zero:
            self.lm.save_pretrained(os.path.join(run_dir(self.trainer), "adapter"))
