"""Early-experience data (branching, IL / IWM / SR examples, completion-only labels) and the agent's episodes."""

import csv
import math
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from datamodules.early_experience import (
    EarlyExperienceDataModule,
    collect_branches,
    il_examples,
    iwm_examples,
    observation_delta,
    policy_branches,
    rationale_concludes_for,
    reflection_request,
    sr_examples,
    template_rationale,
    world_model_prompt,
)
from envs.tiny_shop import TinyShopEnv
from envs.web_shop import WebShopEnv, make_catalog, make_goals
from lightning_modules.early_experience import EarlyExperienceAgent
from models.lm_factory import LMSettings, LoraSettings
from tests.conftest import REPO

SMALL_LM = LMSettings(model_name="tiny-smollm3", hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def web_branches():
    catalog = make_catalog()
    env = WebShopEnv(catalog, make_goals(catalog, "train", 1)[0])
    return env, collect_branches(env, k=3, rng=random.Random(0))


def test_branches_follow_the_expert_and_execute_alternatives_in_copies(web_branches):
    env, branches = web_branches
    assert env.page == "done" and env.reward == 1.0  # the original environment followed the expert only
    for branch in branches:
        actions = [a for a, _ in branch.alternatives]
        assert len(actions) == len(set(actions)) and branch.expert_action not in actions
        assert 1 <= len(actions) <= 3
    # Each alternative's next observation is what that action does from the branch's state.
    replay = WebShopEnv(env.catalog, env.goal)
    replay.reset()
    for branch in branches:
        assert replay.observation() == branch.observation
        for action, next_observation in branch.alternatives:
            assert replay.copy().step(action).observation == next_observation
        assert replay.step(branch.expert_action).observation == branch.expert_next


def test_detours_add_expert_labelled_recoveries_and_every_demonstration_still_succeeds():
    catalog = make_catalog()
    rng, detours, left_unfit_items = random.Random(0), 0, 0
    for goal in make_goals(catalog, "train", 40):
        branches = collect_branches(WebShopEnv(catalog, goal), k=3, rng=rng, detour_prob=0.5)
        replay = WebShopEnv(catalog, goal)
        for branch, following in zip(branches, branches[1:] + [None]):
            assert replay.observation() == branch.observation
            assert replay.expert_action() == branch.expert_action  # the label is always the expert's own action
            if branch.expert_action == "click[< prev]" and not replay._listing_fits(replay.item):
                left_unfit_items += 1  # a wrong item page, which pure expert data never shows
            taken = branch.expert_action
            if following is not None and following.observation != branch.expert_next:
                taken = next(a for a, nxt in branch.alternatives if nxt == following.observation)
                detours += 1
            result = replay.step(taken)
        assert result.done and result.reward == 1.0  # the expert recovered from every detour
    assert detours > 0 and left_unfit_items > 0
    with pytest.raises(ValueError, match="detour_prob"):
        EarlyExperienceDataModule(env="tiny_shop", detour_prob=1.0)


def _stub_scorer(prompts, candidates):
    """Known scores that do not follow the expert: a fixed function of each candidate's text."""
    return [torch.tensor([float(sum(map(ord, a)) % 23) for a in cands]) for cands in candidates]


def _ranked(candidates):
    """Candidates from the stub's best score down (ties in page order, as a stable sort keeps them)."""
    (scores,) = _stub_scorer([""], [candidates])
    return [candidates[i] for i in sorted(range(len(candidates)), key=lambda i: -scores[i])]


def test_top_k_alternatives_come_from_the_policys_scores():
    catalog = make_catalog()
    envs = [WebShopEnv(catalog, g) for g in make_goals(catalog, "train", 3)]
    branches = policy_branches([e.copy() for e in envs], 2, _stub_scorer, random.Random(0), "policy_top_k", "expert")
    replays = [e.copy() for e in envs]
    for replay in replays:
        replay.reset()
    expert_path = [b for e in [e.copy() for e in envs] for b in collect_branches(e, 2, random.Random(0))]
    assert [b.observation for b in branches] == [b.observation for b in expert_path]  # the expert's states
    chose_other_than_random = False
    for branch in branches:
        replay = next(r for r in replays if r.observation() == branch.observation)
        best = [a for a in _ranked(replay.candidate_actions()) if a != branch.expert_action][:2]
        assert [a for a, _ in branch.alternatives] == best  # exactly the policy's two best non-expert actions
        assert all(replay.copy().step(a).observation == nxt for a, nxt in branch.alternatives)
        random_pick = [a for a, _ in next(b for b in expert_path if b.observation == branch.observation).alternatives]
        chose_other_than_random |= random_pick != best
        replay.step(branch.expert_action)
    assert chose_other_than_random


def test_policy_visited_states_are_the_states_of_the_policys_own_rollout():
    catalog = make_catalog()
    goal = make_goals(catalog, "train", 1)[0]
    branches = policy_branches([WebShopEnv(catalog, goal)], 2, _stub_scorer, random.Random(0), "random", "policy")
    # The stub policy's own greedy rollout, played by hand.
    env, visited, experts = WebShopEnv(catalog, goal), [], []
    observation = env.reset()
    for _ in range(env.max_steps):
        visited.append(observation)
        experts.append(env.expert_action())
        result = env.step(_ranked(env.candidate_actions())[0])
        observation = result.observation
        if result.done:
            break
    assert [b.observation for b in branches] == visited
    assert [b.expert_action for b in branches] == experts  # the labels stay the expert's, in those states
    expert_states = {b.observation for b in collect_branches(WebShopEnv(catalog, goal), 2, random.Random(0))}
    assert any(o not in expert_states for o in visited)  # the policy went where the expert never goes
    for branch in branches:
        assert branch.expert_action not in [a for a, _ in branch.alternatives] and len(branch.alternatives) <= 2


def test_branching_with_the_policy_is_a_data_option_kept_in_checkpoints(tmp_path):
    settings = dict(train_goals=3, eval_goals=2, vocab_size=320, tokenizer_cache=str(tmp_path))
    default = EarlyExperienceDataModule(**settings)
    assert not default.needs_policy() and default.state_dict()["policy_branches"] is None
    data = EarlyExperienceDataModule(**settings, alternatives="policy_top_k", branch_states="policy")
    assert data.needs_policy() and data.branches == default.branches  # expert branches until the policy is there
    assert data.collect_with_policy(_stub_scorer) == len(data.branches) and not data.needs_policy()
    expected = policy_branches([e.copy() for e in data.train_envs], 3, _stub_scorer, random.Random(0),
                               "policy_top_k", "policy")
    assert data.branches == expected and data.branches != default.branches
    assert data.pools["il"] == data.encode(il_examples(expected))  # the training examples follow the new branches
    restored = EarlyExperienceDataModule(**data.hparams)
    restored.load_state_dict(data.state_dict())
    assert restored.branches == data.branches and restored.pools == data.pools and not restored.needs_policy()
    with pytest.raises(ValueError, match="detour_prob applies to random alternatives at expert states only"):
        EarlyExperienceDataModule(**settings, alternatives="policy_top_k", detour_prob=0.1)


def test_the_agent_branches_with_its_own_scores_before_its_first_update(tmp_path):
    from lightning.pytorch import Trainer

    data = EarlyExperienceDataModule(train_goals=3, eval_goals=2, vocab_size=320, tokenizer_cache=str(tmp_path),
                                     batch_size=4, alternatives="policy_top_k", branch_states="policy")
    torch.manual_seed(0)
    agent = EarlyExperienceAgent(lm=SMALL_LM, evaluate_before_training=False)
    agent.build(data.tokenizer)
    agent.lm.eval()
    expected = policy_branches([e.copy() for e in data.train_envs], 3, agent.candidate_scores, random.Random(0),
                               "policy_top_k", "policy")
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(agent, datamodule=data)
    assert data.branches == expected and not data.needs_policy()


def test_iwm_includes_the_expert_transition_and_uses_its_own_format(web_branches):
    _, branches = web_branches
    examples = iwm_examples(branches)
    assert len(examples) == sum(1 + len(b.alternatives) for b in branches)
    first = branches[0]
    assert (world_model_prompt(first.observation, first.expert_action), first.expert_next) in examples
    assert all(not prompt.endswith("Action:") for prompt, _ in examples)
    assert [c for _, c in il_examples(branches)] == [b.expert_action for b in branches]


def test_sr_rationales_are_grounded_and_filtered(web_branches):
    _, branches = web_branches
    branch = branches[0]
    rationale = template_rationale(branch)
    for action, next_observation in branch.alternatives:
        assert f"{action} -> {observation_delta(branch.observation, next_observation)}" in rationale
    assert rationale_concludes_for(rationale, branch.expert_action)
    # A rationale that argues for another action is dropped.
    wrong = sr_examples(branches, rationale_fn=lambda b: "Outcomes: ... Best: click[< prev].")
    assert wrong == []
    kept = sr_examples(branches)
    assert len(kept) == len(branches) and kept[0][1].endswith(f"Action: {branch.expert_action}")


def test_observation_delta_reads_json_and_text():
    shop = TinyShopEnv("blue", 30)
    before = shop.observation()
    after = shop.step("SELECT color=blue").observation
    assert 'cart={"color": "blue", "price": 25}' in observation_delta(before, after)
    assert observation_delta("Page: a\nx", "Page: b\nx") == "Page: b"
    assert observation_delta("same", "same") == "nothing changed"


DEEP = '{"a":' * 5000 + "1" + "}" * 5000  # deeper than json reads
LONG_INT = '{"a": ' + "9" * 5000 + "}"  # an integer over Python's 4,300-digit limit


@pytest.mark.parametrize("before,after,expected", [
    ("{}", DEEP, DEEP), ('{"a": 1}', LONG_INT, LONG_INT),  # compared as text: the new line
    ("[" * 100_000, "{" * 100_000, "{" * 100_000),
    ('{"a": 1}', "[1, 2]", "[1, 2]"), ("[1]", '{"a": 1}', '{"a": 1}'), ("", "", "nothing changed"),
])
def test_observation_delta_of_odd_observations_is_a_text_diff(before, after, expected):
    assert observation_delta(before, after) == expected


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return EarlyExperienceDataModule(
        env="tiny_shop",
        recipe="iwm_then_il",
        iwm_steps=3,
        train_goals=12,
        eval_goals=6,
        batch_size=4,
        vocab_size=320,
        tokenizer_cache=str(tmp_path_factory.mktemp("tok")),
    )


def test_labels_cover_the_completion_only(tiny_data):
    prompt, completion = tiny_data.pools["il"][0]
    batch = tiny_data.collate([tiny_data.pools["il"][0], tiny_data.pools["iwm"][0]])
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[0, : len(prompt)] == -100).all()
    assert labels[0, len(prompt) : len(prompt) + len(completion)].tolist() == completion
    assert completion[-1] == tiny_data.tokenizer.eos_token_id
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    assert torch.equal(ids[0, : len(prompt)], torch.tensor(prompt))


