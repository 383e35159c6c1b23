"""Arithmetic tool environment, stepped for a whole batch at once in torch.

An episode shows the agent the digits of one problem; the agent answers by emitting tool tokens that the
environment executes. Curriculum stages and their goals (digits a..e in 0..9):

    stage 0: a*b + c            context a b c
    stage 1: (a*b + c) - d      context a b c d
    stage 2: (a*b + c) - d*e    context a b c d e

Two semantics are implemented with the same interface:

``register`` (default): a calculator with operator precedence, in which every stated goal is reachable and is
    exactly what is rewarded. ``mem`` holds the sum of the finished terms (starts at 0), ``acc`` the term being
    built (starts at the first digit), and an operand ``cursor`` points at the next unused digit (the second).
    * MUL: ``acc = acc * digit``.
    * ADD / SUB: the term is finished (``mem = mem + acc``) and a new one starts: ``acc = +digit`` / ``-digit``.
      MUL, ADD and SUB read the digit under the cursor, which then moves on; with no digit left they do nothing.
    * STO: ``mem = mem + acc; acc = 0`` (file the term). RCL: ``acc = mem; mem = 0`` (take the sum back).
    * ANS: submit ``mem + acc`` and end the episode; reward 1 if it equals the stage's goal, else 0.
    * EOS: end the episode without an answer (reward 0). So does running out of ``max_steps``.
    Shortest solutions: stage 0 ``MUL ADD ANS``, stage 1 ``MUL ADD SUB ANS``, stage 2 ``MUL ADD SUB MUL ANS``;
    each stage's program extends the previous one by one token, which is what makes the curriculum work.

``seed``: the original tutorial's semantics, bugs included, kept to reproduce its published numbers: one running
    value, operands fixed by the stage, ANS checked against the sub-goal one step behind the stated goal, reward
    ``correct + 0.2 * shaping``, every token of the vocabulary is an action, EOS does not end the episode.

``correct`` in :class:`ToolEnvState` always means "answered the *stated* goal", whatever the semantics rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

NUM_DIGITS = 10
CTX, MUL, ADD, SUB, ANS, STO, RCL, EOS, PAD = range(10, 19)
VOCAB_SIZE = 19  # digits, CTX, the seven tool tokens and PAD (input only, never an action)
TOKEN_NAMES = {
    **{i: str(i) for i in range(10)},
    CTX: "[CTX]",
    MUL: "MUL",
    ADD: "ADD",
    SUB: "SUB",
    ANS: "ANS",
    STO: "STO",
    RCL: "RCL",
    EOS: "EOS",
    PAD: "[PAD]",
}
TOOL_TOKENS = (MUL, ADD, SUB, ANS, STO, RCL, EOS)
NUM_STAGES = 3
STAGE_NUM_DIGITS = (3, 4, 5)
Semantics = Literal["register", "seed"]


def stage_goal(digits: Tensor, stage: Tensor) -> Tensor:
    """The stated goal of each problem: ``digits`` is ``[B, 5]`` (a..e), ``stage`` is ``[B]``."""
    a, b, c, d, e = digits.unbind(-1)
    base = a * b + c
    return torch.where(stage == 0, base, torch.where(stage == 1, base - d, base - d * e))


def decode(tokens: list[int]) -> str:
    """Human-readable token sequence."""
    return " ".join(TOKEN_NAMES[t] for t in tokens)


@dataclass
class ToolEnvState:
    """Batched episode state; every field is a tensor with the batch as its first dimension."""

    digits: Tensor  # [B, 5] a..e (digits beyond the stage's context are ignored)
    stage: Tensor  # [B]
    acc: Tensor  # running value
    mem: Tensor  # memory register (seed semantics: 0 empty, 1 "ok", 2 "use_d")
    cursor: Tensor  # index of the next unused digit (register semantics)
    has_value: Tensor  # seed semantics: the running value is not None
    steps: Tensor  # tokens executed so far
    done: Tensor  # episode over
    answered: Tensor  # ended with ANS
    answer: Tensor  # the submitted value (0 without ANS)
    correct: Tensor  # ended with ANS on the stated goal


class ToolEnv:
    """Vectorised arithmetic tool environment (see the module docstring for the rules)."""

    def __init__(self, semantics: Semantics = "register", max_steps: int = 8) -> None:
        if semantics not in ("register", "seed"):
            raise ValueError(f"unknown semantics {semantics!r}; expected 'register' or 'seed'")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.semantics = semantics
        self.max_steps = max_steps
        # The seed's policy head spans the whole vocabulary; digits and CTX are no-op actions there.
        self.action_tokens = torch.tensor(TOOL_TOKENS if semantics == "register" else range(PAD))

    @property
    def num_actions(self) -> int:
        return len(self.action_tokens)

    def reset(self, digits: Tensor, stage: Tensor) -> ToolEnvState:
        """Start one episode per row of ``digits`` ``[B, 5]`` at the given ``stage`` ``[B]``."""
        if digits.ndim != 2 or digits.shape[1] != 5:
            raise ValueError(f"digits must have shape [B, 5], got {tuple(digits.shape)}")
        if ((stage < 0) | (stage >= NUM_STAGES)).any():
            raise ValueError(f"stage must be in 0..{NUM_STAGES - 1}, got {stage.unique().tolist()}")
        zeros = torch.zeros_like(stage)
        false = torch.zeros_like(stage, dtype=torch.bool)
        return ToolEnvState(
            digits=digits,
            stage=stage,
            acc=digits[:, 0].clone() if self.semantics == "register" else zeros.clone(),
            mem=zeros.clone(),
            cursor=torch.ones_like(stage),
            has_value=false.clone(),
            steps=zeros.clone(),
            done=false.clone(),
            answered=false.clone(),
            answer=zeros.clone(),
            correct=false.clone(),
        )

    def step(self, state: ToolEnvState, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Execute one token per episode (ignored where already done); returns ``(reward, done)`` as ``[B]``."""
        active = ~state.done
        if self.semantics == "register":
            reward = self._step_register(state, tokens, active)
        else:
            reward = self._step_seed(state, tokens, active)
        state.steps = state.steps + active.long()
        state.done = state.done | (active & (state.steps >= self.max_steps))
        return reward, state.done

    def _step_register(self, s: ToolEnvState, tokens: Tensor, active: Tensor) -> Tensor:
        n_digits = torch.as_tensor(STAGE_NUM_DIGITS, device=s.stage.device)[s.stage]
        has_digit = s.cursor < n_digits
        digit = s.digits.gather(1, s.cursor.clamp(max=4).unsqueeze(1)).squeeze(1)
        reads = ((tokens == MUL) | (tokens == ADD) | (tokens == SUB)) & has_digit
        new_term = (tokens == ADD) | (tokens == SUB)
        new_acc = torch.where(tokens == MUL, s.acc * digit, torch.where(tokens == ADD, digit, -digit))
        new_acc = torch.where(reads, new_acc, s.acc)
        new_mem = torch.where(reads & new_term, s.mem + s.acc, s.mem)
        new_acc = torch.where(tokens == STO, torch.zeros_like(s.acc), torch.where(tokens == RCL, s.mem, new_acc))
        new_mem = torch.where(
            tokens == STO, s.mem + s.acc, torch.where(tokens == RCL, torch.zeros_like(s.mem), new_mem)
        )
        s.acc = torch.where(active, new_acc, s.acc)
        s.mem = torch.where(active, new_mem, s.mem)
        s.cursor = s.cursor + (active & reads).long()
        answers = active & (tokens == ANS)
        correct = answers & (s.mem + s.acc == stage_goal(s.digits, s.stage))
        s.answer = torch.where(answers, s.mem + s.acc, s.answer)
        s.answered = s.answered | answers
        s.correct = s.correct | correct
        s.done = s.done | answers | (active & (tokens == EOS))
        return correct.float()

    def _step_seed(self, s: ToolEnvState, tokens: Tensor, active: Tensor) -> Tensor:
        a, b, c, d, e = s.digits.unbind(-1)
        stage = s.stage
        use_d = (stage == 2) & (s.mem == 2)
        has = s.has_value
        acc = s.acc
        mul = torch.where(has, acc * torch.where(stage > 0, d, torch.ones_like(d)), a * b)
        new_acc = torch.where(tokens == MUL, mul, acc)
        new_acc = torch.where((tokens == ADD) & has, acc + c, new_acc)
        sub_operand = torch.where(use_d, e, torch.where(stage > 0, d, torch.zeros_like(d)))
        new_acc = torch.where((tokens == SUB) & has, acc - sub_operand, new_acc)
        rcl = (tokens == RCL) & (s.mem > 0)
        # Seed: ``final = d*e if use_d else (final if final else 0)``: None and 0 both become 0.
        new_acc = torch.where(rcl, torch.where(use_d, d * e, torch.where(has, acc, torch.zeros_like(acc))), new_acc)
        new_has = has | (tokens == MUL) | rcl
        new_mem = torch.where(tokens == STO, torch.where(stage >= 1, 2, 1), s.mem)
        s.acc = torch.where(active, new_acc, acc)
        s.has_value = torch.where(active, new_has, has)
        s.mem = torch.where(active, new_mem, s.mem)

        answers = active & (tokens == ANS)
        value, valid = s.acc, s.has_value
        goal0, goal1 = a * b, a * b + c
        goal2, goal3 = goal1 - d, d * e
        goal4 = goal1 - goal3
        hit = lambda goal: (valid & (value == goal)).float()  # noqa: E731
        checked = torch.where(stage == 0, goal0, torch.where(stage == 1, goal1, goal2))  # the seed's off-by-one
        shaping = torch.where(
            stage == 0,
            0.25 * hit(goal0) + 0.5 * hit(goal1),
            torch.where(
                stage == 1,
                0.25 * hit(goal0) + 0.5 * hit(goal1) + 0.75 * hit(goal2),
                0.2 * hit(goal0) + 0.4 * hit(goal1) + 0.6 * hit(goal4) + 0.6 * hit(goal3),
            ),
        )
        reward = torch.where(answers, hit(checked) + 0.2 * shaping, torch.zeros_like(shaping))
        s.answer = torch.where(answers, value, s.answer)
        s.answered = s.answered | answers
        s.correct = s.correct | (answers & valid & (value == stage_goal(s.digits, stage)))
        s.done = s.done | answers
        return reward


