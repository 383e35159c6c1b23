"""Multi-turn RL of the tool-use agent (``envs.agentic``) with GRPO or PPO, rewarded by the environment.

    python train.py fit --config configs/rlhf/agentic_grpo.yaml --model.init_args.init_from <agentic sft.ckpt>
    python train.py fit --config configs/rlhf/agentic_ppo.yaml --model.init_args.init_from <agentic sft.ckpt>

One episode sampler, :func:`play_episodes`, serves both algorithms through their rollout seams (``GRPO.rollout_groups``
and ``PPORLHF.rollout``): the policy writes an action (sampled with the KV-cached ``models.lm_text.sample``, all
unfinished episodes of the batch at once), the environment parses and answers it, and its observation is appended
to the context as tokens the policy is not trained on. An episode is one sequence: the task prompt (left-padded),
then its actions (trainable) and observations (not trainable), right-padded; the reward is the episode's return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from datamodules.agentic_demos import encode_observation, encode_prompt
from envs.agentic import AgenticEnv, Task
from lightning_modules.grpo import GRPO, GroupRollout
from lightning_modules.ppo import PPORLHF
from models.lm_factory import LMSettings, LoraSettings
from models.lm_text import pad, pad_with_mask, sample

EPISODE_METRICS = ("success", "invalid_call_rate", "turns", "tool_calls", "return")


@dataclass
class Episodes:
    """Played episodes as sequences (the layout of ``GroupRollout``) and their outcomes, one entry per episode."""

    ids: Tensor
    """``[N, T]`` the left-padded task prompt, then actions and observations (right-padded)."""
    mask: Tensor
    """``[N, T]`` attention mask."""
    start: int
    """Prompt width: the first column an action may start at."""
    trainable: Tensor
    """``[N, T - start]`` bool: the tokens the policy wrote (actions and their ``<eos>``), not observations."""
    returns: Tensor
    """``[N]`` the environment's summed reward."""
    success: Tensor
    """``[N]`` 1 when the episode finished with the correct answer."""
    invalid: Tensor
    """``[N]`` invalid actions (malformed, or a tool call the registry rejects)."""
    turns: Tensor
    """``[N]`` actions taken."""
    tool_calls: Tensor
    """``[N]`` tool calls made (valid or not)."""

    def stats(self) -> dict[str, Tensor]:
        """Means over the episodes; the invalid-call rate is per action."""
        return {"success": self.success.mean(), "invalid_call_rate": self.invalid.sum() / self.turns.sum(),
                "turns": self.turns.mean(), "tool_calls": self.tool_calls.mean(), "return": self.returns.mean()}


@torch.no_grad()
def play_episodes(model: nn.Module, tokenizer, tasks: Sequence[Task], make_env, max_new_tokens: int,
                  temperature: float = 1.0, greedy: bool = False,
                  generator: torch.Generator | None = None) -> Episodes:
    """One episode per task, batched: each turn samples the next action of every unfinished episode at once.

    ``make_env()`` gives a fresh ``AgenticEnv``; the action's text (decoded without special tokens) is what the
    environment parses. An action is cut at ``max_new_tokens`` (it then has no ``<eos>``).
    """
    device = next(model.parameters()).device
    envs = [make_env() for _ in tasks]
    for env, task in zip(envs, tasks):
        env.reset(task)
    prompts = [encode_prompt(tokenizer, task) for task in tasks]
    bodies: list[list[int]] = [[] for _ in tasks]
    wrote: list[list[bool]] = [[] for _ in tasks]
    invalid, success, returns = [0] * len(tasks), [0.0] * len(tasks), [0.0] * len(tasks)
    while active := [i for i, env in enumerate(envs) if not env.done]:
        ids, mask = pad_with_mask([prompts[i] + bodies[i] for i in active], tokenizer.pad_token_id, left=True)
        tokens, valid = sample(model, ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, temperature=temperature, greedy=greedy, generator=generator)
        for row, i in enumerate(active):
            action = tokens[row][valid[row]].tolist()
            result = envs[i].step(tokenizer.decode(action, skip_special_tokens=True))
            returns[i] += result.reward
            invalid[i] += result.invalid
            success[i] = float(result.action.kind == "finish" and result.observation == "correct")
            reply = [] if result.done else encode_observation(tokenizer, result.observation)
            bodies[i] += action + reply
            wrote[i] += [True] * len(action) + [False] * len(reply)
    prompt_ids, prompt_mask = pad_with_mask(prompts, tokenizer.pad_token_id, left=True)
    body_ids, body_mask = pad_with_mask(bodies, tokenizer.pad_token_id)
    per_episode = {"returns": returns, "success": success, "invalid": invalid,
                   "turns": [env.turns for env in envs], "tool_calls": [env.tool_calls for env in envs]}
    return Episodes(
        ids=torch.cat([prompt_ids, body_ids], 1).to(device), mask=torch.cat([prompt_mask, body_mask], 1).to(device),
        start=prompt_ids.shape[1], trainable=pad(wrote, 0).bool().to(device),
        **{name: torch.tensor(values, dtype=torch.float32, device=device) for name, values in per_episode.items()})