def test_recipes_choose_their_pool_by_step(tiny_data):
    assert tiny_data.pool_for_step(0) is tiny_data.pools["iwm"]
    assert tiny_data.pool_for_step(2) is tiny_data.pools["iwm"]
    assert tiny_data.pool_for_step(3) is tiny_data.pools["il"]
    with pytest.raises(ValueError, match="unknown recipe"):
        EarlyExperienceDataModule(env="tiny_shop", recipe="rl")
    with pytest.raises(ValueError, match="unknown env"):
        EarlyExperienceDataModule(env="alfworld")


def test_episodes_count_invalid_actions_and_leave_the_goals_untouched(tiny_data):
    torch.manual_seed(0)
    agent = EarlyExperienceAgent(lm=SMALL_LM)
    agent.build(tiny_data.tokenizer)
    envs = tiny_data.eval_envs["held_out"]
    outcomes = agent.run_episodes(envs)
    assert len(outcomes) == len(envs)
    for (reward, steps, invalid), env in zip(outcomes, envs):
        assert 1 <= steps <= env.max_steps and 0 <= invalid <= steps and reward in (0.0, 1.0)
        assert env.selected is None  # evaluation ran in copies


def test_malformed_actions_from_the_model_are_no_ops_counted_as_invalid(tiny_data, monkeypatch):
    agent = EarlyExperienceAgent(lm=SMALL_LM)
    agent.build(tiny_data.tokenizer)
    replies = iter(["", "ACTION: FLY", "SELECT color=purple", "\x00{]"] * 10)
    monkeypatch.setattr(agent, "act", lambda envs: [next(replies) for _ in envs])
    env = tiny_data.eval_envs["held_out"][0]
    [(reward, steps, invalid)] = agent.run_episodes([env])
    assert (reward, steps, invalid) == (0.0, env.max_steps, env.max_steps)


