"""Small-LM RLHF in three phases: supervised fine-tuning, a pairwise reward model and PPO against it.

    python train.py fit --config configs/rlhf/sft.yaml
    python train.py fit --config configs/rlhf/reward.yaml --model.init_args.init_from <sft.ckpt>
    python train.py fit --config configs/rlhf/ppo.yaml --model.init_args.init_from <sft.ckpt> \
        --model.init_args.reward_model_from <reward.ckpt>

Each phase is a ``lightning_modules.lm_phase.LMPhase``: it builds its LM with ``models.lm_factory`` (a tiny offline
model by default, or ``model_name`` = a hub name / local folder) and the tokenizer of its DataModule. Checkpoints
carry the LM's merged weights (``merged_lm``), so the next phase starts from them whatever adapters the previous one
trained. ``init_from: null`` starts from the base model (what ``fast_dev_run`` smoke tests use).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.text import BLEUScore, Perplexity, ROUGEScore

from datamodules.distributed import step_generator
from lightning_modules.lm_phase import LMPhase, load_phase_checkpoint
from lightning_modules.rl import gae, masked_mean, masked_normalize
from models.lm_rollout import (
    AdaptiveKLController,
    RewardModel,
    ScalarHead,
    chosen_and_entropy,
    distinct_n,
    hidden_size_of,
    response_log_softmax,
    response_logprobs,
    sample,
)


class CausalLMSFT(LMPhase):
    """Supervised fine-tuning with the causal-LM loss on the labelled tokens (the completion, with a
    ``TextCorpusDataModule(completion_only=true)``), full or through a LoRA adapter.

    Logged metrics: ``train/loss``; ``val/loss``, ``val/ppl`` (torchmetrics perplexity over the labelled tokens);
    the same under ``test/``.
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
            lora_r: Rank of a LoRA adapter on the attention projections; ``null`` trains every weight.
            lora_alpha: LoRA scale numerator (the update is scaled by ``alpha / r``).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt; ``auto`` = the attention projections of the architecture.
            load_in_4bit: Quantise the base to 4-bit NF4 (bitsandbytes; needs ``lora_r``).
            trust_remote_code: Allow code shipped with a hub model to run (off unless you opt in).
            optimizer: Optimiser factory, called with the trainable parameters.
        """
        super().__init__(model_name, init_from, hidden_size, num_layers, num_heads, lora_r, lora_alpha, lora_dropout,
                         lora_target_modules, load_in_4bit, trust_remote_code, optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.train_loss = MeanMetric()
        self.val_ppl, self.test_ppl = Perplexity(ignore_index=-100), Perplexity(ignore_index=-100)

    def _build(self) -> None:
        self.lm = self._build_lm(self._init_state(), self.lora)

    def model_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return loss, logits, labels

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self.model_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SFT loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str, ppl: Perplexity) -> None:
        loss, logits, labels = self.model_step(batch)
        ppl.update(logits, labels)
        tokens = int((labels != -100).sum())
        self.log(f"{stage}/loss", loss, batch_size=tokens, sync_dist=True)
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_ppl)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, center_coef: float) -> Tensor:
    """``-log sigmoid(r_chosen - r_rejected)`` plus ``center_coef * (r_chosen + r_rejected)^2`` (TRL's reward
    centring, which keeps the scores near zero mean), both averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean() + center_coef * ((chosen + rejected) ** 2).mean()


