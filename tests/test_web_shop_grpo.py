"""GRPO of the web-shop agent: rollouts (deterministic for a seed, G episodes per goal, sampled from the softmax over
the page's candidates), log-probs of that softmax against a hand computation, advantages over episodes, one update
moving pi the right way, exact resume mid-iteration, starting from an early-experience checkpoint, the config."""

from dataclasses import replace

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.early_experience import EarlyExperienceDataModule, EpisodeGoalsDataModule, policy_prompt
from experiment.cli import main
from lightning_modules.early_experience import EarlyExperienceAgent
from lightning_modules.rl import group_advantages
from lightning_modules.web_shop_grpo import WebShopGRPO
from models.action_scorer import naive_scores
from models.lm_factory import LMSettings
from tests.conftest import REPO
from tests.test_resume import _check_resume

LM = LMSettings(model_name="tiny-smollm3", hidden_size=32, num_layers=1, num_heads=2)
DATA = dict(train_goals=8, eval_goals=2, vocab_size=320)


@pytest.fixture(scope="module")
def goals(cache):
    return EpisodeGoalsDataModule(goals_per_batch=2, tokenizer_cache=cache, **DATA)


def _agent(data, **kwargs) -> WebShopGRPO:
    torch.manual_seed(0)
    settings = dict(group_size=3, minibatch_size=8, ppo_epochs=1) | kwargs
    module = WebShopGRPO(lm=LM, **settings)
    module.build(data.tokenizer)
    return module


def _sharpen(module, std: float = 0.3) -> None:
    """Random weights far enough from zero that pi is not nearly uniform or nearly one-hot everywhere."""
    with torch.no_grad():
        for p in module.lm.parameters():
            p.add_(torch.randn_like(p) * std)
    module.reference.load_state_dict(module.lm.state_dict())  # the starting policy is the sharpened one