def test_4bit_lora_agent_trains_only_its_adapter_on_cpu(tiny_data):
    torch.manual_seed(0)
    agent = EarlyExperienceAgent(lm=replace(SMALL_LM, lora=LoraSettings(r=4), load_in_4bit=True), lr_decay="constant",
                                 warmup_ratio=0.0)
    agent.build(tiny_data.tokenizer)
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    optimizer = agent.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in agent.named_parameters() if "lora_" in n
    }
    for step in range(3):
        loss = agent.training_step(tiny_data.collate(tiny_data.pools["il"][step * 4 : step * 4 + 4]), step)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in agent.named_parameters():
        assert torch.equal(param, before[name]) != ("lora_" in name), name  # the adapter moved, nothing else did
    assert any(type(m).__name__ == "Linear4bit" for m in agent.lm.modules())


def _fit_tiny_shop(folder, *extra):
    """``train.py fit`` of the tiny-shop config at test size, in a subprocess; returns its parameters per rank."""
    out = folder / "params"
    command = [
        sys.executable, str(REPO / "train.py"), "fit",
        "--config", str(REPO / "configs/early_experience/tiny_shop_il.yaml"),
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(folder),
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--model.init_args.lm.hidden_size", "32", "--model.init_args.lm.num_heads", "2",
        "--model.init_args.lm.num_layers", "1",
        "--data.init_args.train_goals", "8", "--data.init_args.eval_goals", "4", "--data.init_args.batch_size", "4",
        "--data.init_args.tokenizer_cache", str(folder.parent / "tok"),
        "--trainer.callbacks+=tests.helpers.SaveRankParameters", f"--trainer.callbacks.init_args.folder={out}",
        *extra,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=folder.parent, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]


