"""Exhaustive solvers for the tool environment.

``shortest_program`` searches the register semantics symbolically: the digits a..e are variables, registers hold
polynomials in them, and a program solves the stage for *every* digit combination exactly when the answer's
polynomial (``mem + acc``) equals the goal's. Breadth-first search over programs, merging programs that reach the
same symbolic state, returns a shortest such program; the tests then run it on all ``10**n`` combinations.

``shortest_solution_lengths`` searches concretely, any semantics, for a given set of problems at once: it expands every
program in order of length and marks each problem solved by the shortest program that answers its stated goal.
It proves, for example, that the seed's stage-2 goal is out of reach for most digits.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from envs.tool_env import ANS, EOS, NUM_STAGES, STAGE_NUM_DIGITS, TOOL_TOKENS, ToolEnv, ToolEnvState
from envs.tool_env_loop import goal, register_step


class Poly:
    """An integer polynomial in the digit variables, as ``{exponent tuple: coefficient}``."""

    def __init__(self, terms: dict[tuple[int, ...], int]) -> None:
        self.terms = {m: c for m, c in terms.items() if c != 0}

    @classmethod
    def variable(cls, index: int, n: int = 5) -> Poly:
        return cls({tuple(int(i == index) for i in range(n)): 1})

    def _coerce(self, other) -> Poly:
        if isinstance(other, Poly):
            return other
        return Poly({(0,) * 5: other})

    def __add__(self, other) -> Poly:
        total = Counter(self.terms)
        total.update(self._coerce(other).terms)
        return Poly(dict(total))

    __radd__ = __add__

    def __neg__(self) -> Poly:
        return Poly({m: -c for m, c in self.terms.items()})

    def __sub__(self, other) -> Poly:
        return self + (-self._coerce(other))

    def __mul__(self, other) -> Poly:
        out: Counter = Counter()
        for m1, c1 in self.terms.items():
            for m2, c2 in self._coerce(other).terms.items():
                out[tuple(x + y for x, y in zip(m1, m2, strict=True))] += c1 * c2
        return Poly(dict(out))

    __rmul__ = __mul__

    def key(self) -> tuple:
        return tuple(sorted(self.terms.items()))

    def __eq__(self, other) -> bool:
        return self.key() == self._coerce(other).key()

    def __hash__(self) -> int:
        return hash(self.key())


def shortest_program(stage: int, max_steps: int = 8) -> list[int] | None:
    """A shortest register-semantics program (tokens, ending in ANS) that solves ``stage`` for all digits."""
    if stage not in range(NUM_STAGES):
        raise ValueError(f"unknown stage {stage}")
    symbols = tuple(Poly.variable(i) for i in range(5))
    context = symbols[: STAGE_NUM_DIGITS[stage]]
    target = goal(symbols, stage)
    moves = [t for t in TOOL_TOKENS if t not in (ANS, EOS)]
    frontier = [([], (context[0], Poly({}), 1))]
    seen = {(context[0], Poly({}), 1)}
    for _ in range(max_steps):
        for program, (acc, mem, _) in frontier:
            if acc + mem == target:
                return program + [ANS]
        next_frontier = []
        for program, state in frontier:
            for move in moves:
                child = register_step(context, *state, move)
                if child not in seen:
                    seen.add(child)
                    next_frontier.append((program + [move], child))
        frontier = next_frontier
    return None


def _copy(state: ToolEnvState) -> ToolEnvState:
    return ToolEnvState(**{k: v.clone() for k, v in vars(state).items()})


def _key(state: ToolEnvState) -> bytes:
    return torch.stack([state.acc, state.mem, state.cursor, state.has_value.int(), state.done.int()]).numpy().tobytes()


def shortest_solution_lengths(digits: Tensor, stage: int, semantics: str = "register", max_steps: int = 8) -> Tensor:
    """For each problem row of ``digits``: the shortest solving program's length, ``-1`` if none fits."""
    env = ToolEnv(semantics, max_steps)
    stages = torch.full((len(digits),), stage)
    moves = [int(t) for t in env.action_tokens if int(t) not in (ANS, EOS)]
    best = torch.full((len(digits),), -1)
    root = env.reset(digits, stages)
    frontier, seen = [root], {_key(root)}
    for length in range(max_steps):  # programs of ``length`` moves followed by ANS
        for state in frontier:
            answered = _copy(state)
            env.step(answered, torch.full_like(stages, ANS))
            best[answered.correct & (best < 0)] = length + 1
        if (best >= 0).all():
            break
        next_frontier = []
        for state in frontier:
            for move in moves:
                child = _copy(state)
                env.step(child, torch.full_like(stages, move))
                if (key := _key(child)) not in seen:
                    seen.add(key)
                    next_frontier.append(child)
        frontier = next_frontier
    return best