def context_tokens(digits: Tensor, stage: Tensor) -> Tensor:
    """What the agent reads: the stage's digits, then CTX, left-aligned and PAD-padded to ``[B, 6]``."""
    n_digits = torch.as_tensor(STAGE_NUM_DIGITS, device=stage.device)[stage].unsqueeze(1)
    position = torch.arange(6, device=digits.device).unsqueeze(0)
    padded = torch.nn.functional.pad(digits, (0, 1))
    tokens = torch.where(position < n_digits, padded, torch.full_like(padded, PAD))
    return torch.where(position == n_digits, torch.full_like(tokens, CTX), tokens)


def sample_problems(batch_size: int, stage_probs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random digits ``[B, 5]`` and stages ``[B]`` drawn from ``stage_probs`` ``[NUM_STAGES]``."""
    digits = torch.randint(0, NUM_DIGITS, (batch_size, 5), generator=generator)
    stage = torch.multinomial(stage_probs, batch_size, replacement=True, generator=generator)
    return digits, stage


def all_problems(stage: int) -> Tensor:
    """Every digit combination that matters for ``stage`` (unused digits set to 0), shape ``[10**n, 5]``."""
    n = STAGE_NUM_DIGITS[stage]
    grid = torch.cartesian_prod(*[torch.arange(NUM_DIGITS)] * n).reshape(-1, n)
    return torch.nn.functional.pad(grid, (0, 5 - n))