@pytest.mark.slow  # three runs in subprocesses
def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    (full,) = _fit_tiny_shop(tmp_path / "full", "--trainer.max_steps", "6")
    (_,) = _fit_tiny_shop(tmp_path / "half", "--trainer.max_steps", "3")
    checkpoint = next((tmp_path / "half").rglob("last.ckpt"))
    (resumed,) = _fit_tiny_shop(tmp_path / "half", "--trainer.max_steps", "6", "--ckpt_path", str(checkpoint))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    with open(next((tmp_path / "full").rglob("metrics.csv"))) as handle:
        steps = [row["step"] for row in csv.DictReader(handle) if row["val/success/held_out"]]
    assert steps == ["0", "2", "5"]  # the evaluation before training is logged at step 0


def test_learning_rate_follows_warmup_then_cosine(tmp_path):
    lr = 1e-3
    _fit_tiny_shop(
        tmp_path / "cosine", "--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1",
        "--model.init_args.optimizer.init_args.lr", str(lr), "--model.init_args.lr_decay", "cosine",
        "--model.init_args.warmup_ratio", "0.2", "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
    )  # fmt: skip
    with open(next((tmp_path / "cosine").rglob("metrics.csv"))) as handle:
        logged = [float(row["lr-AdamW"]) for row in csv.DictReader(handle) if row.get("lr-AdamW")]
    # warmup of int(0.2 * 5) = 1 step at half the rate, then a half cosine from step 1 to 5
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    expected = [lr * f for f in (0.5, *cosine)]
    assert logged == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow  # two processes
