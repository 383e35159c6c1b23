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
    # Arithmetic instead of selects: stages 1 and 2 subtract d, stage 2 times e, i.e. d * (1 + (e - 1)).
    subtracts_d = stage.clamp(max=1).to(digits.dtype)
    times_e = stage.to(digits.dtype) - subtracts_d
    return a * b + c - d * torch.addcmul(subtracts_d, times_e, e - 1)


def decode(tokens: list[int]) -> str:
    """Human-readable token sequence."""
    return " ".join(TOKEN_NAMES[t] for t in tokens)


@dataclass
class ToolEnvState:
    """Batched episode state; every field is a tensor with the batch as its first dimension.

    Numbers are int32 (every reachable value fits; the step's arithmetic is cheaper than in int64), flags bool.
    """

    digits: Tensor  # [B, 5] a..e (digits beyond the stage's context are ignored)
    stage: Tensor  # [B]
    goal: Tensor  # the stated goal, ``stage_goal(digits, stage)``
    acc: Tensor  # running value
    mem: Tensor  # memory register (seed semantics: 0 empty, 1 "ok", 2 "use_d")
    cursor: Tensor  # index of the next unused digit (register semantics)
    operands: Tensor  # register semantics: the unused digits packed for the step, 0 once the episode is over
    has_value: Tensor  # seed semantics: the running value is not None
    steps: Tensor  # tokens executed so far
    done: Tensor  # episode over
    answered: Tensor  # ended with ANS
    answer: Tensor  # the submitted value (0 without ANS)
    correct: Tensor  # ended with ANS on the stated goal


# --- the register semantics as table lookups -------------------------------------------------------------------
# An episode's unused digits are packed into one int32, 5 bits a digit (16 + digit, so that a 0 is still there), the
# digit under the cursor lowest, and a 1 above the last one; reading a digit shifts the int right by 5. Its lowest 5
# bits, the ``head``, are then 16 + the digit under the cursor, 1 once no digit is left, and 0 once the episode is over
# (shifting it right by 28 or more zeroes it). A token's effect depends only on (head, token), so a step looks its
# coefficients up in tables indexed ``head * VOCAB_SIZE + token`` and applies them to the whole batch in int32
# arithmetic, without branches, masks or selects (each of those costs several times an add on the CPU):
#     acc = acc * MULTIPLIER + RECALL * mem + ADDEND        mem = mem - RECALL * mem + FILE * acc
#     operands >>= SHIFT: 5 past a digit that was read (then bit 0 is set), 28 for EOS and 30 for ANS (bit 1 set:
#     the answer is submitted), both of which end the episode, 0 otherwise.
DIGIT_BITS = 5
OVER, NO_DIGIT, HAS_DIGIT = 0, 1, 16  # heads (HAS_DIGIT + digit while a digit is under the cursor)
MULTIPLIER, ADDEND, RECALL, FILE, SHIFT = range(5)
READ_SHIFT, EOS_SHIFT, ANS_SHIFT = DIGIT_BITS, 28, 30


def register_effect(head: int, token: int) -> list[int]:
    """The coefficients of ``token`` at ``head``, in the order MULTIPLIER .. SHIFT (the rules, one case at a time)."""
    effect = [1, 0, 0, 0, 0]  # by default a token changes nothing (also digits, CTX and PAD), and an ended episode
    if head == OVER:  # ignores every token
        return effect
    digit = head - HAS_DIGIT
    if token in (MUL, ADD, SUB) and head >= HAS_DIGIT:
        effect[SHIFT] = READ_SHIFT
        if token == MUL:
            effect[MULTIPLIER] = digit
        else:
            effect[MULTIPLIER], effect[FILE], effect[ADDEND] = 0, 1, digit if token == ADD else -digit
    elif token == STO:
        effect[MULTIPLIER], effect[FILE] = 0, 1
    elif token == RCL:
        effect[MULTIPLIER], effect[RECALL] = 0, 1
    elif token in (ANS, EOS):
        effect[SHIFT] = ANS_SHIFT if token == ANS else EOS_SHIFT
    return effect


def register_rules() -> Tensor:
    """Every head's and token's coefficients, ``[5, (HAS_DIGIT + NUM_DIGITS) * VOCAB_SIZE]`` int32 (see above)."""
    heads = range(HAS_DIGIT + NUM_DIGITS)
    table = torch.tensor([[register_effect(h, t) for t in range(VOCAB_SIZE)] for h in heads], dtype=torch.int32)
    return table.permute(2, 0, 1).flatten(1).contiguous()


