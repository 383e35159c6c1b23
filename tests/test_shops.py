"""Text shops for the early-experience agent: rules, reward formula, expert, splits, invalid actions."""

import random

import pytest

from envs.text_env import run_episode
from envs.tiny_shop import TinyShopEnv, tiny_shop_goals
from envs.web_shop import (
    OUT_OF_DOMAIN_TYPES,
    Goal,
    Product,
    WebShopEnv,
    make_catalog,
    make_goals,
    purchase_reward,
)


def test_tiny_shop_success_means_preferred_colour_within_budget():
    env = TinyShopEnv("blue", budget=30)
    assert env.step("SELECT color=blue").error is None
    result = env.step("BUY")
    assert result.done and result.reward == 1.0
    env = TinyShopEnv("blue", budget=30)
    env.step("SELECT color=green")
    result = env.step("BUY")  # a purchase, but the wrong colour: the seed counted it as a success
    assert result.done and result.reward == 0.0


@pytest.mark.parametrize(
    "actions,error",
    [
        (["BUY"], "no_selection"),
        (["SELECT color=red", "BUY"], "over_budget"),
        (["SELECT color=purple"], "unknown_color"),
        (["SELECT colour blue"], "bad_select_format"),
        (["DANCE"], "unknown_action"),
    ],
)
def test_tiny_shop_invalid_actions_are_no_ops(actions, error):
    env = TinyShopEnv("blue", budget=30)
    for action in actions:
        result = env.step(action)
    assert result.error == error and not result.done
    assert f'"error": "{error}"' in result.observation
    assert env.bought is None


def test_tiny_shop_expert_solves_every_goal():
    for env in tiny_shop_goals(50, seed=0):
        assert run_episode(env, lambda e: e.expert_action())[3]
        assert env.expert_action() in env.candidate_actions() or env.done


def test_purchase_reward_formula():
    product = Product(
        "p1",
        "mug",
        "acme",
        ("ceramic", "handmade", "large handle"),
        {"color": ("red", "blue"), "capacity": ("12 oz", "16 oz")},
        20.0,
    )
    goal = Goal("p1", "mug", ("ceramic", "dishwasher safe"), (("capacity", "16 oz"), ("color", "red")), 25)
    # 1 of 2 attributes, 1 of 2 options, price ok: (1 + 1 + 1) / (2 + 2 + 1)
    assert purchase_reward(goal, product, {"color": "red", "capacity": "12 oz"}) == pytest.approx(3 / 5)
    cheap_goal = Goal("p1", "mug", ("ceramic", "handmade"), (("capacity", "16 oz"), ("color", "red")), 19)
    assert purchase_reward(cheap_goal, product, {"color": "red", "capacity": "16 oz"}) == pytest.approx(4 / 5)


@pytest.fixture(scope="module")
def catalog():
    return make_catalog()


def test_expert_reaches_reward_one_on_every_goal(catalog):
    for split, count in [("train", 200), ("held_out", 60), ("out_of_domain", 60)]:
        for goal in make_goals(catalog, split, count):
            reward, steps, invalid, success = run_episode(WebShopEnv(catalog, goal), lambda e: e.expert_action())
            assert success and reward == 1.0 and invalid == 0 and steps <= WebShopEnv.max_steps, (split, goal)


def test_expert_acts_on_the_page_only_and_backtracks_from_missing_options(catalog):
    action_of: dict[str, str] = {}
    backtracks = 0
    for goal in make_goals(catalog, "train", 200):
        env = WebShopEnv(catalog, goal)
        while env.page != "done":
            action = env.expert_action()
            # The same page always gets the same action: nothing hidden (e.g. an item's options) steers the expert.
            assert action_of.setdefault(env.observation(), action) == action
            if action == "click[< prev]":
                backtracks += 1
                missing = [v for g, v in goal.options if v not in env.item.options.get(g, ())]
                assert missing and all(f"click[{v}]" not in env.candidate_actions() for v in missing)
                item = env.item.id
                env.step(action)
                assert f"[{item}]" in env.observation() and "(visited)" in env.observation()
                continue
            env.step(action)
    assert backtracks > 0


def test_splits_are_disjoint_and_out_of_domain_types_are_unseen(catalog):
    train = make_goals(catalog, "train", 300)
    held_out = make_goals(catalog, "held_out", 80)
    ood = make_goals(catalog, "out_of_domain", 40)
    key = lambda g: (g.product_id, g.options)  # noqa: E731
    assert not {key(g) for g in train} & {key(g) for g in held_out}
    assert {g.type for g in ood} <= set(OUT_OF_DOMAIN_TYPES)
    assert not {g.type for g in train + held_out} & set(OUT_OF_DOMAIN_TYPES)
    assert make_goals(catalog, "train", 10) == train[:10]  # deterministic
    with pytest.raises(ValueError, match="unknown split"):
        make_goals(catalog, "test", 1)


def test_invalid_and_fuzzed_actions_never_crash_and_change_nothing(catalog):
    goal = make_goals(catalog, "train", 1)[0]
    env = WebShopEnv(catalog, goal)
    rng = random.Random(0)
    alphabet = "abc[]<> search click buy now p0001 \n{}\"'"
    for _ in range(300):
        action = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        page, selected = env.page, dict(env.selected)
        result = env.step(action)
        if result.error is not None:
            assert (env.page, env.selected) == (page, selected)
            assert "Error:" in result.observation
        if result.done:
            env.reset()
    env.reset()
    assert env.step("click[p0001]").error == "nothing to click on the search page: search first"
    assert env.step("buy").error.startswith("unknown action")


def test_copies_are_independent_and_candidates_contain_the_expert(catalog):
    goal = make_goals(catalog, "held_out", 1)[0]
    env = WebShopEnv(catalog, goal)
    while env.page != "done":
        assert env.expert_action() in env.candidate_actions()
        branch = env.copy()
        for action in branch.candidate_actions():
            branch.copy().step(action)
        branch.step(branch.candidate_actions()[-1])
        env.step(env.expert_action())
    assert env.reward == 1.0
