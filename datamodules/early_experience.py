"""Early-experience data: expert trajectories branched with K alternative actions, and the training examples
built from them for imitation (IL), implicit world modelling (IWM) and self-reflection (SR).

From every expert state the expert action and K other candidate actions are executed for one step, each in its own
copy of the environment, and the next observations are recorded (Zhang et al., 2025, "Agent Learning via Early
Experience"). Each example is a (prompt, completion) pair and the loss is taken on the completion only:

* IL:  ``<observation>\\nAction:`` -> the expert action
* IWM: ``[predict] <observation>\\n[action] <action>\\n[next]\\n`` -> the next observation (a prompt format of its own,
  so the policy never learns to write observations where an action belongs)
* SR:  ``<observation>\\nReflect, then act:`` -> a rationale comparing the observed outcomes of the expert action and
  the alternatives, then ``Action: <expert action>``
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from datamodules.distributed import Chunks, evaluation_loader, per_device_batch
from envs.text_env import TextEnv, expert_succeeds_within
from envs.tiny_shop import tiny_shop_goals
from envs.web_shop import WebShopEnv, make_catalog, make_goals
from models.action_scorer import encode_candidates
from models.lm_factory import build_tokenizer, load_tokenizer
from models.lm_text import check_sequence_settings, encode_prompts, lm_batch

POLICY_SUFFIX = "\nAction:"
TINY_HELD_OUT_OFFSET = 10_007  # the tiny shop's held-out goals are drawn with the seed plus this
REFLECT_SUFFIX = "\nReflect, then act:"


@dataclass
class Branch:
    """One expert state, its expert transition and K alternative transitions."""

    observation: str
    expert_action: str
    expert_next: str
    alternatives: list[tuple[str, str]]  # (action, next observation)


Scorer = Callable[[list[str], list[list[str]]], list[torch.Tensor]]
"""A policy's scores: ``scorer(prompts, candidates)`` gives one ``[K_i]`` tensor of scores per prompt."""


def policy_prompt(observation: str) -> str:
    return observation + POLICY_SUFFIX


def world_model_prompt(observation: str, action: str) -> str:
    return f"[predict] {observation}\n[action] {action}\n[next]\n"


def collect_branches(env: TextEnv, k: int, rng: random.Random, detour_prob: float = 0.0) -> list[Branch]:
    """Follow the expert through ``env`` from its start; at every state branch ``k`` other candidate actions.

    With probability ``detour_prob`` per state the demonstrator then takes one of those alternatives instead of the
    expert action, provided the expert still succeeds from there within the step budget, and the expert carries on
    from the new state. An expert demonstration never visits a wrong item page, so without detours the policy
    never sees how to leave one (noise-injected demonstrations, as in DART, Laskey et al., 2017). The detour
    action itself is never a training target: every branch keeps the expert action of its state.
    """
    observation, branches = env.reset(), []
    for step in range(env.max_steps):
        expert = env.expert_action()
        others = [a for a in env.candidate_actions() if a != expert]
        tried = []
        for action in rng.sample(others, min(k, len(others))):
            clone = env.copy()
            tried.append((action, clone, clone.step(action)))
        result = env.step(expert)
        branches.append(Branch(observation, expert, result.observation, [(a, r.observation) for a, _, r in tried]))
        if detour_prob and not result.done and rng.random() < detour_prob:
            budget = env.max_steps - step - 2  # steps left once the detour is taken
            recoverable = [(c, r) for _, c, r in tried if not r.done and expert_succeeds_within(c, budget)]
            if recoverable:
                env, result = rng.choice(recoverable)
        observation = result.observation
        if result.done:
            break
    return branches


