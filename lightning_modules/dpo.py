"""Direct preference optimisation (DPO, Rafailov et al. 2023) of an LM policy on the reward model's preference
pairs: the policy learns from the pairs directly, with no reward model and no sampling in training.

    python train.py fit --config configs/rlhf/dpo.yaml --model.init_args.init_from <sft.ckpt> \
        --model.init_args.reward_model_from <reward.ckpt>

The reward model is used only to evaluate (the paired win rate over the reference, as PPO's), so DPO and PPO are
compared on one table; the gold judge (``envs.story_judge``) scores both independently of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_modules.policy_rl import PolicyRL
from models.lm_factory import LMSettings, LoraSettings
from models.lm_text import IGNORE_INDEX, completion_logprobs

PAIR_METRICS = {"loss": "loss", "chosen": "rewards/chosen", "rejected": "rewards/rejected",
                "margin": "rewards/margin", "accuracy": "rewards/accuracy", "nll": "chosen_nll"}  # metric -> logged


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)`` of the chosen and the
    rejected completions (detached), from each completion's summed log-prob under the policy and the reference.

    ``loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)`` with ``z`` = chosen reward - rejected reward and
    ``eps = label_smoothing``, the share of pairs assumed to be labelled the wrong way round (conservative DPO).
    """
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    z = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, chosen.detach(), rejected.detach()


def pair_metrics() -> nn.ModuleDict:
    return nn.ModuleDict({name: MeanMetric() for name in PAIR_METRICS})


class DPO(PolicyRL):
    """DPO of a LoRA adapter on the SFT model (or of every weight) on preference pairs of a shared prompt and two
    completions (``datamodules.text_corpus.PreferencePromptDataModule``).

    Each completion's log-prob is summed over its tokens (prompt and padding excluded), under the policy and under
    the reference (the policy with its adapter disabled = the SFT model; a frozen copy for full fine-tuning, as in
    PPO). Validation and test take two kinds of batch: pairs (``input_ids``, chosen rows first) give the DPO
    metrics, prompts (``prompt_ids``) the paired generation evaluation of ``PolicyRL``.

    Logged metrics: ``train/loss``, ``train/rewards/chosen`` and ``train/rewards/rejected`` (mean implicit reward
    ``beta * (log pi - log pi_ref)`` of the chosen / rejected completions), ``train/rewards/margin`` (chosen -
    rejected), ``train/rewards/accuracy`` (share of pairs whose chosen reward is the higher; 0 at the start, where
    policy = reference and both are 0), ``train/chosen_nll`` (the chosen completion's per-token negative
    log-likelihood under the policy: rising means the margin grows by making good text less likely); the same under
    ``val/`` and ``test/`` over the split's pairs, and there also those of ``PolicyRL`` (``val/win_rate`` over the
    reference judged by the reward model, ``val/kl``, the gold judge's ``val/gold_win_rate``, ...).
    """

    def __init__(
        self,
        lm: LMSettings = LMSettings(lora=LoraSettings(r=16, alpha=32.0)),
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_weight: float = 1.0,
        **kwargs,
    ) -> None:
        """
        Args:
            lm: The policy (see ``LMPhase``): a LoRA adapter on the SFT model by default.
            beta: Scale of the implicit reward ``beta * (log pi - log pi_ref)``; larger keeps the policy nearer its
                reference.
            label_smoothing: Share of pairs assumed mislabelled (conservative DPO), in [0, 0.5).
            sft_weight: Weight of the chosen completion's per-token negative log-likelihood added to each pair's
                loss (RPO; TRL's ``rpo_alpha``), so the margin cannot grow by lowering the chosen likelihood too.
        """
        if beta <= 0 or not 0.0 <= label_smoothing < 0.5 or sft_weight < 0:
            raise ValueError(f"need beta > 0, 0 <= label_smoothing < 0.5 and sft_weight >= 0, got {beta}, "
                             f"{label_smoothing}, {sft_weight}")
        super().__init__(lm=lm, **kwargs)
        self.train_pairs, self.val_pairs, self.test_pairs = pair_metrics(), pair_metrics(), pair_metrics()

    def pair_logprobs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed completion log-probs ``[2B]`` of every row under the policy and (no gradient) the reference."""
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():
            reference = self._reference_forward(completion_logprobs, *args)
        return completion_logprobs(self.lm, *args), reference

    def model_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-pair loss, implicit rewards of the chosen and the rejected completions, and the chosen completion's
        per-token negative log-likelihood (its weighted term is in the loss)."""
        policy, reference = self.pair_logprobs(batch)
        loss, chosen, rejected = dpo_loss(*policy.chunk(2), *reference.chunk(2), self.hparams.beta,
                                          self.hparams.label_smoothing)
        chosen_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)[0].clamp_min(1)
        nll = -policy.chunk(2)[0] / chosen_tokens
        return loss + self.hparams.sft_weight * nll, chosen, rejected, nll.detach()

    def _pair_step(self, batch: dict[str, Tensor], stage: str, metrics: nn.ModuleDict) -> Tensor:
        loss, chosen, rejected, nll = self.model_step(batch)
        values = {"loss": loss.detach(), "chosen": chosen, "rejected": rejected, "margin": chosen - rejected,
                  "accuracy": (chosen > rejected).float(), "nll": nll}
        for name, value in values.items():
            metrics[name](value)  # called, not updated: a training step also logs the batch's value
        self._log_pairs(stage, metrics, len(loss))
        return loss.mean()

    def _log_pairs(self, stage: str, metrics: nn.ModuleDict, batch_size: int) -> None:
        for name, metric in metrics.items():
            self.log(f"{stage}/{PAIR_METRICS[name]}", metric, batch_size=batch_size, add_dataloader_idx=False,
                     prog_bar=name == "loss")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._pair_step(batch, "train", self.train_pairs)

    def _pair_eval(self, batch: dict[str, Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        if batch:
            self._pair_step(batch, stage, metrics)
            return
        # The empty batch a process short of evaluation batches gets under DDP: logged only, since computing a
        self._log_pairs(stage, metrics, 1)  # metric is a collective that every process must join

    @staticmethod
    def _is_prompt_batch(batch: dict[str, Tensor], dataloader_idx: int) -> bool:
        """Prompt batches (the generation evaluation) hold ``prompt_ids``; an empty batch is told by its loader."""
        return "prompt_ids" in batch or (not batch and dataloader_idx > 0)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._is_prompt_batch(batch, dataloader_idx):
            super().validation_step(batch, batch_idx)
        else:
            self._pair_eval(batch, "val", self.val_pairs)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._is_prompt_batch(batch, dataloader_idx):
            super().test_step(batch, batch_idx)
        else:
            self._pair_eval(batch, "test", self.test_pairs)
