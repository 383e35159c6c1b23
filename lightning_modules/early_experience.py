"""An LM agent trained on its early experience: IL, IWM then IL, or SR, with LoRA and optional 4-bit weights.

The recipe is chosen by the DataModule (``datamodules.early_experience``); this module owns the LM, the
completion-only causal-LM loss and the evaluation episodes. The policy acts by scoring every candidate action of
the page after the prompt ``<observation>\\nAction:`` (``models.action_scorer``) and taking the best.

Logged: ``train/loss``; per split (``train``, ``held_out``, ``out_of_domain``) ``val/success/<split>``,
``val/reward/<split>``, ``val/invalid_rate/<split>`` (share of actions the environment rejected),
``val/episode_length/<split>``; the same under ``test/``.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from datamodules.early_experience import policy_prompt
from envs.text_env import TextEnv
from experiment.save_config import run_dir
from models.action_scorer import score_candidates
from models.lm_factory import LoraSettings, build_causal_lm

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


class EarlyExperienceAgent(LightningModule):
    """Causal LM policy trained with the completion-only LM loss on IL / IWM / SR examples."""

    def __init__(
        self,
        model_name: str = "tiny-smollm3",
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
    ) -> None:
        """
        Args:
            model_name: ``tiny-smollm3`` / ``tiny-llama`` (built from a config, offline), a hub name or a local folder.
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
        """
        super().__init__()
        if load_in_4bit and lora_r is None:
            raise ValueError("load_in_4bit trains through a LoRA adapter: set lora_r")
        self.save_hyperparameters(ignore=["optimizer"])
        self.lora = LoraSettings(lora_r, lora_alpha, lora_dropout, lora_target_modules) if lora_r else None
        self.optimizer_factory = optimizer
        self.tokenizer = None
        self.model: nn.Module | None = None
        self.val_stats = EpisodeStats()
        self.test_stats = EpisodeStats()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            raise RuntimeError("EarlyExperienceAgent needs the tokenizer of an EarlyExperienceDataModule")
        self.build(datamodule.tokenizer)

    def build(self, tokenizer) -> None:
        """Build the LM for ``tokenizer`` (Lightning does this in ``configure_model``)."""
        hp = self.hparams
        self.tokenizer = tokenizer
        self.model = build_causal_lm(
            hp.model_name,
            tokenizer,
            lora=self.lora,
            load_in_4bit=hp.load_in_4bit,
            trust_remote_code=hp.trust_remote_code,
            hidden_size=hp.hidden_size,
            num_layers=hp.num_layers,
            num_heads=hp.num_heads,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    # --- acting -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, envs: list[TextEnv]) -> list[str]:
        """The best-scoring candidate action of each environment's current page, all scored in one batch."""
        candidates = [env.candidate_actions() for env in envs]
        prompts = [policy_prompt(env.observation()) for env in envs]
        scores = score_candidates(self.model, self.tokenizer, prompts, candidates, self.hparams.length_normalize)
        return [c[int(s.argmax())] for c, s in zip(candidates, scores)]

    def run_episodes(self, envs: list[TextEnv]) -> list[tuple[float, int, int]]:
        """Greedy episodes in copies of ``envs``: ``(reward, steps, invalid actions)`` each."""
        was_training = self.model.training
        self.model.eval()
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
        self.model.train(was_training)
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

    def on_fit_end(self) -> None:
        if self.hparams.save_adapter and self.lora is not None and self.trainer.is_global_zero:
            self.model.save_pretrained(os.path.join(run_dir(self.trainer), "adapter"))
