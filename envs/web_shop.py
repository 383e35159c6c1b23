"""A procedurally generated, WebShop-like shop (Yao et al., 2022), small enough to run anywhere.

A catalog of products, each with a type, attributes (words from its type's vocabulary), option groups (e.g.
colour, size) and a price. A goal is an instruction naming a type, two attributes, one value per option group and
a price cap. Pages and actions:

* search page: ``search[<query>]`` (any text) lists the products that best match the query words;
* results page: ``click[<product id>]`` opens an item, ``click[back to search]`` returns; products opened
  earlier in the episode are marked ``(visited)``, as a browser marks visited links;
* item page: ``click[<option value>]`` selects an option, ``click[buy now]`` ends the episode, ``click[< prev]``
  returns to the results.

Reward at purchase (WebShop's formula without its text-matching terms):
``r = (goal attributes the product has + option groups selected as asked + [price <= cap]) / (2 + groups + 1)``;
success is ``r == 1``. Attribute vocabularies are disjoint across types, so a product of the wrong type scores
only on price. Invalid actions are no-ops with the error in the observation.

The scripted expert acts on what the page shows, as a person would: on the results page it opens the first
unvisited product whose title and price fit the goal, and on the item page it goes back when a requested option
is not offered (options are shown on the item page only). So every expert action is a function of the
observation, and the expert's own data shows how to recover from a product that turns out not to fit.

Splits: ``train`` and ``held_out`` goals are disjoint (no shared product-and-options combination) and come from
the in-domain types; ``out_of_domain`` goals use product types never seen in the other splits.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from typing import Literal

from envs.text_env import StepResult, TextEnv, expert_succeeds_within

COLORS = ["black", "white", "red", "blue", "green", "grey"]
PRODUCT_TYPES: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "t-shirt": (
        ["cotton", "slim fit", "v-neck", "organic", "long sleeve"],
        {"color": COLORS, "size": ["small", "medium", "large"]},
    ),
    "mug": (
        ["ceramic", "dishwasher safe", "handmade", "large handle"],
        {"color": COLORS, "capacity": ["12 oz", "16 oz"]},
    ),
    "backpack": (
        ["waterproof", "laptop sleeve", "lightweight", "padded straps"],
        {"color": COLORS, "volume": ["20 l", "30 l"]},
    ),
    "headphones": (["wireless", "noise cancelling", "over-ear", "bass boost"], {"color": COLORS}),
    "sneakers": (
        ["running", "breathable", "leather", "memory foam"],
        {"color": COLORS, "size": ["8", "9", "10", "11"]},
    ),
    "desk lamp": (["led", "dimmable", "usb charging", "adjustable arm"], {"color": COLORS}),
    "water bottle": (
        ["stainless steel", "bpa free", "leak proof", "insulated"],
        {"color": COLORS, "capacity": ["500 ml", "750 ml", "1 l"]},
    ),
    "phone case": (["shockproof", "slim", "magnetic", "transparent"], {"color": COLORS, "model": ["x1", "x2", "x3"]}),
    "yoga mat": (
        ["non-slip", "eco friendly", "extra thick", "foldable"],
        {"color": COLORS, "length": ["68 in", "72 in"]},
    ),
    "umbrella": (["windproof", "compact", "automatic", "uv protection"], {"color": COLORS}),
}
OUT_OF_DOMAIN_TYPES = ("yoga mat", "umbrella")
BRANDS = ["acme", "northwind", "globex", "initech", "umbra", "vertex"]
RESULTS_PER_PAGE = 5
Split = Literal["train", "held_out", "out_of_domain"]
ACTION = re.compile(r"^(search|click)\[(.*)\]$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Product:
    id: str
    type: str
    brand: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]] = field(hash=False)
    price: float

    @property
    def title(self) -> str:
        return f"{self.brand} {' '.join(self.attributes)} {self.type}"

    def words(self) -> set[str]:
        return set(self.title.split())


@dataclass(frozen=True)
class Goal:
    product_id: str
    type: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, str], ...]  # (group, value)
    price_cap: int

    @property
    def instruction(self) -> str:
        options = ", ".join(f"{group}: {value}" for group, value in self.options)
        return (
            f"i need a {' and '.join(self.attributes)} {self.type} with {options}, "
            f"and price lower than {self.price_cap} dollars"
        )

    @property
    def query(self) -> str:
        return f"{' '.join(self.attributes)} {self.type}"


def make_catalog(products_per_type: int = 12, seed: int = 0) -> dict[str, Product]:
    """A deterministic catalog: every type gets ``products_per_type`` products."""
    rng = random.Random(seed)
    catalog = {}
    for type_name, (vocabulary, groups) in PRODUCT_TYPES.items():
        for _ in range(products_per_type):
            attributes = tuple(sorted(rng.sample(vocabulary, 3)))
            options = {g: tuple(sorted(rng.sample(values, max(2, len(values) - 1)))) for g, values in groups.items()}
            product_id = f"p{len(catalog):04d}"
            catalog[product_id] = Product(
                product_id, type_name, rng.choice(BRANDS), attributes, options, round(rng.uniform(8, 90), 2)
            )
    return catalog


def search(catalog: dict[str, Product], query: str) -> list[Product]:
    """Products ranked by the number of query words in their title (ties by id), best first."""
    words = set(query.lower().split())
    scored = [(-len(words & p.words()), p.id, p) for p in catalog.values()]
    return [p for score, _, p in sorted(scored) if score < 0]


def purchase_reward(goal: Goal, product: Product, selected: dict[str, str]) -> float:
    """WebShop's reward: matched attributes, options and price over their count."""
    attributes = sum(a in product.attributes for a in goal.attributes)
    options = sum(selected.get(group) == value for group, value in goal.options)
    price = float(product.price <= goal.price_cap)
    return (attributes + options + price) / (len(goal.attributes) + len(goal.options) + 1)