def policy_branches(envs: list[TextEnv], k: int, scorer: Scorer, rng: random.Random,
                    alternatives: Literal["random", "policy_top_k"] = "policy_top_k",
                    states: Literal["expert", "policy"] = "expert") -> list[Branch]:
    """:func:`collect_branches` with a policy, for many environments played together (one ``scorer`` call per
    step for all of them): the ``k`` alternatives of a state are drawn at random or are the policy's ``k``
    best-scoring non-expert candidates (``policy_top_k``), and the states are those the expert visits or those the
    policy itself visits (``policy``: its greedy action moves on; every branch still records the expert action of
    its state and where it leads). Branches come environment by environment, in step order."""
    for env in envs:
        env.reset()
    found: list[list[Branch]] = [[] for _ in envs]
    active = list(range(len(envs)))
    for _ in range(max((env.max_steps for env in envs), default=0)):
        if not active:
            break
        candidates = [envs[i].candidate_actions() for i in active]
        scores = scorer([policy_prompt(envs[i].observation()) for i in active], candidates)
        still = []
        for i, cands, score in zip(active, candidates, scores):
            env, expert = envs[i], envs[i].expert_action()
            ranked = [cands[j] for j in torch.argsort(score.float().cpu(), descending=True, stable=True).tolist()]
            others = [a for a in ranked if a != expert]
            chosen = others[:k] if alternatives == "policy_top_k" else rng.sample(others, min(k, len(others)))
            expert_next = env.copy().step(expert).observation
            found[i].append(Branch(env.observation(), expert, expert_next,
                                   [(a, env.copy().step(a).observation) for a in chosen]))
            result = env.step(ranked[0] if states == "policy" else expert)
            if not result.done and len(found[i]) < env.max_steps:
                still.append(i)
        active = still
    return [b for branches in found for b in branches]


def observation_delta(before: str, after: str) -> str:
    """What changed between two observations, in a few words: the changed fields when both are JSON objects, else
    the new text lines. Never raises on odd input (JSON too deeply nested, numbers too long for ``json``, values
    that cannot be compared): such observations are compared as text."""
    try:
        old, new = json.loads(before), json.loads(after)
        changes = [f"{key}={json.dumps(value)}" for key, value in new.items() if old.get(key) != value]
    except (ValueError, RecursionError, AttributeError, TypeError):  # JSONDecodeError is a ValueError
        old_lines = set(before.splitlines())
        changes = [line for line in after.splitlines() if line not in old_lines]
    return "; ".join(changes[:3]) if changes else "nothing changed"


def template_rationale(branch: Branch) -> str:
    """A rationale grounded in the observed next states: what each action did, then the conclusion."""
    outcomes = [f"{action} -> {observation_delta(branch.observation, nxt)}" for action, nxt in branch.alternatives]
    outcomes.append(f"{branch.expert_action} -> {observation_delta(branch.observation, branch.expert_next)}")
    return "Outcomes: " + " | ".join(outcomes) + f". Best: {branch.expert_action}."


def reflection_request(branch: Branch) -> str:
    """The prompt from which the policy writes its own rationale: the state, what every tried action did, and the
    expert's choice to justify (the paper's self-reflection prompt, in this project's text format)."""
    tried = [*branch.alternatives, (branch.expert_action, branch.expert_next)]
    outcomes = "\n".join(f"{a} -> {observation_delta(branch.observation, nxt)}" for a, nxt in tried)
    return (
        f"{branch.observation}\nTried actions and what they did:\n{outcomes}\n"
        f"The expert chose {branch.expert_action}. Explain why it beats the others; end with 'Best: <action>.'\n"
        "Rationale:"
    )


def rationale_concludes_for(rationale: str, action: str) -> bool:
    """True when the rationale's conclusion names ``action`` (used to drop rationales that argue for another)."""
    conclusion = rationale.rsplit("Best:", 1)[-1]
    return action in conclusion


def il_examples(branches: list[Branch]) -> list[tuple[str, str]]:
    return [(policy_prompt(b.observation), b.expert_action) for b in branches]


def iwm_examples(branches: list[Branch]) -> list[tuple[str, str]]:
    transitions = []
    for b in branches:
        transitions.append((world_model_prompt(b.observation, b.expert_action), b.expert_next))
        transitions += [(world_model_prompt(b.observation, a), nxt) for a, nxt in b.alternatives]
    return transitions


def alternative_examples(branches: list[Branch]) -> list[tuple[str, str]]:
    """IWM examples of the alternatives only: what the K non-expert actions led to, without the expert's step."""
    return [(world_model_prompt(b.observation, a), nxt) for b in branches for a, nxt in b.alternatives]


def sr_examples(branches: list[Branch], rationale_fn=template_rationale) -> list[tuple[str, str]]:
    examples = []
    for b in branches:
        rationale = rationale_fn(b)
        if rationale_concludes_for(rationale, b.expert_action):
            examples.append((b.observation + REFLECT_SUFFIX, f"{rationale}\nAction: {b.expert_action}"))
    return examples


