"""GRPO for the early-experience agent: critic-free, group-normalised policy gradient on the environment's reward,
starting from an early-experience checkpoint (IL, IWM -> IL or SR).

    python train.py fit --config configs/early_experience/web_shop_grpo.yaml \
        --model.init_args.init_from <early-experience run>/checkpoints/last.ckpt

The agent acts as ``EarlyExperienceAgent`` does, by scoring each candidate action ``a`` of the page with
``s(a) = log p(a | "<observation>\\nAction:")`` (summed over ``a``'s tokens). Its policy is the softmax over the
page's candidates, ``pi(a | page) = softmax(s / temperature)``: a rollout samples from it, evaluation takes its
argmax (the early-experience agent's greedy episodes, logged under the same names).

Everything but the rollout and the log-probs is ``GRPO``'s: each training goal is played ``group_size`` times,
each step is one sequence with its episode's reward, advantages ``(reward - group mean) / group std`` compare the
episodes of a goal, and each step gets its episode's advantage in the clipped-ratio loss, with ``kl_coef`` times
the k3 KL to the starting policy. The ratio and the KL are those of ``pi``, the distribution over the page's
candidates that the actions were sampled from, not of the chosen action's tokens: pushing up the tokens every
candidate shares (``click[``) leaves ``pi`` unchanged, and probability moved to strings the page does not offer is
no change of behaviour (docs/early_experience.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.early_experience import policy_prompt
from envs.text_env import TextEnv
from lightning_modules.early_experience import EpisodeAgent, episode_metrics
from lightning_modules.grpo import GRPO, GroupRollout
from lightning_modules.lm_phase import load_phase_checkpoint
from models.action_scorer import encode_candidates, score_encoded_candidates
from models.lm_factory import LMSettings
from models.lm_text import encode_prompts, pad, pad_with_mask

# The data settings the trained tokenizer (and so the meaning of the checkpoint's embeddings) depends on.
TOKENIZER_SETTINGS = ("env", "seed", "train_goals", "experience_goals", "branches", "detour_prob", "tokenizer",
                      "vocab_size", "split_digits")


class WebShopGRPO(EpisodeAgent, GRPO):
    """GRPO of the candidate-scoring agent in its text environment; every weight trains by default, and the
    reference is a frozen copy of the starting policy.

    Logged, besides ``GRPO``'s (``train/reward`` is the mean episode reward, ``train/kl`` the episode's summed k3
    KL of ``pi``, ``train/response_length`` is 1: one action per sequence): ``train/success`` (share of rollout
    episodes with reward 1), ``train/episode_length``, ``train/steps`` (sequences in the rollout); validation and
    test as ``EarlyExperienceAgent`` (``val/success/<split>`` etc., and the episodes before the first update at
    step 0).
    """

    uses_reward_model = False

    def __init__(
        self,
        lm: LMSettings = LMSettings(model_name="tiny-smollm3"),
        minibatch_size: int = 64,
        kl_coef: float = 0.04,
        length_normalize: bool = False,
        evaluate_before_training: bool = True,
        **kwargs,
    ) -> None:
        """
        Args:
            lm: The policy (see ``LMPhase``): the early-experience agent's tiny model, every weight trained.
            minibatch_size: Steps (sequences) per optimiser step, summed over all devices.
            kl_coef: Weight of the k3 KL of ``pi`` to the starting policy (DeepSeekMath's value, not tuned here).
            length_normalize: Score candidate actions by mean instead of summed token log-probability (as the
                checkpoint's agent did).
            evaluate_before_training: Play the evaluation episodes once before the first update, logged at step 0
                (the starting checkpoint's row).
            kwargs: ``GRPO``'s settings (``group_size``, ``temperature`` of ``pi``, ...) and
                ``LMPhase``'s (``init_from``, ``optimizer``, ...).
        """
        super().__init__(lm=lm, minibatch_size=minibatch_size, kl_coef=kl_coef, **kwargs)
        self.val_metrics, self.test_metrics = episode_metrics("val"), episode_metrics("test")

    def _init_state(self) -> dict[str, Tensor] | None:
        """The checkpoint's merged weights, refused when its data settings gave another tokenizer."""
        path = self.hparams.init_from
        if path is None:
            return None
        checkpoint = load_phase_checkpoint(path)
        saved = checkpoint.get("datamodule_hyper_parameters") or {}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and saved:
            differ = [f"{k}={saved[k]!r} there, {datamodule.hparams.get(k)!r} here" for k in TOKENIZER_SETTINGS
                      if k in saved and saved[k] != datamodule.hparams.get(k)]
            if differ:
                raise ValueError(f"{path!r} was trained with other data settings, so another tokenizer "
                                 f"({'; '.join(differ)}): use its settings")
        return checkpoint["merged_lm"]

    # --- acting -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout_groups(self, batch: list[TextEnv], generator: torch.Generator) -> GroupRollout:
        """``group_size`` episodes of each goal in ``batch``, sampled from ``pi``; one sequence per step: its prompt
        (left-padded) then the chosen action, with the page's candidates and the chosen index in ``inputs``."""
        hp = self.hparams
        envs = [goal.copy() for goal in batch for _ in range(hp.group_size)]
        for env in envs:
            env.reset()
        steps: list[tuple[int, list[int], list[list[int]], int]] = []  # episode, prompt, candidates, chosen
        rewards, lengths = [0.0] * len(envs), [0] * len(envs)
        was_training = self.lm.training
        self.lm.eval()
        active = list(range(len(envs)))
        while active:
            candidates = [envs[i].candidate_actions() for i in active]
            prompts = encode_prompts(self.tokenizer, [policy_prompt(envs[i].observation()) for i in active])
            states = list(zip(prompts, (encode_candidates(self.tokenizer, c) for c in candidates)))
            scores = score_encoded_candidates(self.lm, states, self.tokenizer.pad_token_id, hp.length_normalize)
            still = []
            for i, actions, state, score in zip(active, candidates, states, scores):
                probs = torch.softmax(score / hp.temperature, 0)
                chosen = int(torch.multinomial(probs, 1, generator=generator))
                result = envs[i].step(actions[chosen])
                steps.append((i, *state, chosen))
                rewards[i], lengths[i] = result.reward, lengths[i] + 1
                if not result.done and lengths[i] < envs[i].max_steps:
                    still.append(i)
            active = still
        self.lm.train(was_training)
        return self._as_rollout(steps, rewards, lengths)

    def _as_rollout(self, steps: list[tuple[int, list[int], list[list[int]], int]], rewards: list[float],
                    lengths: list[int]) -> GroupRollout:
        pad_id, device, group_size = self.tokenizer.pad_token_id, self.device, self.hparams.group_size
        episodes = torch.tensor([e for e, *_ in steps], device=device)
        prompt, prompt_mask = pad_with_mask([p for _, p, _, _ in steps], pad_id, left=True)
        action, action_mask = pad_with_mask([c[k] for _, _, c, k in steps], pad_id)
        # [N, K, L] candidate tokens and [N, K] their lengths (0: no such candidate on that page).
        widest = max(len(c) for _, _, cands, _ in steps for c in cands)
        most = max(len(cands) for _, _, cands, _ in steps)
        candidates = torch.full((len(steps), most, widest), pad_id, dtype=torch.long)
        candidate_lengths = torch.zeros(len(steps), most, dtype=torch.long)
        for n, (_, _, cands, _) in enumerate(steps):
            candidates[n, : len(cands)] = pad([*cands, [pad_id] * widest], pad_id)[: len(cands)]
            candidate_lengths[n, : len(cands)] = torch.tensor([len(c) for c in cands])
        reward = torch.tensor(rewards, device=device)
        return GroupRollout(
            ids=torch.cat([prompt, action], 1).to(device), mask=torch.cat([prompt_mask, action_mask], 1).to(device),
            start=prompt.shape[1], trainable=torch.ones(len(steps), 1, dtype=torch.bool, device=device),
            groups=episodes // group_size, rewards=reward[episodes], episodes=episodes,
            inputs={"candidates": candidates.to(device), "candidate_lengths": candidate_lengths.to(device),
                    "chosen": torch.tensor([k for *_, k in steps], device=device)},
            logs={"train/success": (reward >= 1.0).float().mean(),
                  "train/episode_length": torch.tensor(lengths, dtype=torch.float).mean(),
                  "train/steps": torch.tensor(float(len(steps)))},
        )

    def sequence_logprobs(self, data: dict[str, Tensor], start: int, reference: bool = False) -> Tensor:
        """``[N, 1]``: log ``pi`` of each step's chosen candidate among its page's, under the policy or the
        reference, with gradients for the policy."""
        states = [
            (ids[:start][mask[:start].bool()].tolist(), [c[:n].tolist() for c, n in zip(cands, lengths) if n > 0])
            for ids, mask, cands, lengths in zip(data["ids"], data["mask"], data["candidates"],
                                                 data["candidate_lengths"])
        ]

        def chosen_logprobs(model: torch.nn.Module) -> Tensor:
            scores = score_encoded_candidates(model, states, self.tokenizer.pad_token_id,
                                              self.hparams.length_normalize)
            return torch.stack([torch.log_softmax(s / self.hparams.temperature, 0)[k]
                                for s, k in zip(scores, data["chosen"].tolist())])

        if reference:
            with torch.no_grad():
                return self._reference_forward(chosen_logprobs)[:, None]
        return chosen_logprobs(self.lm)[:, None]