class AgenticRL:
    """The environment side of agentic RL, mixed into a ``PolicyRL`` algorithm (``AgenticGRPO``, ``AgenticPPO``):
    episode settings, the episode sampler behind the algorithm's rollout seam, and evaluation by greedy episodes on
    held-out tasks. There is no reward model: the reward is the episode's return, 1 for a correct final answer,
    ``-invalid_penalty`` per invalid action (malformed, or a tool call the registry rejects), 0 for a wrong answer
    or a budget run out (turns, or a tool call over ``max_tool_calls``, which is not run).

    Logged by validation and test (greedy episodes, one per held-out task): ``val/success`` (share of episodes
    finished with the correct answer), ``val/invalid_call_rate`` (invalid actions / all actions), ``val/turns``
    and ``val/tool_calls`` (per episode), ``val/return``; the same under ``test/``. Training logs the same means
    of the sampled episodes under ``train/`` (``train/score`` is the mean return).
    """

    uses_reward_model = False

    def __init__(self, max_turns: int = 4, max_tool_calls: int = 2, invalid_penalty: float = 0.5,
                 end_on_invalid: bool = True, **kwargs) -> None:
        """
        Args:
            max_turns: Actions per episode before it ends unanswered.
            max_tool_calls: Tool calls per episode; one more ends it unanswered.
            invalid_penalty: Subtracted from the return for each invalid action.
            end_on_invalid: End the episode at its first invalid action (else the agent sees the error and goes on).
        """
        if max_turns < 1 or max_tool_calls < 0 or invalid_penalty < 0:
            raise ValueError("max_turns must be >= 1, max_tool_calls and invalid_penalty >= 0")
        super().__init__(**kwargs)
        self.val_episodes, self.test_episodes = (
            MetricCollection({name: MeanMetric() for name in EPISODE_METRICS}, prefix=f"{stage}/")
            for stage in ("val", "test"))

    def make_env(self) -> AgenticEnv:
        hp = self.hparams
        return AgenticEnv(max_turns=hp.max_turns, max_tool_calls=hp.max_tool_calls,
                          invalid_penalty=hp.invalid_penalty, end_on_invalid=hp.end_on_invalid)

    def play(self, tasks: Sequence[Task], generator: torch.Generator | None = None, greedy: bool = False) -> Episodes:
        """Episodes of the policy on ``tasks`` (sampled at the training temperature, or greedy)."""
        return play_episodes(self.lm, self.tokenizer, tasks, self.make_env, self.hparams.max_new_tokens,
                             self.hparams.temperature, greedy, generator)

    def episode_rollout(self, batch: dict, generator: torch.Generator, repeats: int) -> GroupRollout:
        """Each task of the batch played ``repeats`` times; a group is one task's episodes."""
        tasks = [task for task in batch["tasks"] for _ in range(repeats)]
        episodes = self.play(tasks, generator)
        groups = torch.arange(len(batch["tasks"]), device=self.device).repeat_interleave(repeats)
        logs = {f"train/{name}": value for name, value in episodes.stats().items()}
        return GroupRollout(ids=episodes.ids, mask=episodes.mask, start=episodes.start, trainable=episodes.trainable,
                            groups=groups, rewards=episodes.returns, logs={"train/score": logs.pop("train/return"),
                                                                             **logs})

    # --- evaluation -------------------------------------------------------------------------------------------
    def _evaluate(self, batch: dict, metrics: MetricCollection) -> None:
        if not batch:  # the empty batch a process short of evaluation batches gets under DDP
            return
        episodes = self.play(batch["tasks"], greedy=True)
        values = {"success": episodes.success, "turns": episodes.turns, "tool_calls": episodes.tool_calls,
                  "return": episodes.returns}
        for name, value in values.items():
            metrics[name].update(value)
        metrics["invalid_call_rate"].update(episodes.invalid / episodes.turns, weight=episodes.turns)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_episodes)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_episodes)

    def on_validation_epoch_end(self) -> None:
        values = self.val_episodes.compute()
        self.val_episodes.reset()
        self.log("val/success", values.pop("val/success"), prog_bar=True)
        self.log_dict(values)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_episodes.compute())
        self.test_episodes.reset()