# --- the DataModule -------------------------------------------------------------------------------------------
class ExperienceStream(IterableDataset):
    """Training batches indexed by optimisation step, so a resumed run sees what the uninterrupted one would."""

    def __init__(self, datamodule: EarlyExperienceDataModule, batch_size: int, rank: int, start_step: int) -> None:
        self.datamodule, self.batch_size, self.rank, self.start_step = datamodule, batch_size, rank, start_step

    def __iter__(self):
        dm = self.datamodule
        step = self.start_step
        while True:
            rng = random.Random(f"{dm.hparams.seed}-{self.rank}-{step}")
            pool = dm.pool_for_step(step)
            yield dm.collate([pool[rng.randrange(len(pool))] for _ in range(self.batch_size)], dm.hparams.packing)
            step += 1


class EarlyExperienceDataModule(LightningDataModule):
    """Expert rollouts branched with K alternatives in a text shop, served as IL / IWM / SR training batches, and
    evaluation episodes on train, held-out and out-of-domain goals.

    Recipes: ``il`` (expert actions only), ``iwm_then_il`` (the first ``iwm_steps`` updates predict next
    observations, the rest imitate: the same total budget as ``il``), ``sr`` (self-reflection examples mixed with
    expert actions, ``sr_fraction`` of each batch).

    By default the K alternatives are drawn at random at the expert's states; ``alternatives: policy_top_k`` and
    ``branch_states: policy`` branch with the policy instead (its K best non-expert actions; the states its own
    rollout visits), collected by the agent before its first update (``needs_policy``, ``collect_with_policy``).
    """

    def __init__(
        self,
        env: Literal["tiny_shop", "web_shop"] = "web_shop",
        recipe: Literal["il", "iwm_then_il", "sr"] = "il",
        branches: int = 3,
        alternatives: Literal["random", "policy_top_k"] = "random",
        branch_states: Literal["expert", "policy"] = "expert",
        detour_prob: float = 0.0,
        train_goals: int = 1000,
        experience_goals: int | None = None,
        eval_goals: int = 50,
        separate_test_goals: bool = False,
        iwm_steps: int = 200,
        sr_fraction: float = 0.5,
        rationale_source: Literal["template", "policy"] = "template",
        rationale_tokens: int = 64,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        tokenizer: str | None = None,
        vocab_size: int = 1024,
        split_digits: bool = True,
        tokenizer_cache: str | None = None,
        seed: int = 0,
        max_seq_length: int | None = None,
        packing: bool = False,
    ) -> None:
        """
        Args:
            env: ``tiny_shop`` (the seed's shop, corrected) or ``web_shop`` (procedural WebShop-like shop).
            recipe: ``il``, ``iwm_then_il`` or ``sr``.
            branches: K, alternative actions executed from every branching state.
            alternatives: How the K alternatives are chosen: ``random`` among the other candidates, or
                ``policy_top_k``, the K non-expert candidates the policy scores highest (see :func:`policy_branches`).
            branch_states: Where branching happens: the ``expert``'s states, or the states the ``policy`` visits in
                its own greedy rollout of each training goal (the label stays the expert's action there). With a
                policy option the branches are collected by the policy being trained, once, before its first update
                (start it from a trained policy with ``init_from``), and travel with checkpoints.
            detour_prob: Chance per state that the demonstrator takes one of the K alternatives and the expert
                recovers from there (see :func:`collect_branches`); 0 gives pure expert trajectories.
            train_goals: Goals whose expert rollouts make the training data (the expert data: IL, and SR, whose
                rationales conclude for the expert action).
            experience_goals: Goals whose expert states are branched for the IWM examples (``null``: the
                ``train_goals``), so the early-experience data can grow while the expert data stays fixed. Past
                the first ``train_goals`` goals IWM keeps only the K alternatives' transitions: no expert action
                is trained on there.
            eval_goals: Goals per evaluation split (train, held_out, out_of_domain; the tiny shop has no
                out-of-domain split).
            separate_test_goals: Test plays the next ``eval_goals`` goals of the held-out and out-of-domain
                splits instead of the validation goals, so a choice made on validation is judged on unseen goals
                (the ``train`` split is the same).
            iwm_steps: Updates spent on IWM before imitation (``iwm_then_il``).
            sr_fraction: Share of SR examples in each batch (``sr``).
            rationale_source: ``template`` (built from the observed outcomes) or ``policy`` (written by the
                policy itself before its first update from :func:`reflection_request`; rationales that conclude for
                another action are dropped).
            rationale_tokens: Length limit of a policy-written rationale.
            batch_size: Examples per update, summed over all devices.
            eval_batch_size: Evaluation episodes run together (their actions are scored in one batch).
            tokenizer: A hub name or local folder; ``null`` trains a BPE tokenizer on the training rollouts (cached).
            vocab_size: Size of the trained tokenizer.
            split_digits: The trained tokenizer gives every digit its own token, so prices compare digit by digit.
            tokenizer_cache: Folder of cached tokenizers (``null``: the user cache).
            seed: Seed of the goals, the branching and the batch sampling.
            max_seq_length: Longest training example in tokens: a longer prompt (observation) loses its start, the
                completion is kept (``null``: no cap).
            packing: Training batches put several examples in one row, each attending only to itself (rows of
                ``max_seq_length`` tokens, or of the batch's longest example).
        """
        super().__init__()
        if env not in ("tiny_shop", "web_shop"):
            raise ValueError(f"unknown env {env!r}; expected tiny_shop or web_shop")
        if recipe not in ("il", "iwm_then_il", "sr"):
            raise ValueError(f"unknown recipe {recipe!r}; expected il, iwm_then_il or sr")
        if min(branches, train_goals, eval_goals, batch_size, eval_batch_size) < 1 or iwm_steps < 0:
            raise ValueError("branches, goals and batch sizes must be >= 1, iwm_steps >= 0")
        if experience_goals is not None and experience_goals < train_goals:
            raise ValueError(f"experience_goals ({experience_goals}) must be >= train_goals ({train_goals})")
        if experience_goals is not None and (alternatives, branch_states) != ("random", "expert"):
            raise ValueError("experience_goals applies to random alternatives at expert states only")
        if not 0.0 <= detour_prob < 1.0:
            raise ValueError(f"detour_prob must be in [0, 1), got {detour_prob}")
        if alternatives not in ("random", "policy_top_k") or branch_states not in ("expert", "policy"):
            raise ValueError(f"alternatives must be random or policy_top_k, branch_states expert or policy (got "
                             f"{alternatives!r}, {branch_states!r})")
        if detour_prob and (alternatives, branch_states) != ("random", "expert"):
            raise ValueError("detour_prob applies to random alternatives at expert states only")
        if not 0.0 <= sr_fraction <= 1.0:
            raise ValueError(f"sr_fraction must be in [0, 1], got {sr_fraction}")
        if rationale_source not in ("template", "policy"):
            raise ValueError(f"unknown rationale_source {rationale_source!r}; expected template or policy")
        if rationale_tokens < 1:
            raise ValueError(f"rationale_tokens must be >= 1, got {rationale_tokens}")
        check_sequence_settings(max_seq_length)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self._build()

    def _build(self) -> None:
        hp = self.hparams
        pool_size = max(hp.train_goals, hp.experience_goals or 0)
        self.eval_envs = make_envs(hp.env, pool_size, hp.eval_goals, hp.seed, eval_train_goals=hp.train_goals)
        self.test_envs = (next_eval_envs(self.eval_envs, hp.env, hp.eval_goals, hp.seed) if hp.separate_test_goals
                          else self.eval_envs)
        pool = self.eval_envs.pop("_train_pool")
        self.train_envs, self.experience_envs = pool[: hp.train_goals], pool[hp.train_goals :]
        # The expert goals are branched first, so their branches are the same whatever experience_goals is.
        rng = random.Random(hp.seed)
        self.branches = [b for env in self.train_envs for b in collect_branches(env, hp.branches, rng, hp.detour_prob)]
        self.experience_branches = [b for env in self.experience_envs for b in collect_branches(env, hp.branches, rng)]
        everything = self.branches + self.experience_branches
        texts = [b.observation for b in everything] + [b.expert_next for b in everything]
        texts += [a for b in everything for a, _ in b.alternatives] + [b.expert_action for b in everything]
        self.tokenizer = (
            build_tokenizer(texts, hp.vocab_size, hp.tokenizer_cache, split_digits=hp.split_digits)
            if hp.tokenizer is None
            else load_tokenizer(hp.tokenizer)
        )
        self._encode_pools()
        self.policy_rationales: list[str] | None = None
        self.policy_collected = False

    def _encode_pools(self) -> None:
        self.pools = {
            "il": self.encode(il_examples(self.branches)),
            "iwm": self.encode(iwm_examples(self.branches) + alternative_examples(self.experience_branches)),
            "sr": self.encode(sr_examples(self.branches)) if self.hparams.rationale_source == "template" else [],
        }

    def needs_policy(self) -> bool:
        """Whether the branches are still to be collected with the policy (``alternatives`` or ``branch_states``)."""
        hp = self.hparams
        return (hp.alternatives, hp.branch_states) != ("random", "expert") and not self.policy_collected

    def collect_with_policy(self, scorer: Scorer) -> int:
        """Branch the training goals again with the policy's ``scorer`` (:func:`policy_branches`); returns how many
        states were branched. The tokenizer stays the one built from the expert's rollouts."""
        hp = self.hparams
        rng = random.Random(f"{hp.seed}-policy-branches")
        self._set_branches(policy_branches(self.train_envs, hp.branches, scorer, rng, hp.alternatives,
                                           hp.branch_states))
        return len(self.branches)

    def _set_branches(self, branches: list[Branch]) -> None:
        self.branches, self.policy_collected = branches, True
        self._encode_pools()

    def reflection_requests(self) -> list[str]:
        """What the policy must write rationales for before training: one request per expert state, until it has
        written them (``rationale_source: policy``); empty otherwise."""
        if self.hparams.rationale_source != "policy" or self.policy_rationales is not None:
            return []
        return [reflection_request(b) for b in self.branches]

    def set_policy_rationales(self, rationales: list[str]) -> int:
        """Use ``rationales`` (one per branch, written from :func:`reflection_request`) for the SR examples, dropping
        those that conclude for another action; returns how many were kept."""
        if len(rationales) != len(self.branches):
            raise ValueError(f"{len(rationales)} rationales for {len(self.branches)} expert states")
        by_branch = dict(zip(map(id, self.branches), rationales))
        examples = sr_examples(self.branches, rationale_fn=lambda b: by_branch[id(b)])
        if not examples:
            raise ValueError(
                "no policy-written rationale concluded for the expert action, so there is no SR data: start from a "
                "stronger model (model_name / init_from) or use rationale_source: template"
            )
        self.policy_rationales = list(rationales)
        self.pools["sr"] = self.encode(examples)
        return len(examples)

    def state_dict(self) -> dict:
        # Branches and rationales made by the initial policy travel with checkpoints, so a resumed run trains on the
        # same ones.
        branches = [asdict(b) for b in self.branches] if self.policy_collected else None
        return {"policy_rationales": self.policy_rationales, "policy_branches": branches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("policy_branches") is not None:
            self._set_branches([Branch(b["observation"], b["expert_action"], b["expert_next"],
                                       [tuple(a) for a in b["alternatives"]]) for b in state["policy_branches"]])
        if state.get("policy_rationales") is not None:
            self.set_policy_rationales(state["policy_rationales"])

    def encode(self, examples: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Prompt tokens and completion tokens + ``<eos>`` of each (prompt, completion), encoded exactly as the
        policy scores actions."""
        if not examples:
            return []
        prompts, completions = zip(*examples)
        eos = [self.tokenizer.eos_token_id]
        completion_ids = [ids + eos for ids in encode_candidates(self.tokenizer, list(completions))]
        return list(zip(encode_prompts(self.tokenizer, list(prompts)), completion_ids))

    def collate(self, examples: list[tuple[list[int], list[int]]], packing: bool = False) -> dict[str, torch.Tensor]:
        prompts, completions = zip(*examples)
        return lm_batch(prompts, completions, self.tokenizer.pad_token_id, completion_only=True,
                        max_seq_length=self.hparams.max_seq_length, packing=packing)

    def pool_for_step(self, step: int) -> list[tuple[list[int], list[int]]]:
        """The examples update ``step`` draws from, by recipe."""
        hp = self.hparams
        if hp.recipe == "iwm_then_il" and step < hp.iwm_steps:
            return self.pools["iwm"]
        if hp.recipe == "sr" and random.Random(f"{hp.seed}-sr-{step}").random() < hp.sr_fraction:
            return self.pools["sr"]
        return self.pools["il"]

    def train_dataloader(self) -> DataLoader:
        per_device, rank, _ = per_device_batch(self, self.batch_size)
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(ExperienceStream(self, per_device, rank, start), batch_size=None)

    def _episodes(self, splits: dict[str, list[TextEnv]]) -> DataLoader:
        """``(split, env)`` batches dealt whole to the processes, none twice (placeholders are ``[]``)."""
        items = [(split, env) for split, envs in splits.items() for env in envs]
        return evaluation_loader(self, Chunks(items, self.hparams.eval_batch_size), empty=[])

    def val_dataloader(self) -> DataLoader:
        return self._episodes(self.eval_envs)

    def test_dataloader(self) -> DataLoader:
        return self._episodes(self.test_envs)


class GoalStream(IterableDataset):
    """Batches of training goals (their environments), indexed by optimisation step like :class:`ExperienceStream`."""

    def __init__(self, envs: list[TextEnv], batch_size: int, seed: int, rank: int, start_step: int) -> None:
        if batch_size > len(envs):
            raise ValueError(f"{batch_size} goals per batch but only {len(envs)} training goals")
        self.envs, self.batch_size, self.seed, self.rank, self.start_step = envs, batch_size, seed, rank, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            yield random.Random(f"{self.seed}-goals-{self.rank}-{step}").sample(self.envs, self.batch_size)
            step += 1


class EpisodeGoalsDataModule(EarlyExperienceDataModule):
    """The early-experience DataModule for an agent that plays its own training episodes (``WebShopGRPO``): a
    training batch is ``goals_per_batch`` distinct goals of the training pool (the ``train`` split only). The
    tokenizer, the goals and the evaluation episodes are those of the early-experience runs with the same settings,
    so keep ``env``, ``seed``, ``train_goals``, ``branches`` and the tokenizer settings equal to the checkpoint's.
    """

    def __init__(self, goals_per_batch: int = 8, **kwargs) -> None:
        """
        Args:
            goals_per_batch: Training goals per rollout, summed over all devices (each played ``group_size`` times).
            kwargs: The early-experience data settings (:class:`EarlyExperienceDataModule`).
        """
        if goals_per_batch < 1:
            raise ValueError(f"goals_per_batch must be >= 1, got {goals_per_batch}")
        super().__init__(**kwargs)

    def train_dataloader(self) -> DataLoader:
        per_device, rank, _ = per_device_batch(self, self.hparams.goals_per_batch)
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(GoalStream(self.train_envs, per_device, self.hparams.seed, rank, start), batch_size=None)


def make_envs(env: str, train_goals: int, eval_goals: int, seed: int,
              eval_train_goals: int | None = None) -> dict[str, list[TextEnv]]:
    """Environments per evaluation split, plus ``_train_pool``: the ``train_goals`` goals whose rollouts are the
    training data; the ``train`` split is the first ``eval_goals`` of the first ``eval_train_goals`` (default: all)."""
    shown = min(eval_goals, eval_train_goals or train_goals)
    if env == "tiny_shop":
        return {
            "_train_pool": tiny_shop_goals(train_goals, seed),
            "train": tiny_shop_goals(shown, seed),
            "held_out": tiny_shop_goals(eval_goals, seed + TINY_HELD_OUT_OFFSET),
        }
    catalog = make_catalog(seed=seed)
    pool = [WebShopEnv(catalog, g) for g in make_goals(catalog, "train", train_goals, seed)]
    return {
        "_train_pool": pool,
        "train": [WebShopEnv(catalog, g) for g in make_goals(catalog, "train", shown, seed)],
        "held_out": [WebShopEnv(catalog, g) for g in make_goals(catalog, "held_out", eval_goals, seed)],
        "out_of_domain": [WebShopEnv(catalog, g) for g in make_goals(catalog, "out_of_domain", eval_goals, seed)],
    }


def next_eval_envs(validation: dict[str, list[TextEnv]], env: str, eval_goals: int,
                   seed: int) -> dict[str, list[TextEnv]]:
    """Test environments disjoint from the ``validation`` ones: the next ``eval_goals`` goals of each held-out
    and out-of-domain split (goals within a split are distinct); the ``train`` split is kept."""
    if env == "tiny_shop":
        return {"train": validation["train"],
                "held_out": tiny_shop_goals(2 * eval_goals, seed + TINY_HELD_OUT_OFFSET)[eval_goals:]}
    catalog = make_catalog(seed=seed)
    return {"train": validation["train"]} | {
        split: [WebShopEnv(catalog, g) for g in make_goals(catalog, split, 2 * eval_goals, seed)[eval_goals:]]
        for split in ("held_out", "out_of_domain")
    }
