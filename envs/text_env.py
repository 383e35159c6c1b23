"""The interface of the text environments an LM agent acts in (tiny shop, procedural web shop)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass
class StepResult:
    """What one action produced. ``error`` is set for an invalid action, which changes nothing else."""

    observation: str
    reward: float
    done: bool
    error: str | None = None
    info: dict = field(default_factory=dict)


class TextEnv:
    """Base class: text observations, text actions, a finite set of candidate actions and a scripted expert.

    Invalid actions (unknown, malformed, or not possible in the current state) are no-ops: the state stays as it
    was, the observation carries the error, the step still counts towards ``max_steps``. Nothing raises.
    """

    max_steps: int = 10

    def reset(self) -> str:
        raise NotImplementedError

    def step(self, action: str) -> StepResult:
        raise NotImplementedError

    def candidate_actions(self) -> list[str]:
        """The actions offered to the agent in the current state (the expert's among them)."""
        raise NotImplementedError

    def expert_action(self) -> str:
        """The scripted expert's action in the current state."""
        raise NotImplementedError

    def observation(self) -> str:
        raise NotImplementedError

    def copy(self) -> TextEnv:
        """An independent copy, for executing alternative actions from the same state."""
        return copy.deepcopy(self)


def run_episode(env: TextEnv, policy) -> tuple[float, int, int, bool]:
    """Play ``policy(env) -> action`` until the episode ends; returns (reward, steps, invalid actions, success)."""
    env.reset()
    reward, invalid, steps, done = 0.0, 0, 0, False
    while not done and steps < env.max_steps:
        result = env.step(policy(env))
        steps += 1
        invalid += result.error is not None
        reward, done = result.reward, result.done
    return reward, steps, invalid, reward >= 1.0


def expert_succeeds_within(env: TextEnv, steps: int) -> bool:
    """Whether the expert, from ``env``'s current state, reaches reward 1 within ``steps`` steps (``env`` untouched)."""
    probe = env.copy()
    for _ in range(max(steps, 0)):
        result = probe.step(probe.expert_action())
        if result.done:
            return result.reward >= 1.0
    return False
