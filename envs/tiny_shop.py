"""The tiny shop of the early-experience seed, corrected.

One product in three colours, a budget and a preferred colour. Actions: ``SELECT color=<c>`` and ``BUY``.
Success (reward 1) means buying the **preferred colour within the budget**; buying anything else ends the
episode with reward 0 (the seed counted any purchase as a success). Invalid actions are no-ops that put an error
in the observation: ``unknown_action``, ``unknown_color``, ``bad_select_format``, ``no_selection``,
``over_budget``, ``episode_done``.
"""

from __future__ import annotations

import json
import random
import re

from envs.text_env import StepResult, TextEnv

CATALOG = {"red": 35, "blue": 25, "green": 20}
SELECT = re.compile(r"^SELECT\s+color\s*=\s*(\S+)$", re.IGNORECASE)


class TinyShopEnv(TextEnv):
    """Buy the preferred colour without going over the budget."""

    max_steps = 4

    def __init__(self, want_color: str = "blue", budget: int = 30, catalog: dict[str, int] | None = None) -> None:
        self.catalog = dict(catalog or CATALOG)
        if want_color not in self.catalog:
            raise ValueError(f"want_color {want_color!r} is not in the catalog {sorted(self.catalog)}")
        self.want_color, self.budget = want_color, budget
        self.reset()

    def reset(self) -> str:
        self.selected: str | None = None
        self.bought: str | None = None
        self.done = False
        self.last_error: str | None = None
        return self.observation()

    def observation(self) -> str:
        price = self.catalog.get(self.selected) if self.selected else None
        return json.dumps(
            {
                "view": "done" if self.done else "product_page",
                "catalog": self.catalog,
                "cart": {"color": self.selected, "price": price},
                "budget": self.budget,
                "preference": self.want_color,
                "bought": self.bought,
                "error": self.last_error,
            }
        )

    def step(self, action: str) -> StepResult:
        error, reward = self._apply(action.strip()), 0.0
        if self.bought is not None:
            reward = float(self.bought == self.want_color and self.catalog[self.bought] <= self.budget)
        self.last_error = error
        return StepResult(self.observation(), reward if self.done else 0.0, self.done, error)

    def _apply(self, action: str) -> str | None:
        if self.done:
            return "episode_done"
        if action.upper() == "BUY":
            if self.selected is None:
                return "no_selection"
            if self.catalog[self.selected] > self.budget:
                return "over_budget"
            self.bought, self.done = self.selected, True
            return None
        if action.upper().startswith("SELECT"):
            match = SELECT.match(action)
            if match is None:
                return "bad_select_format"
            color = match.group(1).lower()
            if color not in self.catalog:
                return "unknown_color"
            self.selected = color
            return None
        return "unknown_action"

    def candidate_actions(self) -> list[str]:
        return [f"SELECT color={c}" for c in self.catalog] + ["BUY"]

    def expert_action(self) -> str:
        return "BUY" if self.selected == self.want_color else f"SELECT color={self.want_color}"


def tiny_shop_goals(count: int, seed: int) -> list[TinyShopEnv]:
    """``count`` shops with a random preferred colour and a budget that affords it (20..40)."""
    rng = random.Random(seed)
    goals = []
    while len(goals) < count:
        color, budget = rng.choice(sorted(CATALOG)), rng.randint(20, 40)
        if CATALOG[color] <= budget:
            goals.append(TinyShopEnv(color, budget))
    return goals
