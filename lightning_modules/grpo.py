"""GRPO (Shao et al., 2024, DeepSeekMath): critic-free policy optimisation of an LM against a frozen reward model.
Each prompt is answered ``group_size`` times; a sample's advantage is its reward relative to its group's, so no
value head is trained.

    python train.py fit --config configs/rlhf/grpo.yaml --model.init_args.init_from <sft.ckpt> \
        --model.init_args.reward_model_from <reward.ckpt>

The rollout is one seam, ``GRPO.rollout_groups(batch, generator) -> GroupRollout``: sequences, their attention
masks, which tokens the policy is trained on, group ids and one reward per sequence. This module implements the
single-turn case (a prompt and a sampled response); a multi-turn environment (a tool-use or web-shop agent)
overrides ``rollout_groups`` to play its episodes (each step a sequence, with its episode's id and reward), marks
the environment's tokens as not trainable, and reuses everything else: the KL to the reference, group advantages
over episodes, minibatches, resume and DDP. A policy that samples otherwise than token by token (the web-shop agent
picks one of the page's candidate actions) also overrides ``sequence_logprobs``
(``lightning_modules.web_shop_grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from datamodules.distributed import step_generator
from lightning_modules.lm_phase import check_settings
from lightning_modules.policy_rl import PolicyRL, RolloutIteration
from lightning_modules.rl import group_advantages, grpo_loss, kl_k3, shaped_scores
from models.lm_factory import LMSettings, LoraSettings
from models.lm_rollout import response_logprobs


@dataclass
class GroupRollout:
    """What a rollout hands GRPO: ``N`` sequences in groups, one reward each (all tensors on the module's device).

    ``start`` is the first column of ``ids`` that may hold a trainable token (the prompt length): log-probs are
    computed for ``ids[:, start:]`` only, and ``trainable`` is aligned with those columns.
    """

    ids: Tensor
    """``[N, T]`` token ids: a left-padded prompt, then the episode (right-padded)."""
    mask: Tensor
    """``[N, T]`` attention mask (1 on real tokens)."""
    start: int
    """First column of ``ids`` that may be trainable."""
    trainable: Tensor
    """``[N, U]`` bool: the units the policy sampled and is trained on, aligned with ``GRPO.sequence_logprobs``: by
    default the tokens ``ids[:, start:]`` (not padding, not tool/environment output); one unit per sequence where
    the policy picks a whole action among candidates (``WebShopGRPO``)."""
    groups: Tensor
    """``[N]`` group id: sequences with the same id start from the same prompt (or state) and are compared."""
    rewards: Tensor
    """``[N]`` one scalar reward per sequence (the same for every sequence of one episode)."""
    episodes: Tensor | None = None
    """``[N]`` episode id, when several sequences are the steps of one episode: advantages then compare the
    episodes of a group, one reward each (``null``: every sequence is its own episode)."""
    inputs: dict[str, Tensor] = field(default_factory=dict)
    """Further ``[N, ...]`` tensors that ``GRPO.sequence_logprobs`` reads (kept with the iteration)."""
    logs: dict[str, Tensor] = field(default_factory=dict)
    """Extra rollout statistics to log, by metric name."""


class GRPO(PolicyRL):
    """Group-relative policy optimisation of a LoRA adapter on the SFT model, with manual optimisation.

    Every ``ppo_epochs * rollout sequences // minibatch_size`` training steps form one iteration: its first step
    answers each prompt of the batch ``group_size`` times (no gradients), takes one reward per sequence (the reward
    model's score, clipped to ``+-reward_clip`` and lowered by ``missing_eos_penalty`` for a response that never
    ends, as in PPO), and gives each sequence the advantage ``(reward - group mean) / (group std + eps)``
    (``lightning_modules.rl.group_advantages``). Each training step is then one optimiser step on one minibatch of
    sequences: the clipped-ratio loss with the sequence's advantage at each of its trainable tokens, plus
    ``kl_coef`` times the k3 KL to the reference (the policy with its adapter disabled), averaged over tokens; or,
    with ``kl_in_reward``, the sequence's k3 KL times ``kl_coef`` is taken off its reward before the advantages.

    Logged metrics: ``train/reward`` (the reward advantages are taken from, before any KL; mean per episode),
    ``train/score`` (raw reward-model score), ``train/kl`` (episode KL to the reference, k3 summed over the
    trainable tokens), ``train/adv_zero_frac`` (share of groups whose rewards are all equal: no signal),
    ``train/response_length`` (trainable tokens per sequence), per update ``train/policy_loss``, ``train/kl_token``
    (mean k3 per token) and ``train/clip_frac``; validation and test as ``PolicyRL``.
    """

    def __init__(
        self,
        lm: LMSettings = LMSettings(lora=LoraSettings(r=16, alpha=32.0)),
        group_size: int = 4,
        ppo_epochs: int = 2,
        minibatch_size: int = 32,
        clip_range: float = 0.2,
        kl_coef: float = 0.2,
        kl_in_reward: bool = False,
        advantage_eps: float = 1e-4,
        max_grad_norm: float = 0.5,
        reward_clip: float = 3.0,
        missing_eos_penalty: float | None = 1.0,
        **kwargs,
    ) -> None:
        """
        Args:
            lm: The policy (see ``LMPhase``): a LoRA adapter on the SFT model by default.
            group_size: Samples per prompt (``G``); advantages compare the samples of one prompt.
            ppo_epochs: Passes over each rollout.
            minibatch_size: Sequences per optimiser step, summed over all devices.
            clip_range: Policy ratio clip.
            kl_coef: Weight of the k3 KL to the reference (in the loss, or in the reward with ``kl_in_reward``).
            kl_in_reward: Take ``kl_coef`` x the sequence's KL off its reward instead of adding a KL loss.
            advantage_eps: Added to the group std, so near-equal rewards give small advantages, not noise blown up.
            max_grad_norm: Global gradient-norm clip.
            reward_clip: Clip the reward-model score to +- this.
            missing_eos_penalty: Subtracted from the score of responses that never emit ``<eos>`` (``null``: none).
        """
        given = dict(locals())
        checks = {
            "group_size": group_size >= 2, "ppo_epochs": ppo_epochs >= 1, "minibatch_size": minibatch_size >= 1,
            "clip_range": clip_range > 0, "kl_coef": kl_coef >= 0, "advantage_eps": advantage_eps > 0,
            "max_grad_norm": max_grad_norm > 0, "reward_clip": reward_clip > 0,
        }
        check_settings("GRPO", checks, given)
        super().__init__(lm=lm, **kwargs)
        self.automatic_optimization = False
        self.register_buffer("sampling_seed", torch.randint(0, 2**31 - 1, ()))
        self.iteration = RolloutIteration()

    # --- acting -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout_groups(self, batch: dict[str, Tensor], generator: torch.Generator) -> GroupRollout:
        """The seam a multi-turn environment overrides: here, ``group_size`` responses to each prompt of the batch,
        scored by the reward model."""
        hp = self.hparams
        prompt_ids = batch["prompt_ids"].repeat_interleave(hp.group_size, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(hp.group_size, 0)
        response, response_mask = self.generate(prompt_ids, prompt_mask, generator=generator)
        score = self.score(prompt_ids, prompt_mask, response, response_mask)
        rewards = shaped_scores(score, response, response_mask, self.tokenizer.eos_token_id, hp.reward_clip,
                                hp.missing_eos_penalty)
        groups = torch.arange(len(batch["prompt_ids"]), device=self.device).repeat_interleave(hp.group_size)
        return GroupRollout(ids=torch.cat([prompt_ids, response], 1),
                            mask=torch.cat([prompt_mask, response_mask.long()], 1), start=prompt_ids.shape[1],
                            trainable=response_mask.bool(), groups=groups, rewards=rewards,
                            logs={"train/score": score.mean()})

    def sequence_logprobs(self, data: dict[str, Tensor], start: int, reference: bool = False) -> Tensor:
        """Log-probs ``[N, U]`` of the units each sequence of ``data`` (a rollout's ``ids``, ``mask`` and
        ``inputs``, or a minibatch of them) was sampled by, under the policy or its reference: here the tokens
        ``ids[:, start:]`` at the sampling temperature. A subclass whose policy samples otherwise overrides it."""
        if reference:
            return self._reference_logprobs(data["ids"], data["mask"], start)
        return response_logprobs(self.lm, data["ids"], data["mask"], start, self.hparams.temperature)[0]

    @torch.no_grad()
    def collect(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One rollout with what the updates need (log-probs of the sampling policy and of the reference,
        advantages), and its statistics to log."""
        hp = self.hparams
        generator = step_generator(self.sampling_seed, self.global_rank, self.global_step, device=self.device)
        rollout = self.rollout_groups(batch, generator)
        data = {"ids": rollout.ids, "mask": rollout.mask, **rollout.inputs}
        logprobs = self.sequence_logprobs(data, rollout.start)
        ref_logprobs = self.sequence_logprobs(data, rollout.start, reference=True)
        trainable = rollout.trainable.float()
        kl = (kl_k3(logprobs * trainable, ref_logprobs * trainable) * trainable).sum(1)
        episodes = rollout.episodes if rollout.episodes is not None else torch.arange(len(kl), device=kl.device)
        # One reward and one KL per episode (the sum over its sequences); advantages compare a group's episodes.
        _, episode_of = torch.unique(episodes, return_inverse=True)
        zeros = torch.zeros(int(episode_of.max()) + 1, device=kl.device)
        episode_reward = zeros.scatter(0, episode_of, rollout.rewards.float())
        episode_kl = zeros.index_add(0, episode_of, kl)
        episode_group = torch.zeros_like(zeros, dtype=torch.long).scatter(0, episode_of, rollout.groups)
        rewards = episode_reward - hp.kl_coef * episode_kl if hp.kl_in_reward else episode_reward
        advantages, tied = group_advantages(rewards, episode_group, hp.advantage_eps)
        buffer = {**data, "trainable": rollout.trainable, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
                  "advantages": advantages[episode_of], "start": torch.tensor(rollout.start)}
        logs = {"train/reward": episode_reward.mean(), "train/kl": episode_kl.mean(),
                "train/adv_zero_frac": tied.float().mean(), "train/response_length": trainable.sum(1).mean(),
                **rollout.logs}
        return buffer, logs

    # --- learning ---------------------------------------------------------------------------------------------
    def grpo_losses(self, mb: dict[str, Tensor], start: int) -> dict[str, Tensor]:
        """The GRPO loss of one minibatch (``lightning_modules.rl.grpo_loss``)."""
        hp = self.hparams
        logprobs = self.sequence_logprobs(mb, start)
        kl_coef = 0.0 if hp.kl_in_reward else hp.kl_coef
        return grpo_loss(logprobs, mb["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["trainable"],
                         hp.clip_range, kl_coef)

    def _start_iteration(self, batch: dict[str, Tensor]) -> None:
        buffer, logs = self.collect(batch)
        n = len(buffer["ids"])
        # The same order on every rank; each rank shuffles its own rollout.
        self.start_iteration(buffer, step_generator(self.sampling_seed, step=self.global_step, attempt=1))
        self.log("train/reward", logs.pop("train/reward"), prog_bar=True, batch_size=n)
        self.log_dict(logs, batch_size=n)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.iteration.done:
            self._start_iteration(batch)
        index, mb = self.iteration.next(self.device)
        losses = self.grpo_losses(mb, int(self.iteration.buffer["start"]))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # manual optimisation: the per-step schedule (lr_decay, warmup_ratio) is ours to step
            scheduler.step()
        logs = {"policy_loss": losses["policy_loss"], "kl_token": losses["kl"], "clip_frac": losses["clip_frac"]}
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=len(index))
