"""A pairwise reward model (RLHF phase 2): a causal-LM backbone and a scalar head, trained with the Bradley-Terry
loss on preference pairs.

    python train.py fit --config configs/rlhf/reward.yaml --model.init_args.init_from <sft.ckpt>
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy

from lightning_modules.lm_phase import LMPhase
from models.lm_rollout import RewardModel


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, center_coef: float) -> Tensor:
    """``-log sigmoid(r_chosen - r_rejected)`` plus ``center_coef * (r_chosen + r_rejected)^2`` (TRL's reward
    centring, which keeps the scores near zero mean), both averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean() + center_coef * ((chosen + rejected) ** 2).mean()


def pair_metrics(stage: str) -> MetricCollection:
    """Pair accuracy, loss and margin of one stage (validation and test also the mean score)."""
    metrics = {"acc": BinaryAccuracy(), "loss": MeanMetric(), "margin": MeanMetric()}
    if stage != "train":
        metrics["reward_mean"] = MeanMetric()
    return MetricCollection(metrics, prefix=f"{stage}/")


class PairwiseRewardModel(LMPhase):
    """A scalar reward model trained on preference pairs with the Bradley-Terry loss and reward centring.

    Logged metrics: ``train/loss``, ``train/acc`` (share of pairs where the chosen text scores higher),
    ``train/margin`` (mean chosen - rejected score); ``val/loss``, ``val/acc``, ``val/margin``,
    ``val/reward_mean`` (mean score of all texts); the same under ``test/``. Every metric is a torchmetrics object
    accumulated over the epoch (pairs weighted equally).
    """

    def __init__(self, center_coef: float = 1e-2, **kwargs) -> None:
        """
        Args:
            center_coef: Weight of the reward-centring term ``(r_chosen + r_rejected)^2``.
        """
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {center_coef}")
        super().__init__(**kwargs)
        self.reward: RewardModel | None = None
        self.train_metrics, self.val_metrics, self.test_metrics = (pair_metrics(s) for s in ("train", "val", "test"))

    def _build(self) -> None:
        self.lm = self._build_lm(self._init_state())
        self.reward = RewardModel(self.lm)

    def model_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        # One forward over both texts of every pair.
        width = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])
        ids = torch.cat([F.pad(batch[f"{k}_ids"], (0, width - batch[f"{k}_ids"].shape[1]),
                               value=self.tokenizer.pad_token_id) for k in ("chosen", "rejected")])
        mask = torch.cat([F.pad(batch[f"{k}_mask"], (0, width - batch[f"{k}_mask"].shape[1])) for k in
                          ("chosen", "rejected")])
        chosen, rejected = self.reward(ids, mask).chunk(2)
        return bradley_terry_loss(chosen, rejected, self.hparams.center_coef), chosen, rejected

    def _step(self, batch: dict[str, Tensor], metrics: MetricCollection) -> Tensor:
        loss, chosen, rejected = self.model_step(batch)
        n = len(chosen)
        # Called (not .update()): a call also gives the batch's value, which Lightning logs for training steps.
        metrics["acc"]((chosen > rejected).float(), torch.ones_like(chosen, dtype=torch.long))
        metrics["loss"](loss.detach(), weight=n)
        metrics["margin"]((chosen - rejected).detach())
        if "reward_mean" in metrics:
            metrics["reward_mean"](torch.cat([chosen, rejected]).detach())
        self.log_dict(metrics, batch_size=n)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, self.train_metrics)

    def _eval_step(self, batch: dict[str, Tensor], metrics: MetricCollection) -> None:
        if batch:
            self._step(batch, metrics)
        else:  # the empty batch a process short of evaluation batches gets under DDP: logged only, since computing
            self.log_dict(metrics)  # a metric is a collective that every process must join

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reward_head"] = {k: v.detach().clone() for k, v in self.reward.head.state_dict().items()}
