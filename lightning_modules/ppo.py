"""PPO of an LM policy against a frozen reward model (RLHF phase 3), with an adaptive KL penalty, a KL guard that
rolls back spiking rollouts, and an optional exact-KL loss.

    python train.py fit --config configs/rlhf/ppo.yaml --model.init_args.init_from <sft.ckpt> \
        --model.init_args.reward_model_from <reward.ckpt>
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.distributed import step_generator
from lightning_modules.grpo import GroupRollout
from lightning_modules.lm_phase import check_settings
from lightning_modules.policy_rl import PolicyRL, RolloutIteration
from lightning_modules.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_k3,
    masked_mean,
    masked_normalize,
    shaped_scores,
)
from models.lm_factory import LMSettings, LoraSettings
from models.lm_rollout import (
    AdaptiveKLController,
    ScalarHead,
    chosen_and_entropy,
    hidden_size_of,
    response_log_softmax,
    response_logprobs,
)

KL_COEF_CAP = 10.0  # the KL guard raises the KL coefficient to at most this multiple of its initial value


class PPORLHF(PolicyRL):
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
    ``train/clip_frac``, ``train/entropy``, ``train/response_length``, ``train/rollbacks``, ``train/policy_kl`` (the
    sequence KL of the policy being updated, estimated from the rollout's samples), ``train/epoch_end_kl``
    (the KL of a last rollout at each epoch end, which returns to the last accepted policy when above ``max_kl``),
    ``train/rollback_count`` (all rollbacks so far), ``train/kl_loss`` (with ``kl_loss_coef``),
    ``train/rollout_tokens_per_s``; validation and test as ``PolicyRL`` (the policy against its reference on the
    same prompts), and ``val/win_rate_in_band`` (the win rate while ``val/kl`` is not above the KL controller's
    band, else 0: the PPO config's ModelCheckpoint keeps the best policy by it).
    """

    def __init__(
        self,
        lm: LMSettings = LMSettings(lora=LoraSettings(r=16, alpha=32.0)),
        ppo_epochs: int = 2,
        minibatch_size: int = 32,
        gamma: float = 1.0,
        gae_lambda: float = 1.0,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        value_coef: float = 0.1,
        entropy_coef: float = 0.0,
        max_grad_norm: float = 0.5,
        kl_coef: float = 0.2,
        kl_target: float | None = 2.0,
        kl_horizon: int = 1000,
        kl_estimator: str = "k1",
        target_kl: float | None = 0.1,
        max_kl: float | None = 2.4,
        kl_loss_coef: float = 0.03,
        reward_clip: float = 3.0,
        missing_eos_penalty: float | None = 1.0,
        max_mean_ratio: float = 5.0,
        max_rollbacks: int = 5,
        **kwargs,
    ) -> None:
        """
        Args:
            lm: The policy (see ``LMPhase``): a LoRA adapter on the SFT model by default.
            ppo_epochs: Passes over each rollout batch.
            minibatch_size: Responses per optimiser step, summed over all devices.
            gamma: Discount over response tokens.
            gae_lambda: GAE bias/variance trade-off (1: the end-of-sequence score reaches every token undiscounted).
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
                coefficient, up to 10x ``kl_coef`` (``null``: never). So does a policy whose KL, estimated during
                an iteration from the rollout's samples weighted by their ratios, passes it (before it samples), and
                a policy above it at an epoch's end.
            kl_loss_coef: Weight of a loss term: the exact KL(policy || reference) over the whole vocabulary at each
                response position, averaged over the tokens. Unlike the sampled KL in the reward it also sees
                probability moved to tokens the rollout did not sample (0: off; costs a reference forward per step).
            reward_clip: Clip the reward-model score to +- this.
            missing_eos_penalty: Subtracted from the score of responses that never emit ``<eos>`` (``null``: none).
            max_mean_ratio: Skip a minibatch whose mean policy ratio exceeds this (a sign of divergence).
            max_rollbacks: Consecutive rollbacks before training stops: with an error when values are non-finite,
                at the restored policy for the KL guard, which keeps this many accepted snapshots of the trainable
                weights and optimiser state (the adapter and value head with LoRA; every weight without).
        """
        given = dict(locals())
        checks = {
            "ppo_epochs": ppo_epochs >= 1, "minibatch_size": minibatch_size >= 1, "gamma": 0 <= gamma <= 1,
            "gae_lambda": 0 <= gae_lambda <= 1, "clip_range": clip_range > 0, "clip_range_value": clip_range_value > 0,
            "value_coef": value_coef >= 0, "max_grad_norm": max_grad_norm > 0, "kl_coef": kl_coef >= 0,
            "kl_horizon": kl_horizon > 0, "kl_target": kl_target is None or kl_target > 0,
            "target_kl": target_kl is None or target_kl > 0, "max_kl": max_kl is None or max_kl > 0,
            "kl_loss_coef": kl_loss_coef >= 0, "reward_clip": reward_clip > 0,
            "kl_estimator": kl_estimator in ("k1", "k3"), "max_rollbacks": max_rollbacks >= 1,
            "max_mean_ratio": max_mean_ratio > 1,
        }
        check_settings("PPO", checks, given)
        if kwargs.get("lr_decay", "constant") != "constant" or kwargs.get("warmup_ratio", 0.0) != 0.0:
            raise ValueError("PPO steps its optimiser by hand: lr_decay and warmup_ratio are not supported")
        super().__init__(lm=lm, **kwargs)
        self.automatic_optimization = False
        self.register_buffer("kl_coef_value", torch.tensor(float(kl_coef)))
        self.register_buffer("sampling_seed", torch.randint(0, 2**31 - 1, ()))
        self.register_buffer("rollback_count", torch.tensor(0))  # all rollbacks so far; also varies the sampling
        self.value_head: ScalarHead | None = None
        self.iteration = RolloutIteration()
        self._accepted: deque[tuple[dict, dict]] = deque(maxlen=max_rollbacks)  # (weights, optimiser) to return to
        self.rollbacks = 0

    # --- building ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        super()._build()
        self.value_head = ScalarHead(hidden_size_of(self.lm), zero_init=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The KL guard's policies to return to, so a resumed run rolls back as the uninterrupted one would.
        checkpoint["ppo_guard"] = {"accepted": list(self._accepted), "rollbacks": self.rollbacks}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].setdefault("rollback_count", torch.tensor(0))  # saved before the KL guard existed
        guard = checkpoint.get("ppo_guard", checkpoint.get("ppo_iteration", {}))  # the older key, or none
        self._accepted.clear()
        self._accepted.extend(guard.get("accepted", []))
        self.rollbacks = guard.get("rollbacks", 0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.lm.parameters(), *self.value_head.parameters()] if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.trainable_parameters())

    # --- acting -----------------------------------------------------------------------------------------------
    def _kl(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        if self.hparams.kl_estimator == "k3":
            return kl_k3(logprobs, ref_logprobs)
        return logprobs - ref_logprobs

    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor], generator: torch.Generator) -> GroupRollout:
        """The seam a multi-turn environment overrides (as ``GRPO.rollout_groups``; groups are not used): a response
        to each prompt of the batch and its final reward, the reward model's score shaped as in ``rl.shaped_scores``.
        PPO adds the reward at the last trainable token and trains on the ``trainable`` tokens only."""
        hp = self.hparams
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        response, response_mask = self.generate(prompt_ids, prompt_mask, generator=generator)
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, response_mask.long()], 1)
        raw_score = self.reward_model(ids, mask)
        score = shaped_scores(raw_score, response, response_mask, self.tokenizer.eos_token_id, hp.reward_clip,
                              hp.missing_eos_penalty)
        return GroupRollout(ids=ids, mask=mask, start=prompt_ids.shape[1], trainable=response_mask.bool(),
                            groups=torch.arange(len(ids), device=ids.device), rewards=score,
                            logs={"train/score": raw_score.mean()})

    @torch.no_grad()
    def collect(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One rollout batch with everything PPO needs (no gradients); its ``train/`` entries are logged."""
        hp = self.hparams
        generator = step_generator(self.sampling_seed, self.global_rank, self.global_step, self.rollback_count,
                                   device=self.device)
        start = time.perf_counter()
        rollout = self.rollout(batch, generator)
        seconds = time.perf_counter() - start
        ids, mask, p, response_mask = rollout.ids, rollout.mask, rollout.start, rollout.trainable
        logprobs, _, hidden = response_logprobs(self.lm, ids, mask, p, hp.temperature, with_hidden=True)
        values = self.value_head(hidden)
        ref_logprobs = self._reference_logprobs(ids, mask, p)
        rmask = response_mask.float()
        kl = self._kl(logprobs, ref_logprobs) * rmask
        rewards = -self.kl_coef_value * kl
        last = (response_mask.long().cumsum(1).argmax(1))  # index of the last trainable token
        rewards[torch.arange(len(rewards)), last] += rollout.rewards
        advantages, returns = gae(rewards, values * rmask, rmask, hp.gamma, hp.gae_lambda)
        return {"ids": ids, "mask": mask, "response_mask": response_mask, "logprobs": logprobs,
                "ref_logprobs": ref_logprobs, "values": values * rmask, "advantages": advantages, "returns": returns,
                "rewards": rollout.rewards, "kl": kl.sum(1),
                "tokens_per_s": torch.tensor(float(response_mask.sum()) / max(seconds, 1e-9)),
                "prompt_length": torch.tensor(p), **rollout.logs}

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
            if "ref_logprobs" in mb:  # (a rollout saved by an earlier version has none)
                # The sequence KL of the policy as it is now to the reference, from the rollout's samples weighted
                # by their per-token ratios: what the next rollout would show, known before it is sampled.
                losses["policy_kl"] = (ratio * self._kl(logprobs, mb["ref_logprobs"]) * rmask).sum(1).mean()
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
        buffer = self.collect(batch)
        n = len(buffer["ids"])
        kl = self._reduce(buffer["kl"].mean())
        self.log("train/kl", kl, batch_size=n)
        if not all(torch.isfinite(buffer[k]).all() for k in ("logprobs", "values", "advantages", "rewards")):
            self._rollback("non-finite rollout")
            return False
        if hp.max_kl is not None and kl > hp.max_kl:
            self._reject(f"rollout KL {kl:.2f} > max_kl {hp.max_kl}")
            return False
        if self._accepted[-1] is not state:
            self._accepted.append(state)
        self.start_iteration(buffer, torch.Generator().manual_seed(int(self.sampling_seed) + self.global_step))
        if hp.kl_target is not None:
            controller = AdaptiveKLController(float(self.kl_coef_value), hp.kl_target, hp.kl_horizon)
            self.kl_coef_value.fill_(controller.update(kl, n * self.trainer.world_size))
        logs = {"train/kl_coef": self.kl_coef_value.clone(), "train/rollback_count": self.rollback_count.float(),
                "train/response_length": buffer["response_mask"].float().sum(1).mean(),
                "train/rollout_tokens_per_s": buffer["tokens_per_s"],
                **{k: v for k, v in buffer.items() if k.startswith("train/")}}
        self.log("train/score", logs.pop("train/score"), prog_bar=True, batch_size=n)
        self.log_dict(logs, batch_size=n)
        return True

    def _reject(self, reason: str) -> None:
        """The KL guard: discard the policy whose KL is above the band and double the KL coefficient.

        The controller moves by at most 20% per horizon: too slow for a spike. The cap keeps the KL term from
        swamping the score (and the value targets) when spikes repeat."""
        self.kl_coef_value.fill_(min(2.0 * float(self.kl_coef_value), KL_COEF_CAP * self.hparams.kl_coef))
        self._rollback(reason, back_off=True)

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
        self.iteration.clear()
        if self.rollbacks >= self.hparams.max_rollbacks:
            if not back_off:
                raise FloatingPointError(f"PPO: {self.rollbacks} rolled-back iterations in a row; stopping ({reason})")
            rank_zero_warn(f"PPO: {self.rollbacks} rejected rollouts in a row; training stops at the restored policy")
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        """The updates since the last accepted rollout were never seen by the KL guard: sample the epoch's last
        prompts once more with the policy as it is and, if that rollout's KL is above ``max_kl``, return to the last
        accepted policy, so that neither a checkpoint taken now nor the policy a run ends with is out of band."""
        buffer = self.iteration.buffer
        if self.hparams.max_kl is None or buffer is None or not self._accepted:
            return
        p = int(buffer["prompt_length"])
        prompts = {"prompt_ids": buffer["ids"][:, :p], "prompt_mask": buffer["mask"][:, :p]}
        kl = self._reduce(self.collect(prompts)["kl"].mean())
        self.log("train/epoch_end_kl", kl)
        if kl > self.hparams.max_kl:
            self._rollback(f"epoch-end KL {kl:.2f} > max_kl {self.hparams.max_kl}", back_off=True)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        if self.iteration.done and not self._start_iteration(batch):
            return
        index, mb = self.iteration.next(self.device)
        losses = self.ppo_losses(mb, int(self.iteration.buffer["prompt_length"]))
        if not math.isfinite(self._reduce(losses["loss"])):
            self._rollback("non-finite loss")
            return
        updated = self.iteration.taken > 1  # the policy has moved since the rollout
        if updated and hp.max_kl is not None and "policy_kl" in losses:
            estimate = self._reduce(losses["policy_kl"])
            if estimate > hp.max_kl:  # this iteration's updates took the policy out of the band: reject it unsampled
                self._reject(f"estimated KL {estimate:.2f} of the updated policy > max_kl {hp.max_kl}")
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
        if hp.target_kl is not None and self._reduce(losses["approx_kl"]) > 1.5 * hp.target_kl:
            self.iteration.queue.clear()  # early stop: the next step samples a new rollout
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=len(index))
        # Rolled-back iterations in a row before this accepted update (then the count starts again).
        self.log("train/rollbacks", float(self.rollbacks), batch_size=len(index))
        self.rollbacks = 0

    # --- evaluation -------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        win_rate, kl = self.val_metrics.paired["win_rate"].compute(), self.val_metrics.paired["kl"].compute()
        super().on_validation_epoch_end()
        self.log("val/win_rate_in_band", win_rate if self.in_kl_band(float(kl)) else torch.zeros_like(win_rate))

    def in_kl_band(self, kl: float) -> bool:
        """Whether a sequence KL is at most the top of the KL controller's band (any KL without a target)."""
        target = self.hparams.kl_target
        return target is None or kl <= (1 + AdaptiveKLController.max_error) * target