def test_rollouts_are_deterministic_for_a_seed_with_group_size_episodes_per_goal(goals):
    module = _agent(goals, temperature=3.0)
    batch = next(iter(goals.train_dataloader()))
    assert len(batch) == 2 and all(env.goal in {e.goal for e in goals.train_envs} for env in batch)
    first, again = (module.rollout_groups(batch, torch.Generator().manual_seed(0)) for _ in range(2))
    other = module.rollout_groups(batch, torch.Generator().manual_seed(1))
    assert torch.equal(first.ids, again.ids) and torch.equal(first.inputs["chosen"], again.inputs["chosen"])
    assert not torch.equal(first.inputs["chosen"], other.inputs["chosen"])
    # 2 goals x 3 episodes; each step's group is its goal, and every step of an episode carries its reward.
    assert sorted(set(first.episodes.tolist())) == list(range(6))
    assert torch.equal(first.groups, first.episodes // 3)
    for episode in range(6):
        steps = first.episodes == episode
        assert len(set(first.rewards[steps].tolist())) == 1
        assert 1 <= int(steps.sum()) <= batch[0].max_steps
    # The first step of every episode of a goal is that goal's start page.
    starts = [int((first.episodes == e).nonzero()[0]) for e in range(6)]
    expected = [module.tokenizer(policy_prompt(env.copy().reset()))["input_ids"] for env in batch]
    for episode, row in enumerate(starts):
        prompt = first.ids[row, : first.start][first.mask[row, : first.start].bool()].tolist()
        assert prompt[-len(expected[episode // 3]):] == expected[episode // 3]


def test_logprobs_are_the_tempered_log_softmax_over_the_pages_candidates(goals):
    module = _agent(goals, temperature=2.0)
    _sharpen(module)
    env = goals.train_envs[0].copy()
    env.reset()
    candidates = env.candidate_actions()
    rollout = module.rollout_groups([goals.train_envs[0]], torch.Generator().manual_seed(0))
    data = {"ids": rollout.ids, "mask": rollout.mask, **rollout.inputs}
    logprobs = module.sequence_logprobs(data, rollout.start)
    assert logprobs.shape == (len(rollout.ids), 1)
    # Step 0 of episode 0 is the start page: pi = softmax(score / 2) over its candidates, scored one by one.
    scores = naive_scores(module.lm, module.tokenizer, policy_prompt(env.observation()), candidates)
    chosen = int(rollout.inputs["chosen"][0])
    expected = torch.log_softmax(scores / 2.0, 0)[chosen]
    assert logprobs[0, 0].item() == pytest.approx(expected.item(), abs=1e-4)
    # The reference is the starting policy: a frozen copy, equal before any update.
    assert torch.allclose(module.sequence_logprobs(data, rollout.start, reference=True), logprobs.detach())


def _forced(module, batch, rewards: list[float]):
    """A real rollout of ``batch`` whose episode rewards are replaced by ``rewards``."""
    rollout = module.rollout_groups(batch, torch.Generator().manual_seed(0))
    return replace(rollout, rewards=torch.tensor(rewards)[rollout.episodes])


def test_advantages_compare_episodes_and_a_group_of_equal_rewards_gets_zero(goals, monkeypatch):
    module = _agent(goals)
    batch = goals.train_envs[:2]
    episode_rewards = [0.6, 0.6, 0.6, 1.0, 0.2, 0.2]  # goal 0: all equal; goal 1: one better than the others
    rollout = _forced(module, batch, episode_rewards)
    monkeypatch.setattr(module, "rollout_groups", lambda *args: rollout)
    buffer, logs = module.collect(batch)
    advantages = buffer["advantages"]
    assert torch.equal(advantages[rollout.groups == 0], torch.zeros(int((rollout.groups == 0).sum())))
    # One advantage per episode, whatever its length: group_advantages over the 6 episode rewards.
    expected, tied = group_advantages(torch.tensor(episode_rewards), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.allclose(advantages, expected[rollout.episodes])
    assert logs["train/adv_zero_frac"] == 0.5 and tied.tolist() == [True, False]
    assert logs["train/reward"].item() == pytest.approx(sum(episode_rewards) / 6)


def test_one_update_raises_pi_of_the_positively_advantaged_action(goals):
    module = _agent(goals, kl_coef=0.0)
    _sharpen(module)
    buffer, _ = module.collect(goals.train_envs[:2])
    start = int(buffer["start"])
    mb = {k: v for k, v in buffer.items() if v.dim() > 0}

    def pi_of_chosen() -> torch.Tensor:
        with torch.no_grad():
            return module.sequence_logprobs(mb, start)[:, 0].exp()

    before = pi_of_chosen()
    # Two steps whose chosen action has room to move both ways: one positively, one negatively advantaged.
    up, down = ((before > 0.05) & (before < 0.95)).nonzero()[[0, -1], 0].tolist()
    assert up != down
    mb["advantages"] = torch.zeros_like(mb["advantages"])
    mb["advantages"][up], mb["advantages"][down] = 1.0, -1.0
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    module.grpo_losses(mb, start)["loss"].backward()
    optimizer.step()
    after = pi_of_chosen()
    assert after[up] > before[up] and after[down] < before[down]


def test_resume_mid_iteration_equals_the_uninterrupted_run(tmp_path, cache):
    data = EpisodeGoalsDataModule(goals_per_batch=2, tokenizer_cache=cache, **DATA)

    def make():  # 2 goals x 2 episodes of up to 10 steps, minibatches of 6, 2 epochs: iterations of 2+ steps
        return WebShopGRPO(lm=LM, group_size=2, minibatch_size=6, ppo_epochs=2, temperature=3.0,
                           evaluate_before_training=False)

    _check_resume(make, data, tmp_path, 3, 6)


def _fit_early_experience(cache, folder, **data) -> str:
    """One IL update of an early-experience agent; its last checkpoint."""
    il = EarlyExperienceDataModule(tokenizer_cache=cache, batch_size=4, **(DATA | data))
    agent = EarlyExperienceAgent(lm=LM, evaluate_before_training=False)
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=folder,
                      callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)])
    trainer.fit(agent, datamodule=il)
    return str(folder / "last.ckpt")


def test_init_from_an_early_experience_checkpoint_loads_and_a_resume_from_it_is_refused(tmp_path, cache):
    checkpoint = _fit_early_experience(cache, tmp_path)
    saved = torch.load(checkpoint, weights_only=True)
    module = WebShopGRPO(lm=LM, init_from=checkpoint, group_size=2, minibatch_size=4)
    goals = EpisodeGoalsDataModule(goals_per_batch=2, tokenizer_cache=cache, **DATA)
    module.build(goals.tokenizer)
    for name, value in module.lm.state_dict().items():
        assert torch.equal(value, saved["merged_lm"][name]), name
    assert all(torch.equal(p, q) for p, q in zip(module.lm.parameters(), module.reference.parameters()))
    with pytest.raises(ValueError, match="EarlyExperienceAgent, not by .*WebShopGRPO"):
        module.on_load_checkpoint(saved)
    # Data settings that give another tokenizer are refused before any training.
    other = EpisodeGoalsDataModule(goals_per_batch=2, tokenizer_cache=cache, **(DATA | {"seed": 1}))
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="seed=0 there, 1 here"):
        trainer.fit(WebShopGRPO(lm=LM, init_from=checkpoint), datamodule=other)


def test_invalid_settings_fail_clearly(goals):
    with pytest.raises(ValueError, match="takes its reward from the environment"):
        WebShopGRPO(reward_model_from="reward.ckpt")
    with pytest.raises(ValueError, match="goals_per_batch must be >= 1"):
        EpisodeGoalsDataModule(goals_per_batch=0)
    with pytest.raises(ValueError, match="3 goals per batch but only 2"):
        next(iter(EpisodeGoalsDataModule(goals_per_batch=3, tokenizer_cache=goals.hparams.tokenizer_cache,
                                         **(DATA | {"train_goals": 2})).train_dataloader()))


def test_config_parses_and_the_class_defaults_equal_it(capsys):
    config = REPO / "configs/early_experience/web_shop_grpo.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"] == "lightning_modules.web_shop_grpo.WebShopGRPO"
    configured = yaml.safe_load(config.read_text())
    # The data settings that make the tokenizer and the goals are the early-experience base config's.
    il_config = yaml.safe_load((REPO / "configs/early_experience/web_shop_il.yaml").read_text())
    il = il_config["data"]["init_args"]
    assert all(configured["data"]["init_args"][k] == il[k] for k in ("env", "branches", "train_goals", "vocab_size"))
    # The early-experience checkpoints' model, every weight trained.
    assert configured["model"]["init_args"]["lm"] == il_config["model"]["init_args"]["lm"] | {"lora": None}