def pack_operands(digits: Tensor, stage: Tensor) -> Tensor:
    """The operands of each problem (its stage's digits after the first), packed as described above, int32."""
    places = [1 << DIGIT_BITS * i for i in range(4)]
    packed = torch.full_like(stage, HAS_DIGIT * sum(places), dtype=torch.int32)
    for place, digit in zip(places, digits.unbind(1)[1:]):
        packed.add_(digit, alpha=place)
    ends = torch.tensor([1 << DIGIT_BITS * (n - 1) for n in STAGE_NUM_DIGITS], dtype=torch.int32, device=stage.device)
    end = ends.index_select(0, stage)
    return packed.bitwise_and_(end - 1).add_(end)  # the stage's operands, then the 1 above them


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
        self.rules = register_rules()

    @property
    def num_actions(self) -> int:
        return len(self.action_tokens)

    def reset(self, digits: Tensor, stage: Tensor) -> ToolEnvState:
        """Start one episode per row of ``digits`` ``[B, 5]`` (each in 0..9) at the given ``stage`` ``[B]``."""
        if digits.ndim != 2 or digits.shape[1] != 5:
            raise ValueError(f"digits must have shape [B, 5], got {tuple(digits.shape)}")
        if not _in_range(stage, NUM_STAGES):
            raise ValueError(f"stage must be in 0..{NUM_STAGES - 1}, got {stage.unique().tolist()}")
        if not _in_range(digits, NUM_DIGITS):
            raise ValueError(f"digits must be in 0..{NUM_DIGITS - 1}, got {digits.unique().tolist()}")
        digits = digits.to(torch.int32)

        def zeros(dtype: torch.dtype = torch.int32) -> Tensor:
            return torch.zeros(len(stage), dtype=dtype, device=stage.device)

        return ToolEnvState(
            digits=digits,
            stage=stage,
            goal=stage_goal(digits, stage),
            acc=digits[:, 0].clone() if self.semantics == "register" else zeros(),
            mem=zeros(),
            cursor=zeros().add_(1),
            operands=pack_operands(digits, stage),
            has_value=zeros(torch.bool),
            steps=zeros(),
            done=zeros(torch.bool),
            answered=zeros(torch.bool),
            answer=zeros(),
            correct=zeros(torch.bool),
        )

    def step(self, state: ToolEnvState, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Execute one token per episode (ignored where already done); returns ``(reward, done)`` as ``[B]``."""
        if self.semantics == "register":
            reward = self._step_register(state, tokens)
        else:
            reward = self._step_seed(state, tokens)
        return reward, state.done

    def _step_register(self, s: ToolEnvState, tokens: Tensor) -> Tensor:
        # In place where possible: fresh tensors each step would leave the cache cold (on a CPU, most of the cost).
        if self.rules.device != tokens.device:
            self.rules = self.rules.to(tokens.device)
        head = s.operands & 31
        key = torch.add(tokens, head, alpha=VOCAB_SIZE)
        multiplier, addend, recall, file, shift = (row.index_select(0, key) for row in self.rules)
        total = s.acc + s.mem
        new_acc_part = addend.addcmul_(recall, s.mem)  # RECALL * mem + ADDEND, from the old mem
        s.mem.sub_(recall.mul_(s.mem)).addcmul_(file, s.acc)  # from the old acc
        s.acc.mul_(multiplier).add_(new_acc_part)
        s.cursor.add_(shift & 1)
        s.steps.add_(head.clamp_(max=1))  # every token of a running episode counts
        in_time = s.steps.neg().add_(self.max_steps).clamp_(0, 1)
        s.operands.bitwise_right_shift_(shift).mul_(in_time)
        s.done = s.operands == 0
        submit = shift.bitwise_right_shift_(1).bitwise_and_(1)
        s.answer.addcmul_(submit, total)
        answers = submit.bool()
        correct = answers & (total == s.goal)
        s.answered = s.answered | answers
        s.correct = s.correct | correct
        return correct.view(torch.uint8).float()  # a bool tensor converts to float several times slower

    def _step_seed(self, s: ToolEnvState, tokens: Tensor) -> Tensor:
        active = ~s.done
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
        new_mem = torch.where(tokens == STO, (stage >= 1).int() + 1, s.mem)
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
        s.correct = s.correct | (answers & valid & (value == s.goal))
        s.steps = s.steps + active.int()
        s.done = s.done | answers | (active & (s.steps >= self.max_steps))
        return reward


def _in_range(values: Tensor, size: int) -> bool:
    """Whether every value is in ``0..size - 1`` (one pass over the tensor)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return 0 <= int(low) and int(high) < size


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