class PairwiseRewardModel(LMPhase):
    """A scalar reward model trained on preference pairs with the Bradley-Terry loss and reward centring.

    Logged metrics: ``train/loss``, ``train/acc`` (share of pairs where the chosen text scores higher),
    ``train/margin`` (mean chosen - rejected score); ``val/loss``, ``val/acc``, ``val/margin``,
    ``val/reward_mean`` (mean score of all texts); the same under ``test/``.
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
        center_coef: float = 1e-2,
    ) -> None:
        """
        Args:
            model_name: ``tiny-llama`` / ``tiny-smollm3`` (built offline from a config), a hub name or a local folder.
            init_from: Checkpoint (usually the SFT one) whose merged LM weights start the backbone.
            hidden_size: Width of a tiny model.
            num_layers: Decoder layers of a tiny model.
            num_heads: Attention heads of a tiny model.
            lora_r: Rank of a LoRA adapter on the backbone; ``null`` trains every weight.
            lora_alpha: LoRA scale numerator.
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt; ``auto`` = the attention projections of the architecture.
            load_in_4bit: Quantise the backbone to 4-bit NF4 (needs ``lora_r``).
            trust_remote_code: Allow code shipped with a hub model to run (off unless you opt in).
            optimizer: Optimiser factory, called with the trainable parameters.
            center_coef: Weight of the reward-centring term ``(r_chosen + r_rejected)^2``.
        """
        super().__init__(model_name, init_from, hidden_size, num_layers, num_heads, lora_r, lora_alpha, lora_dropout,
                         lora_target_modules, load_in_4bit, trust_remote_code, optimizer)
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {center_coef}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.reward: RewardModel | None = None
        self.train_acc, self.val_acc, self.test_acc = BinaryAccuracy(), BinaryAccuracy(), BinaryAccuracy()

    def _build(self) -> None:
        self.lm = self._build_lm(self._init_state(), self.lora)
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

    def _step(self, batch: dict[str, Tensor], stage: str, acc: BinaryAccuracy) -> Tensor:
        loss, chosen, rejected = self.model_step(batch)
        acc.update((chosen > rejected).float(), torch.ones_like(chosen, dtype=torch.long))
        n = len(chosen)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=sync)
        self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=n)
        self.log(f"{stage}/margin", (chosen - rejected).mean(), batch_size=n, sync_dist=sync)
        if stage != "train":
            self.log(f"{stage}/reward_mean", torch.cat([chosen, rejected]).mean(), batch_size=n, sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reward_head"] = {k: v.detach().clone() for k, v in self.reward.head.state_dict().items()}

    @torch.no_grad()
    def score_texts(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """Scores of plain texts (encoded as the preference DataModule does: ``<bos>`` + `` text`` + ``<eos>``)."""
        from datamodules.text_corpus import pad

        tok = self.tokenizer
        scores = []
        for start in range(0, len(texts), batch_size):
            seqs = [[tok.bos_token_id, *tok(" " + t, add_special_tokens=False).input_ids, tok.eos_token_id]
                    for t in texts[start : start + batch_size]]
            ids = pad(seqs, tok.pad_token_id).to(self.device)
            scores.append(self.reward(ids, pad([[1] * len(s) for s in seqs], 0).to(self.device)))
        return torch.cat(scores)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_range: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's pessimistic objective ``mean(max(-A r, -A clip(r, 1 - e, 1 + e)))`` over the masked tokens, with
    ``r = exp(logprobs - old_logprobs)``; returns ``(loss, ratio, log_ratio)``."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return masked_mean(torch.max(unclipped, clipped), mask), ratio, log_ratio


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """``0.5 * mean(max((v - R)^2, (v_old + clip(v - v_old, -e, e) - R)^2))`` over the masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class GenerationMetrics(nn.Module):
    """Paired comparison of the policy and the reference on the same prompts, and text statistics."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("reward", "reward_ref", "win_rate", "tie_rate", "kl", "response_length"):
            setattr(self, name, MeanMetric())
        self.rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
        self.bleu = BLEUScore(n_gram=4, smooth=True)
        self.ppl, self.ppl_ref = Perplexity(ignore_index=-100), Perplexity(ignore_index=-100)
        self.texts: list[str] = []

    def compute(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}/{n}": getattr(self, n).compute() for n in ("reward", "reward_ref", "win_rate", "tie_rate",
                                                                     "kl", "response_length")}
        out[f"{prefix}/reward_delta"] = out[f"{prefix}/reward"] - out[f"{prefix}/reward_ref"]
        if self.texts:
            rouge = self.rouge.compute()
            out |= {f"{prefix}/rouge1": rouge["rouge1_fmeasure"], f"{prefix}/rouge2": rouge["rouge2_fmeasure"],
                    f"{prefix}/rougeL": rouge["rougeL_fmeasure"], f"{prefix}/bleu": self.bleu.compute(),
                    f"{prefix}/distinct_1": torch.tensor(distinct_n(self.texts, 1)),
                    f"{prefix}/distinct_2": torch.tensor(distinct_n(self.texts, 2))}
        if self.ppl.update_called:
            out |= {f"{prefix}/ppl": self.ppl.compute(), f"{prefix}/ppl_ref": self.ppl_ref.compute()}
        return out

    def reset(self) -> None:
        for m in self.children():
            m.reset()
        self.texts = []


KL_COEF_CAP = 10.0  # the KL guard raises the KL coefficient to at most this multiple of its initial value


class PPORLHF(LMPhase):
    """PPO of a LoRA adapter on the SFT model against a frozen reward model, with manual optimisation.

    Every ``ppo_epochs * rollout_batch // minibatch_size`` training steps form one PPO iteration: its first step
    samples responses to a batch of prompts (no gradients) and scores them with the reward model at the last
    token; the per-token reward is ``-kl_coef * (log pi - log pi_ref)`` (reference = the policy with its adapter
    disabled, i.e. the SFT model) plus the clipped score on the last token; GAE (``lightning_modules.rl``) gives
    advantages and returns. Each training step is then one optimiser step on one minibatch: advantages normalised
    over the minibatch, clipped policy and value losses, global grad-norm clipping. The iteration stops early when
    the approximate KL (k3) to the rollout policy passes ``1.5 * target_kl``. The KL coefficient adapts after each
    rollout (Ziegler et al.) to keep the sequence KL near ``kl_target``; that controller is slow by design, so a
    KL guard (``max_kl``) rejects a rollout whose KL spikes above the band: the policy that sampled it is discarded
    and the coefficient doubles. A rejected rollout, a non-finite rollout or a non-finite loss rolls the adapter,
    value head and optimiser back to the last accepted rollout (``max_rollbacks`` in a row stop training).

    Logged metrics: ``train/score`` (reward-model score of the samples), ``train/kl`` (sequence KL to the
    reference), ``train/kl_coef``, ``train/policy_loss``, ``train/value_loss``, ``train/approx_kl``,
    ``train/clip_frac``, ``train/entropy``, ``train/response_length``, ``train/rollbacks``,
    ``train/rollback_count`` (all rollbacks so far), ``train/kl_loss`` (with ``kl_loss_coef``),
    ``train/rollout_tokens_per_s``; validation and test compare the policy with the reference on the same prompts:
    ``val/reward``, ``val/reward_ref``, ``val/reward_delta``, ``val/win_rate`` (paired, ties count half),
    ``val/tie_rate`` (share of prompts where both score the same: mostly identical samples), ``val/kl``,
    ``val/win_rate_in_band`` (the win rate while ``val/kl`` is not above the KL controller's band, else 0: the
    PPO config's ModelCheckpoint keeps the best policy by it),
    ``val/response_length``; test adds ``test/rouge1|2|L``, ``test/bleu``, ``test/distinct_1|2`` against the
    held-out completions and ``test/ppl`` / ``test/ppl_ref``, the perplexity of the policy / the reference on them.
    """

    def __init__(
        self,
        model_name: str = "tiny-llama",
        init_from: str | None = None,
        reward_model_from: str | None = None,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        lora_r: int | None = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "auto",
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        ppo_epochs: int = 2,
        minibatch_size: int = 16,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        value_coef: float = 0.1,
        entropy_coef: float = 0.0,
        max_grad_norm: float = 0.5,
        kl_coef: float = 0.2,
        kl_target: float | None = 2.0,
        kl_horizon: int = 2000,
        kl_estimator: str = "k1",
        target_kl: float | None = 0.1,
        max_kl: float | None = None,
        kl_loss_coef: float = 0.0,
        reward_clip: float = 3.0,
        missing_eos_penalty: float | None = 1.0,
        max_mean_ratio: float = 5.0,
        max_rollbacks: int = 5,
        eval_temperature: float | None = None,
    ) -> None:
        """
        Args:
            model_name: ``tiny-llama`` / ``tiny-smollm3`` (built offline from a config), a hub name or a local folder.
            init_from: SFT checkpoint whose merged weights are the reference model (``null``: the base model).
            reward_model_from: Reward-model checkpoint (``null``: an untrained reward model, for smoke tests only).
            hidden_size: Width of a tiny model.
            num_layers: Decoder layers of a tiny model.
            num_heads: Attention heads of a tiny model.
            lora_r: Rank of the policy's LoRA adapter; ``null`` trains every weight against a frozen copy.
            lora_alpha: LoRA scale numerator.
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt; ``auto`` = the attention projections of the architecture.
            load_in_4bit: Quantise the policy's base to 4-bit NF4 (needs ``lora_r``).
            trust_remote_code: Allow code shipped with a hub model to run (off unless you opt in).
            optimizer: Optimiser factory (Adam eps 1e-5 is the PPO custom), called with the trainable parameters.
            max_new_tokens: Longest sampled response.
            temperature: Sampling temperature; the log-probs are those of the tempered distribution.
            ppo_epochs: Passes over each rollout batch.
            minibatch_size: Responses per optimiser step (per device).
            gamma: Discount over response tokens.
            gae_lambda: GAE bias/variance trade-off.
            clip_range: PPO policy ratio clip.
            clip_range_value: Value clip around the rollout's values.
            value_coef: Weight of the value loss.
            entropy_coef: Weight of an entropy bonus.
            max_grad_norm: Global gradient-norm clip.
            kl_coef: Initial weight of the per-token KL penalty.
            kl_target: Sequence KL the adaptive controller aims at (``null``: a fixed ``kl_coef``).
            kl_horizon: Controller horizon in sampled responses (smaller adapts faster).
            kl_estimator: Per-token KL in the reward: ``k1`` (log-ratio) or ``k3`` (non-negative, lower variance).
            target_kl: Stop an iteration's remaining minibatches once approx-KL > 1.5 x this (``null``: never).
            max_kl: KL guard: a rollout whose mean sequence KL exceeds this discards the policy that sampled it
                (adapter, value head and optimiser go back to the last accepted rollout) and doubles the KL
                coefficient, up to 10x ``kl_coef`` (``null``: never).
            kl_loss_coef: Weight of a loss term: the exact KL(policy || reference) over the whole vocabulary at each
                response position, averaged over the tokens. Unlike the sampled KL in the reward it also sees
                probability moved to tokens the rollout did not sample (0: off; costs a reference forward per step).
            reward_clip: Clip the reward-model score to +- this.
            missing_eos_penalty: Subtracted from the score of responses that never emit ``<eos>`` (``null``: none).
            max_mean_ratio: Skip a minibatch whose mean policy ratio exceeds this (a sign of divergence).
            max_rollbacks: Consecutive rollbacks before training stops: with an error when values are non-finite,
                at the restored policy for the KL guard, which keeps this many accepted snapshots of the trainable
                weights and optimiser state (the adapter and value head with LoRA; every weight without).
            eval_temperature: Sampling temperature of validation/test generations (``null``: ``temperature``).
        """
        super().__init__(model_name, init_from, hidden_size, num_layers, num_heads, lora_r, lora_alpha, lora_dropout,
                         lora_target_modules, load_in_4bit, trust_remote_code, optimizer)
        given = dict(locals())
        checks = {
            "max_new_tokens": max_new_tokens >= 1, "temperature": temperature > 0, "ppo_epochs": ppo_epochs >= 1,
            "minibatch_size": minibatch_size >= 1, "gamma": 0 <= gamma <= 1, "gae_lambda": 0 <= gae_lambda <= 1,
            "clip_range": clip_range > 0, "clip_range_value": clip_range_value > 0, "value_coef": value_coef >= 0,
            "max_grad_norm": max_grad_norm > 0, "kl_coef": kl_coef >= 0, "kl_horizon": kl_horizon > 0,
            "kl_target": kl_target is None or kl_target > 0, "target_kl": target_kl is None or target_kl > 0,
            "max_kl": max_kl is None or max_kl > 0, "kl_loss_coef": kl_loss_coef >= 0,
            "reward_clip": reward_clip > 0, "kl_estimator": kl_estimator in ("k1", "k3"),
            "max_rollbacks": max_rollbacks >= 1, "max_mean_ratio": max_mean_ratio > 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid PPO settings: {', '.join(f'{n}={given[n]!r}' for n in bad)}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.register_buffer("kl_coef_value", torch.tensor(float(kl_coef)))
        self.register_buffer("sampling_seed", torch.randint(0, 2**31 - 1, ()))
        self.register_buffer("rollback_count", torch.tensor(0))  # all rollbacks so far; also varies the sampling
        self.reward_model: RewardModel | None = None
        self.value_head: ScalarHead | None = None
        self.reference: nn.Module | None = None
        self.val_metrics, self.test_metrics = GenerationMetrics(), GenerationMetrics()
        self._queue: list[Tensor] = []
        self._buffer: dict[str, Tensor] | None = None
        self._accepted: deque[tuple[dict, dict]] = deque(maxlen=max_rollbacks)  # (weights, optimiser) to return to
        self.rollbacks = 0

    # --- building ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        hp = self.hparams
        state = self._init_state()
        self.lm = self._build_lm(state, self.lora)
        if self.lora is None:  # full fine-tuning: the reference is a frozen copy of the starting weights
            self.reference = copy.deepcopy(self.lm).requires_grad_(False).eval()
        self.value_head = ScalarHead(hidden_size_of(self.lm), zero_init=True)
        if hp.reward_model_from is None:
            rank_zero_warn("reward_model_from is null: PPO optimises an untrained reward model (smoke tests only)")
            rm_lm, head = self._build_lm(None, None), None
        else:
            checkpoint = load_phase_checkpoint(hp.reward_model_from)
            if "reward_head" not in checkpoint:
                raise ValueError(f"{hp.reward_model_from!r} is not a reward-model checkpoint (no reward_head)")
            rm_hp = checkpoint.get("hyper_parameters", {})
            sizes = {k: rm_hp[k] for k in ("model_name", "hidden_size", "num_layers", "num_heads") if k in rm_hp}
            rm_lm, head = self._build_lm(checkpoint["merged_lm"], None, **sizes), checkpoint["reward_head"]
        self.reward_model = RewardModel(rm_lm)
        if head is not None:
            self.reward_model.head.load_state_dict(head)
        self.reward_model.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.reward_model, self.reference):
            if frozen is not None:
                frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The frozen reward model and reference are rebuilt from their own checkpoints.
        for key in [k for k in checkpoint["state_dict"] if k.startswith(("reward_model.", "reference."))]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.state_dict()
        for key in state:
            if key.startswith(("reward_model.", "reference.")):
                checkpoint["state_dict"][key] = state[key]
        checkpoint["state_dict"].setdefault("rollback_count", torch.tensor(0))  # saved before the KL guard existed
        self._queue, self._buffer = [], None  # a resumed run starts a fresh iteration
        self._accepted.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.lm.parameters(), *self.value_head.parameters()] if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.trainable_parameters())

    # --- acting -----------------------------------------------------------------------------------------------
    def _reference_forward(self, fn, *args) -> Any:
        """``fn(reference model, *args)``: the frozen copy, or the policy with its adapter disabled."""
        if self.reference is not None:
            return fn(self.reference, *args)
        with self.lm.disable_adapter():
            return fn(self.lm, *args)

    def _reference_logprobs(self, ids: Tensor, mask: Tensor, prompt_length: int,
                            temperature: float | None = None) -> Tensor:
        temperature = temperature or self.hparams.temperature
        return self._reference_forward(response_logprobs, ids, mask, prompt_length, temperature)[0]

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, reference: bool = False, greedy: bool = False,
                 temperature: float | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Responses ``(tokens, mask)`` of the policy (or of the reference) to left-padded prompts."""
        tok = self.tokenizer
        kwargs = dict(max_new_tokens=self.hparams.max_new_tokens, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, temperature=temperature or self.hparams.temperature,
                      greedy=greedy, generator=generator)
        if reference and self.reference is not None:
            return sample(self.reference, prompt_ids, prompt_mask, **kwargs)
        if reference:
            with self.lm.disable_adapter():
                return sample(self.lm, prompt_ids, prompt_mask, **kwargs)
        return sample(self.lm, prompt_ids, prompt_mask, **kwargs)

    @torch.no_grad()
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response: Tensor, response_mask: Tensor) -> Tensor:
        """Raw reward-model scores of prompt + response (read at the last real token)."""
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, response_mask.long()], 1)
        return self.reward_model(ids, mask)

    def _kl(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        log_ratio = logprobs - ref_logprobs
        if self.hparams.kl_estimator == "k3":
            return (-log_ratio).exp() - 1 + log_ratio
        return log_ratio

    @torch.no_grad()
    def collect(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One rollout batch with everything PPO needs (no gradients)."""
        hp = self.hparams
        generator = step_generator(self.sampling_seed, self.global_rank, self.global_step, self.rollback_count,
                                   device=self.device)
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        start = time.perf_counter()
        response, response_mask = self.generate(prompt_ids, prompt_mask, generator=generator)
        seconds = time.perf_counter() - start
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, response_mask.long()], 1)
        p = prompt_ids.shape[1]
        logprobs, _, hidden = response_logprobs(self.lm, ids, mask, p, hp.temperature, with_hidden=True)
        values = self.value_head(hidden)
        ref_logprobs = self._reference_logprobs(ids, mask, p)
        raw_score = self.reward_model(ids, mask)
        score = raw_score
        if hp.missing_eos_penalty is not None:
            has_eos = ((response == self.tokenizer.eos_token_id) & response_mask).any(1)
            score = score - hp.missing_eos_penalty * (~has_eos).float()
        score = score.clamp(-hp.reward_clip, hp.reward_clip)
        rmask = response_mask.float()
        kl = self._kl(logprobs, ref_logprobs) * rmask
        rewards = -self.kl_coef_value * kl
        last = (response_mask.long().cumsum(1).argmax(1))  # index of the last response token
        rewards[torch.arange(len(rewards)), last] += score
        advantages, returns = gae(rewards, values * rmask, rmask, hp.gamma, hp.gae_lambda)
        return {"ids": ids, "mask": mask, "response_mask": response_mask, "logprobs": logprobs,
                "values": values * rmask,
                "advantages": advantages, "returns": returns, "score": raw_score, "kl": kl.sum(1),
                "tokens_per_s": torch.tensor(float(response_mask.sum()) / max(seconds, 1e-9)),
                "prompt_length": torch.tensor(p)}

    # --- learning ---------------------------------------------------------------------------------------------
    def ppo_losses(self, mb: dict[str, Tensor], prompt_length: int) -> dict[str, Tensor]:
        """Clipped policy and value losses of one minibatch (advantages normalised over its tokens)."""
        hp = self.hparams
        rmask = mb["response_mask"]
        inputs = (mb["ids"], mb["mask"], prompt_length, hp.temperature)
        log_probs, hidden = response_log_softmax(self.lm, *inputs, with_hidden=True)
        logprobs, entropy = chosen_and_entropy(log_probs, mb["ids"][:, prompt_length:])
        values = self.value_head(hidden)
        advantages = masked_normalize(mb["advantages"], rmask)
        policy_loss, ratio, log_ratio = clipped_policy_loss(logprobs, mb["logprobs"], advantages, rmask, hp.clip_range)
        value_loss = clipped_value_loss(values, mb["values"], mb["returns"], rmask, hp.clip_range_value)
        entropy = masked_mean(entropy, rmask)
        loss = policy_loss + hp.value_coef * value_loss - hp.entropy_coef * entropy
        losses = {}
        if hp.kl_loss_coef > 0:
            with torch.no_grad():
                ref_log_probs = self._reference_forward(response_log_softmax, *inputs)[0]
            losses["kl_loss"] = masked_mean((log_probs.exp() * (log_probs - ref_log_probs)).sum(-1), rmask)
            loss = loss + hp.kl_loss_coef * losses["kl_loss"]
        with torch.no_grad():
            approx_kl = masked_mean(ratio - 1 - log_ratio, rmask)
            clip_frac = masked_mean(((ratio - 1).abs() > hp.clip_range).float(), rmask)
            mean_ratio = masked_mean(ratio, rmask)
        return {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                "approx_kl": approx_kl, "clip_frac": clip_frac, "mean_ratio": mean_ratio, **losses}

    def _reduce(self, value: Tensor) -> float:
        """Mean over devices, so that every rank takes the same decision."""
        return float(self.trainer.strategy.reduce(value.detach().float(), reduce_op="mean"))

    def _start_iteration(self, batch: dict[str, Tensor]) -> bool:
        """Sample and score a rollout; ``False`` when it is rejected and the policy rolled back."""
        hp = self.hparams
        state = ({k: v.detach().clone() for k, v in self._trainable_state().items()},
                 copy.deepcopy(self.optimizers().optimizer.state_dict()))
        if not self._accepted:  # the first iteration (or the first after a resume) starts from an accepted policy
            self._accepted.append(state)
        self._buffer = self.collect(batch)
        n = len(self._buffer["ids"])
        kl = self._reduce(self._buffer["kl"].mean())
        self.log("train/kl", kl, batch_size=n)
        if not all(torch.isfinite(self._buffer[k]).all() for k in ("logprobs", "values", "advantages", "score")):
            self._rollback("non-finite rollout")
            return False
        if hp.max_kl is not None and kl > hp.max_kl:
            # The controller moves by at most 20% per horizon: too slow for a spike. The cap keeps the KL term from
            # swamping the score (and the value targets) when spikes repeat.
            self.kl_coef_value.fill_(min(2.0 * float(self.kl_coef_value), KL_COEF_CAP * hp.kl_coef))
            self._rollback(f"rollout KL {kl:.2f} > max_kl {hp.max_kl}", back_off=True)
            return False
        if self._accepted[-1] is not state:
            self._accepted.append(state)
        size = min(hp.minibatch_size, n)
        generator = torch.Generator().manual_seed(int(self.sampling_seed) + self.global_step)
        self._queue = [chunk for _ in range(hp.ppo_epochs) for chunk in torch.randperm(n, generator=generator)
                       .split(size) if len(chunk) == size]
        if hp.kl_target is not None:
            controller = AdaptiveKLController(float(self.kl_coef_value), hp.kl_target, hp.kl_horizon)
            self.kl_coef_value.fill_(controller.update(kl, n * self.trainer.world_size))
        logs = {"train/score": self._buffer["score"].mean(), "train/kl_coef": self.kl_coef_value.clone(),
                "train/rollback_count": self.rollback_count.float(),
                "train/response_length": self._buffer["response_mask"].float().sum(1).mean(),
                "train/rollout_tokens_per_s": self._buffer["tokens_per_s"]}
        self.log("train/score", logs.pop("train/score"), prog_bar=True, batch_size=n)
        self.log_dict(logs, batch_size=n)
        return True

    def _trainable_state(self) -> dict[str, Tensor]:
        names = {id(p) for p in self.trainable_parameters()}
        return {k: p for k, p in self.named_parameters() if id(p) in names}

    def _rollback(self, reason: str, back_off: bool = False) -> None:
        """Restore the trainable weights and optimiser state of the last accepted rollout.

        With ``back_off`` (the KL guard), each further rejection in a row goes one accepted rollout further back,
        since the policy restored last time has just sampled a rejected rollout too; when ``max_rollbacks`` in a
        row are reached, training stops at the restored policy. Non-finite values stop training with an error.
        """
        self.rollbacks += 1
        self.rollback_count += 1
        rank_zero_warn(f"PPO: {reason} at step {self.global_step}; iteration rolled back ({self.rollbacks} in a row)")
        if back_off and self.rollbacks > 1 and len(self._accepted) > 1:
            self._accepted.pop()
        params, opt_state = self._accepted[-1]
        with torch.no_grad():
            for name, p in self._trainable_state().items():
                p.copy_(params[name])
        self.optimizers().optimizer.load_state_dict(opt_state)
        self._queue, self._buffer = [], None
        if self.rollbacks >= self.hparams.max_rollbacks:
            if not back_off:
                raise FloatingPointError(f"PPO: {self.rollbacks} rolled-back iterations in a row; stopping ({reason})")
            rank_zero_warn(f"PPO: {self.rollbacks} rejected rollouts in a row; training stops at the restored policy")
            self.trainer.should_stop = True

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        if not self._queue and not self._start_iteration(batch):
            return
        index = self._queue.pop(0)
        prompt_length = int(self._buffer["prompt_length"])
        mb = {k: v[index] for k, v in self._buffer.items() if v.dim() > 0 and k not in ("tokens_per_s",)}
        losses = self.ppo_losses(mb, prompt_length)
        if not math.isfinite(self._reduce(losses["loss"])):
            self._rollback("non-finite loss")
            return
        if self._reduce(losses["mean_ratio"]) > hp.max_mean_ratio:
            ratio = float(losses["mean_ratio"])
            rank_zero_warn(f"PPO: mean ratio {ratio:.2f} > {hp.max_mean_ratio}; minibatch skipped")
            return
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if not all(torch.isfinite(p).all() for p in self.trainable_parameters()):
            self._rollback("non-finite weights")
            return
        self.rollbacks = 0
        if hp.target_kl is not None and self._reduce(losses["approx_kl"]) > 1.5 * hp.target_kl:
            self._queue = []  # early stop: the next step samples a new rollout
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=len(index))
        self.log("train/rollbacks", float(self.rollbacks), batch_size=len(index))

    # --- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compare(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Any]:
        """Policy and reference responses to the same prompts, their scores, the policy's KL and its texts."""
        hp = self.hparams
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        temperature = hp.eval_temperature or hp.temperature
        seed = None if generator is None else generator.initial_seed()
        gens = [torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None for _ in range(2)]
        response, rmask = self.generate(prompt_ids, prompt_mask, temperature=temperature, generator=gens[0])
        ref_response, ref_mask = self.generate(prompt_ids, prompt_mask, reference=True, temperature=temperature,
                                               generator=gens[1])
        reward = self.score(prompt_ids, prompt_mask, response, rmask)
        reward_ref = self.score(prompt_ids, prompt_mask, ref_response, ref_mask)
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, rmask.long()], 1)
        p = prompt_ids.shape[1]
        logprobs = response_logprobs(self.lm, ids, mask, p, temperature)[0]
        ref_logprobs = self._reference_logprobs(ids, mask, p, temperature)
        kl = ((logprobs - ref_logprobs) * rmask).sum(1)
        texts = [self.tokenizer.decode(r[m], skip_special_tokens=True).strip() for r, m in zip(response, rmask)]
        return {"reward": reward, "reward_ref": reward_ref, "kl": kl, "length": rmask.float().sum(1), "texts": texts}

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, metrics: GenerationMetrics, text: bool) -> None:
        generator = torch.Generator(device=self.device).manual_seed(10_007 * (batch_idx + 1))
        out = self.compare(batch, generator)
        ties = (out["reward"] == out["reward_ref"]).float()
        wins = (out["reward"] > out["reward_ref"]).float() + 0.5 * ties
        metrics.reward.update(out["reward"])
        metrics.reward_ref.update(out["reward_ref"])
        metrics.win_rate.update(wins)
        metrics.tie_rate.update(ties)
        metrics.kl.update(out["kl"])
        metrics.response_length.update(out["length"])
        datamodule = getattr(self.trainer, "datamodule", None)
        if text and hasattr(datamodule, "reference"):
            references = [datamodule.reference(int(i)) for i in batch["index"]]
            metrics.rouge.update(out["texts"], references)
            metrics.bleu.update(out["texts"], [[r] for r in references])
            metrics.texts += out["texts"]
            if hasattr(datamodule, "encode_pair"):
                self._update_perplexity(batch, datamodule, metrics)

    @torch.no_grad()
    def _update_perplexity(self, batch: dict[str, Tensor], datamodule, metrics: GenerationMetrics) -> None:
        """Perplexity of the policy and of the reference on the held-out completions of the batch's prompts."""
        from datamodules.text_corpus import lm_batch

        pairs = [datamodule.encode_pair(*datamodule.prompt_and_completion(int(i))) for i in batch["index"]]
        data = lm_batch([p for p, _ in pairs], [c for _, c in pairs], self.tokenizer.pad_token_id, True)
        data = {k: v.to(self.device) for k, v in data.items()}
        labels = data["labels"][:, 1:]
        logits = self.lm(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
        metrics.ppl.update(logits.float(), labels)
        if self.reference is not None:
            ref_logits = self.reference(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        else:
            with self.lm.disable_adapter():
                ref_logits = self.lm(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        metrics.ppl_ref.update(ref_logits[:, :-1].float(), labels)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics, text=False)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics, text=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute("val")
        self.val_metrics.reset()
        win_rate = values.pop("val/win_rate")
        self.log("val/win_rate", win_rate, prog_bar=True)
        in_band = self.in_kl_band(float(values["val/kl"]))
        self.log("val/win_rate_in_band", win_rate if in_band else torch.zeros_like(win_rate))
        self.log_dict(values)

    def in_kl_band(self, kl: float) -> bool:
        """Whether a sequence KL is at most the top of the KL controller's band (any KL without a target)."""
        target = self.hparams.kl_target
        return target is None or kl <= (1 + AdaptiveKLController.max_error) * target

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute("test"))
        self.test_metrics.reset()


class AgenticSFT(CausalLMSFT):
    """SFT on agentic demonstrations (``AgenticDemoDataModule``), also measuring the greedy first action.

    Logged metrics: those of ``CausalLMSFT`` and ``val/tool_call_acc`` (share of first actions that are a valid call
    of a registered tool: known name, the right argument names and types), ``val/tool_call_exact`` (the task's
    own tool with its arguments); the same under ``test/``.
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
        max_new_tokens: int = 40,
    ) -> None:
        """
        Args:
            model_name: ``tiny-llama`` / ``tiny-smollm3`` (built offline from a config), a hub name or a local folder.
            init_from: Checkpoint of an earlier phase whose merged LM weights to start from (``null``: the base).
            hidden_size: Width of a tiny model.
            num_layers: Decoder layers of a tiny model.
            num_heads: Attention heads of a tiny model.
            lora_r: Rank of a LoRA adapter; ``null`` trains every weight.
            lora_alpha: LoRA scale numerator.
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules to adapt; ``auto`` = the attention projections of the architecture.
            load_in_4bit: Quantise the base to 4-bit NF4 (needs ``lora_r``).
            trust_remote_code: Allow code shipped with a hub model to run (off unless you opt in).
            optimizer: Optimiser factory, called with the trainable parameters.
            max_new_tokens: Longest generated action.
        """
        super().__init__(model_name, init_from, hidden_size, num_layers, num_heads, lora_r, lora_alpha, lora_dropout,
                         lora_target_modules, load_in_4bit, trust_remote_code, optimizer)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.tool_metrics = nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in ("val", "test") for m in ("acc", "exact")})

    @torch.no_grad()
    def first_actions(self, prompt_ids: Tensor, prompt_mask: Tensor) -> list[str]:
        """Greedy first actions for left-padded task prompts."""
        tok = self.tokenizer
        out, mask = sample(self.lm, prompt_ids, prompt_mask, self.hparams.max_new_tokens, tok.eos_token_id,
                           tok.pad_token_id, greedy=True)
        return [tok.decode(o[m], skip_special_tokens=True) for o, m in zip(out, mask)]

    def _tool_step(self, batch: dict, stage: str) -> None:
        from envs.agentic import default_tools, parse_action

        tools = default_tools()
        actions = [parse_action(text) for text in self.first_actions(batch["prompt_ids"], batch["prompt_mask"])]
        valid = torch.tensor([float(tools.is_valid_call(a)) for a in actions])
        exact = torch.tensor([float(a.kind == "tool" and a.name == t.tool and a.args == t.args)
                              for a, t in zip(actions, batch["tasks"])])
        self.tool_metrics[f"{stage}_acc"].update(valid)
        self.tool_metrics[f"{stage}_exact"].update(exact)
        self.log(f"{stage}/tool_call_acc", self.tool_metrics[f"{stage}_acc"], prog_bar=stage == "val")
        self.log(f"{stage}/tool_call_exact", self.tool_metrics[f"{stage}_exact"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._tool_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._tool_step(batch, "test")