class WebShopEnv(TextEnv):
    """One goal in the shared catalog; pages ``search``, ``results``, ``item``, ``done``."""

    max_steps = 10

    def __init__(self, catalog: dict[str, Product], goal: Goal) -> None:
        self.catalog, self.goal = catalog, goal
        self.reset()

    def copy(self) -> WebShopEnv:  # the catalog is shared and never changes
        clone = WebShopEnv.__new__(WebShopEnv)
        clone.__dict__ = {
            **self.__dict__,
            "selected": dict(self.selected),
            "results": list(self.results),
            "visited": set(self.visited),
        }
        return clone

    def reset(self) -> str:
        self.page, self.query, self.results = "search", "", []
        self.item: Product | None = None
        self.selected: dict[str, str] = {}
        self.visited: set[str] = set()
        self.last_error: str | None = None
        self.reward = 0.0
        return self.observation()

    # --- acting -----------------------------------------------------------------------------------------------
    def step(self, action: str) -> StepResult:
        self.last_error = self._apply(action.strip())
        done = self.page == "done"
        return StepResult(self.observation(), self.reward if done else 0.0, done, self.last_error)

    def _apply(self, action: str) -> str | None:
        if self.page == "done":
            return "the episode is over"
        match = ACTION.match(action)
        if match is None:
            return f"unknown action {action[:60]!r}: use search[...] or click[...]"
        verb, argument = match.group(1).lower(), match.group(2).strip().lower()
        if verb == "search":
            if self.page != "search":
                return "search is only available on the search page"
            if not argument:
                return "empty search"
            self.page, self.query, self.results = "results", argument, search(self.catalog, argument)
            return None
        return self._click(argument)

    def _click(self, target: str) -> str | None:
        if self.page == "search":
            return "nothing to click on the search page: search first"
        if self.page == "results":
            if target == "back to search":
                self.page, self.results = "search", []
                return None
            shown = {p.id: p for p in self.results[:RESULTS_PER_PAGE]}
            if target not in shown:
                return f"no product {target!r} on this page"
            self.page, self.item, self.selected = "item", shown[target], {}
            self.visited.add(target)
            return None
        if target == "< prev":
            self.page, self.item = "results", None
            return None
        if target == "buy now":
            self.reward = purchase_reward(self.goal, self.item, self.selected)
            self.page = "done"
            return None
        for group, values in self.item.options.items():
            if target in values:
                self.selected[group] = target
                return None
        return f"no option {target!r} on this item"

    # --- what the agent sees ----------------------------------------------------------------------------------
    def observation(self) -> str:
        lines = [f"Instruction: {self.goal.instruction}", f"Page: {self.page}"]
        if self.page == "results":
            lines.append(f"Results for '{self.query}':")
            shown = self.results[:RESULTS_PER_PAGE]
            lines += [
                f"[{p.id}] {p.title} ${p.price:.2f}" + (" (visited)" if p.id in self.visited else "") for p in shown
            ] or ["(none)"]
        elif self.page == "item":
            item = self.item
            lines += [
                f"[{item.id}] {item.title}",
                f"Price: ${item.price:.2f}",
                f"Features: {', '.join(item.attributes)}",
            ]
            lines += [f"{group}: {' | '.join(values)}" for group, values in item.options.items()]
            chosen = ", ".join(f"{g}={v}" for g, v in self.selected.items()) or "none"
            lines.append(f"Selected: {chosen}")
        elif self.page == "done":
            lines.append(f"Bought {self.item.id}; reward {self.reward:.2f}")
        if self.last_error:
            lines.append(f"Error: {self.last_error}")
        return "\n".join(lines)

    def candidate_actions(self) -> list[str]:
        """The clickable elements of the page; on the search page, the goal's query and other products' queries."""
        if self.page == "search":
            rng = random.Random(_stable_hash(self.goal))
            # Distractor queries from the goal's own domain, so in-domain data never shows out-of-domain products.
            in_domain = self.goal.type not in OUT_OF_DOMAIN_TYPES
            queries = {
                f"{' '.join(p.attributes[:2])} {p.type}"
                for p in self.catalog.values()
                if (p.type not in OUT_OF_DOMAIN_TYPES) == in_domain
            }
            others = sorted(queries - {self.goal.query})
            queries = rng.sample(others, 3) + [self.goal.query]
            rng.shuffle(queries)
            return [f"search[{q}]" for q in queries]
        if self.page == "results":
            return [f"click[{p.id}]" for p in self.results[:RESULTS_PER_PAGE]] + ["click[back to search]"]
        if self.page == "item":
            values = [v for values in self.item.options.values() for v in values]
            return [f"click[{v}]" for v in values] + ["click[buy now]", "click[< prev]"]
        return []

    def _listing_fits(self, product: Product) -> bool:
        """What the results page shows fits the goal: type, attributes (in the title) and price."""
        goal = self.goal
        return (
            product.type == goal.type
            and set(goal.attributes) <= set(product.attributes)
            and (product.price <= goal.price_cap)
        )

    def _options_offered(self, product: Product) -> bool:
        return all(value in product.options.get(group, ()) for group, value in self.goal.options)

    def expert_action(self) -> str:
        """The next action of a demonstrator who sees only the current page (see the module docstring)."""
        if self.page == "search":
            return f"search[{self.goal.query}]"
        if self.page == "results":
            for product in self.results[:RESULTS_PER_PAGE]:
                if product.id not in self.visited and self._listing_fits(product):
                    return f"click[{product.id}]"
            return "click[back to search]"
        if self.page == "item":
            if not (self._listing_fits(self.item) and self._options_offered(self.item)):
                return "click[< prev]"
            for group, value in self.goal.options:
                if self.selected.get(group) != value:
                    return f"click[{value}]"
            return "click[buy now]"
        return "click[buy now]"