class AgenticGRPO(AgenticRL, GRPO):
    """GRPO on agentic episodes: each task of a batch is played ``group_size`` times and an episode's advantage is
    its return relative to its task's other episodes (``GRPO``'s loss, KL and minibatches; ``reward_clip`` and
    ``missing_eos_penalty`` do not apply: the environment gives the reward)."""

    def __init__(self, lm: LMSettings = LMSettings(lora=LoraSettings(r=16, alpha=32.0)), max_new_tokens: int = 40,
                 group_size: int = 8, kl_coef: float = 0.04, **kwargs) -> None:
        """
        Args:
            lm: The policy: a LoRA adapter on the agentic SFT model.
            max_new_tokens: Longest action.
            group_size: Episodes per task.
            kl_coef: Weight of the k3 KL to the reference (the SFT policy).
        """
        super().__init__(lm=lm, max_new_tokens=max_new_tokens, group_size=group_size, kl_coef=kl_coef, **kwargs)

    @torch.no_grad()
    def rollout_groups(self, batch: dict, generator: torch.Generator) -> GroupRollout:
        return self.episode_rollout(batch, generator, self.hparams.group_size)


class AgenticPPO(AgenticRL, PPORLHF):
    """PPO on agentic episodes: one episode per task, the return added at the episode's last action token, GAE over
    the policy's tokens only (observations are skipped, ``rl.gae``), policy and value losses on those tokens
    (``PPORLHF``'s KL control and guards; ``reward_clip`` and ``missing_eos_penalty`` do not apply)."""

    def __init__(self, lm: LMSettings = LMSettings(lora=LoraSettings(r=16, alpha=32.0)), max_new_tokens: int = 40,
                 **kwargs) -> None:
        """
        Args:
            lm: The policy: a LoRA adapter on the agentic SFT model.
            max_new_tokens: Longest action.
        """
        super().__init__(lm=lm, max_new_tokens=max_new_tokens, **kwargs)

    @torch.no_grad()
    def rollout(self, batch: dict, generator: torch.Generator) -> GroupRollout:
        if "tasks" not in batch:  # PPO's epoch-end KL check replays the last rollout's prompts, without their tasks
            batch = {"tasks": self._training_tasks_of(batch["prompt_ids"], batch["prompt_mask"])}
        return self.episode_rollout(batch, generator, repeats=1)

    def _training_tasks_of(self, prompt_ids: Tensor, prompt_mask: Tensor) -> list[Task]:
        """The training tasks whose first-turn prompts these are (read from the DataModule's training split)."""
        tasks = self.trainer.datamodule.tasks["train"]
        by_prompt = {tuple(encode_prompt(self.tokenizer, task)): task for task in tasks}
        return [by_prompt[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(prompt_ids, prompt_mask)]
