"""Per-sample, pure-Python reference of :mod:`envs.tool_env` (the same rules, one episode at a time).

It is the baseline of ``bench/tool_agent.py`` and the oracle the tests compare the vectorised environment with.
"""

from __future__ import annotations

from envs.tool_env import ADD, ANS, EOS, MUL, RCL, STAGE_NUM_DIGITS, STO, SUB, Semantics


def goal(digits: tuple[int, ...], stage: int) -> int:
    """The stated goal of one problem."""
    a, b, c, d, e = digits
    return [a * b + c, a * b + c - d, a * b + c - d * e][stage]


def run_episode(
    digits: tuple[int, ...], stage: int, tokens: list[int], semantics: Semantics = "register", max_steps: int = 8
) -> tuple[float, int, bool]:
    """Execute ``tokens`` on one problem; returns ``(reward, steps, correct)``."""
    if semantics == "register":
        return _run_register(digits, stage, tokens, max_steps)
    return _run_seed(digits, stage, tokens, max_steps)


def register_step(context: tuple, acc, mem, cursor: int, token: int):
    """One non-terminal token of the register semantics; returns ``(acc, mem, cursor)``.

    Works on any number type with ``+ - *`` (the solver passes polynomials to reason about every digit at once).
    """
    if token in (MUL, ADD, SUB) and cursor < len(context):
        digit, cursor = context[cursor], cursor + 1
        if token == MUL:
            acc = acc * digit
        else:
            mem, acc = mem + acc, digit if token == ADD else -digit
    elif token == STO:
        mem, acc = mem + acc, 0 * acc
    elif token == RCL:
        acc, mem = mem, 0 * mem
    return acc, mem, cursor


def _run_register(digits, stage, tokens, max_steps):
    context = digits[: STAGE_NUM_DIGITS[stage]]
    acc, mem, cursor = context[0], 0 * context[0], 1
    for steps, token in enumerate(tokens[:max_steps], start=1):
        if token == ANS:
            correct = mem + acc == goal(digits, stage)
            return float(correct), steps, correct
        if token == EOS:
            return 0.0, steps, False
        acc, mem, cursor = register_step(context, acc, mem, cursor, token)
    return 0.0, min(len(tokens), max_steps), False


def _run_seed(digits, stage, tokens, max_steps):
    a, b, c, d, e = digits
    value, mem, steps = None, None, 0
    goal0, goal1 = a * b, a * b + c
    goal2, goal3 = goal1 - d, d * e
    goal4 = goal1 - goal3
    for token in tokens:
        steps += 1
        if token == MUL:
            value = a * b if value is None else value * (d if stage > 0 else 1)
        elif token == ADD and value is not None:
            value += c
        elif token == SUB and value is not None:
            value -= e if stage == 2 and mem == "use_d" else (d if stage > 0 else 0)
        elif token == STO:
            mem = "use_d" if stage >= 1 else "ok"
        elif token == RCL and mem is not None:
            value = d * e if (stage == 2 and mem == "use_d") else (value if value else 0)
        elif token == ANS:
            checked = [goal0, goal1, goal2][stage]  # the seed's off-by-one target
            shaping = [
                0.25 * (value == goal0) + 0.5 * (value == goal1),
                0.25 * (value == goal0) + 0.5 * (value == goal1) + 0.75 * (value == goal2),
                0.2 * (value == goal0) + 0.4 * (value == goal1) + 0.6 * (value == goal4) + 0.6 * (value == goal3),
            ][stage]
            return float(value == checked) + 0.2 * shaping, steps, value == goal(digits, stage)
        if steps >= max_steps:
            break
    return 0.0, steps, False