def test_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path):
    rank0, rank1 = _fit_tiny_shop(
        tmp_path / "ddp", "--config", str(REPO / "configs/trainer/ddp_cpu.yaml"), "--trainer.max_steps", "3"
    )
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_policy_written_rationales_are_filtered_and_travel_with_checkpoints(tmp_path):
    data = EarlyExperienceDataModule(
        env="tiny_shop", recipe="sr", rationale_source="policy", train_goals=6, eval_goals=2, vocab_size=320,
        tokenizer_cache=str(tmp_path),
    )  # fmt: skip
    assert len(data.reflection_requests()) == len(data.branches) and data.pools["sr"] == []
    torch.manual_seed(0)
    agent = EarlyExperienceAgent(lm=SMALL_LM)
    agent.build(data.tokenizer)
    requests = [reflection_request(b) for b in data.branches]
    assert all(b.expert_action in r and r.endswith("Rationale:") for b, r in zip(data.branches, requests))
    written = agent.write(requests[:3], max_new_tokens=5)
    assert len(written) == 3 and all(len(data.tokenizer(t)["input_ids"]) <= 5 for t in written)

    # Every other rationale argues for an alternative action and must be dropped.
    rationales = [
        f"it works. Best: {b.expert_action}." if i % 2 == 0 else f"Best: {b.alternatives[0][0]}."
        for i, b in enumerate(data.branches)
    ]
    kept = data.set_policy_rationales(rationales)
    assert kept == len(rationales[::2]) and data.reflection_requests() == []
    first_prompt, first_completion = data.pools["sr"][0]
    assert data.tokenizer.decode(first_completion, skip_special_tokens=True).startswith("it works. Best:")

    restored = EarlyExperienceDataModule(**data.hparams)
    restored.load_state_dict(data.state_dict())
    assert restored.pools["sr"] == data.pools["sr"] and restored.reflection_requests() == []
    with pytest.raises(ValueError, match="no policy-written rationale"):
        restored.set_policy_rationales(["Best: wait."] * len(rationales))


def test_experience_goals_grow_iwm_alone_and_keep_the_expert_data(cache):
    small = dict(env="web_shop", train_goals=4, eval_goals=3, vocab_size=300, tokenizer_cache=cache)
    plain = EarlyExperienceDataModule(**small)
    grown = EarlyExperienceDataModule(**small, experience_goals=10)
    assert [e.goal for e in grown.train_envs] == [e.goal for e in plain.train_envs]  # GRPO plays these
    assert len(grown.experience_envs) == 6 and plain.experience_envs == []
    assert grown.branches == plain.branches  # the expert's goals are branched first: the same data
    extra = grown.experience_branches
    assert [e.goal for e in grown.experience_envs] == [g for g in make_goals(make_catalog(), "train", 10)[4:]]
    # IL and SR come from the expert goals only; IWM adds the alternatives' transitions of the others, and no
    # expert action (or expert next page) of those goals.
    with_alternatives = iwm_examples(plain.branches) + [
        (world_model_prompt(b.observation, a), nxt) for b in extra for a, nxt in b.alternatives]
    assert grown.pools["iwm"] == grown.encode(with_alternatives)
    assert grown.pools["il"] == grown.encode(il_examples(plain.branches))  # (its tokenizer saw more text)
    assert grown.pools["sr"] == grown.encode(sr_examples(plain.branches))
    assert len(grown.pools["iwm"]) == len(plain.pools["iwm"]) + sum(len(b.alternatives) for b in extra)
    assert all(world_model_prompt(b.observation, b.expert_action) not in {p for p, _ in with_alternatives}
               for b in extra if b.expert_action not in [a for a, _ in b.alternatives])
    with pytest.raises(ValueError, match="experience_goals"):
        EarlyExperienceDataModule(**small, experience_goals=3)


def test_separate_test_goals_are_the_next_goals_of_each_split(cache):
    small = dict(env="web_shop", train_goals=4, eval_goals=3, vocab_size=300, tokenizer_cache=cache)
    same = EarlyExperienceDataModule(**small)
    data = EarlyExperienceDataModule(**small, separate_test_goals=True)
    assert same.test_envs is same.eval_envs
    catalog = make_catalog()
    for split in ("held_out", "out_of_domain"):
        assert [e.goal for e in data.eval_envs[split]] == make_goals(catalog, split, 3)
        assert [e.goal for e in data.test_envs[split]] == make_goals(catalog, split, 6)[3:]
    assert data.test_envs["train"] is data.eval_envs["train"]
    tested = [(split, env.goal) for batch in data.test_dataloader() for split, env in batch]
    validated = [(split, env.goal) for batch in data.val_dataloader() for split, env in batch]
    assert len(tested) == len(validated) == 9 and len(set(tested) & set(validated)) == 3  # the train split only