def _goal_for(product: Product, rng: random.Random) -> Goal:
    attributes = tuple(sorted(rng.sample(product.attributes, 2)))
    options = tuple((group, rng.choice(values)) for group, values in sorted(product.options.items()))
    cap = math.ceil(product.price * rng.uniform(1.1, 1.6))
    return Goal(product.id, product.type, attributes, options, cap)


def _stable_hash(value: object) -> int:
    return int(hashlib.sha256(repr(value).encode()).hexdigest()[:12], 16)


def make_goals(catalog: dict[str, Product], split: Split, count: int, seed: int = 0) -> list[Goal]:
    """``count`` goals of ``split``, each reachable by the expert.

    In-domain goals go to ``held_out`` when a stable hash of (product, options) falls in the first fifth, else to
    ``train``, so the two splits never share a product-and-options combination whatever their sizes. Within a
    split, goals differ (a combination can come back with other attributes or another price cap).
    """
    if split not in ("train", "held_out", "out_of_domain"):
        raise ValueError(f"unknown split {split!r}; expected train, held_out or out_of_domain")
    in_domain = split != "out_of_domain"
    products = sorted(
        (p for p in catalog.values() if (p.type not in OUT_OF_DOMAIN_TYPES) == in_domain), key=lambda p: p.id
    )
    rng = random.Random(f"{seed}-{split}")
    goals, seen = [], set()
    for _ in range(1000 * count):
        if len(goals) == count:
            return goals
        goal = _goal_for(rng.choice(products), rng)
        held_out = _stable_hash((goal.product_id, goal.options)) % 5 == 0
        if goal in seen or (in_domain and held_out != (split == "held_out")):
            continue
        if not expert_succeeds_within(WebShopEnv(catalog, goal), WebShopEnv.max_steps):
            continue
        seen.add(goal)
        goals.append(goal)
    raise ValueError(f"could only make {len(goals)} distinct {split} goals of the {count} asked; use a larger catalog")
