"""Agentic RL: hand-written episodes (token layout, trainable mask, rewards), GAE across observations, deterministic
rollouts, one GRPO update in the direction of the better episode, PPO on the same episodes, the held-out split and
the configs."""

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

import lightning_modules.agentic_rl as agentic_rl
from datamodules.agentic_demos import AgenticTaskDataModule, encode_action, encode_observation, encode_prompt
from envs.agentic import Task, observation_text
from experiment.cli import main
from lightning_modules.agentic_rl import AgenticGRPO, AgenticPPO
from lightning_modules.rl import gae, grpo_loss
from models.lm_factory import LMSettings, LoraSettings
from models.lm_rollout import response_logprobs
from models.lm_text import pad
from tests.conftest import REPO, TINY
from tests.test_resume import _check_resume

TASK = Task("What is 12 plus 30?", "add", {"a": 12, "b": 30}, "42")
CALL, RIGHT, WRONG = TASK.call, "<finish>42</finish>", "<finish>41</finish>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return AgenticTaskDataModule(num_train_tasks=200, num_eval_tasks=8, vocab_size=400, batch_size=2,
                                 eval_batch_size=8, tokenizer_cache=str(tmp_path_factory.mktemp("tok")))


def _module(cls, data, **kwargs):
    settings = dict(max_new_tokens=12, minibatch_size=4, ppo_epochs=1) | kwargs
    module = cls(lm=LMSettings(**TINY, lora=LoraSettings(r=4, alpha=32.0)), **settings)
    module.build(data.tokenizer)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)
    trainer.strategy.connect(module)
    module.trainer = trainer
    return module


def _script(monkeypatch, tokenizer, turns: list[list[str]]) -> None:
    """Replace the sampler with a policy that writes ``turns[k][row]`` at turn ``k`` (rows: unfinished episodes)."""
    calls = []

    def scripted(model, prompt_ids, prompt_mask, *args, **kwargs):
        actions = turns[len(calls)]
        assert len(actions) == len(prompt_ids), "the script does not match the unfinished episodes"
        calls.append(prompt_ids)
        tokens = pad([encode_action(tokenizer, a) for a in actions], tokenizer.pad_token_id)
        return tokens, tokens != tokenizer.pad_token_id

    monkeypatch.setattr(agentic_rl, "sample", scripted)


# --- episodes -------------------------------------------------------------------------------------------------
def test_observations_are_in_the_context_but_not_trainable(data, monkeypatch):
    tok = data.tokenizer
    module = _module(AgenticGRPO, data)
    _script(monkeypatch, tok, [[CALL], [RIGHT]])
    episodes = module.play([TASK])
    parts = [(encode_prompt(tok, TASK), None), (encode_action(tok, CALL), True),
             (encode_observation(tok, "42"), False), (encode_action(tok, RIGHT), True)]
    expected = [t for p, _ in parts for t in p]
    assert episodes.ids[0].tolist() == expected and episodes.mask.all()
    assert episodes.start == len(parts[0][0])
    assert episodes.trainable[0].tolist() == [flag for p, flag in parts[1:] for _ in p]
    # The same tokens as the SFT demonstrations' last context + action: SFT trains on what RL samples.
    context, action = data.demonstration_turns(TASK)[-1]
    assert context + action == expected


def test_grpo_takes_no_loss_on_observation_tokens(data, monkeypatch):
    module = _module(AgenticGRPO, data, group_size=2, kl_coef=0.1)
    _script(monkeypatch, data.tokenizer, [[CALL, CALL, CALL, CALL], [RIGHT, WRONG, WRONG, RIGHT]])
    buffer, _ = module.collect({"tasks": [TASK, TASK]})
    mb = {k: v for k, v in buffer.items() if v.dim() > 0}
    start = int(buffer["start"])
    logprobs = response_logprobs(module.lm, mb["ids"], mb["mask"], start)[0].detach().requires_grad_()
    loss = grpo_loss(logprobs, mb["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["trainable"], 0.2, 0.1)
    loss["loss"].backward()
    observation = ~mb["trainable"]
    assert observation.any() and (logprobs.grad[observation] == 0).all()
    assert (logprobs.grad[mb["trainable"]] != 0).all()


@pytest.mark.parametrize(("script", "settings", "outcome"), [
    ([[CALL], [RIGHT]], {}, dict(returns=1.0, success=1.0, invalid=0, turns=2, tool_calls=1)),
    ([[CALL], [WRONG]], {}, dict(returns=0.0, success=0.0, invalid=0, turns=2, tool_calls=1)),
    ([[RIGHT]], {}, dict(returns=1.0, success=1.0, invalid=0, turns=1, tool_calls=0)),  # a lucky guess counts
    # Over the tool-call budget: the call is not run and the episode ends unanswered.
    ([[CALL], [CALL]], dict(max_tool_calls=1), dict(returns=0.0, success=0.0, invalid=0, turns=2, tool_calls=2)),
    # Out of turns.
    ([["<ask>which?</ask>"], ["<ask>sure?</ask>"]], dict(max_turns=2),
     dict(returns=0.0, success=0.0, invalid=0, turns=2, tool_calls=0)),
    # A call the registry rejects, and a malformed action: penalised and the episode ends.
    ([['<tool name="add">{"a": 12}</tool>']], {}, dict(returns=-0.5, success=0.0, invalid=1, turns=1, tool_calls=1)),
    ([["the answer is 42"]], {}, dict(returns=-0.5, success=0.0, invalid=1, turns=1, tool_calls=0)),
    # Without end_on_invalid the agent sees the error and goes on; the penalty stays.
    ([['<tool name="ad">{"a": 12, "b": 30}</tool>'], [CALL], [RIGHT]], dict(end_on_invalid=False),
     dict(returns=0.5, success=1.0, invalid=1, turns=3, tool_calls=2)),
], ids=["correct", "wrong_answer", "guess", "over_tool_budget", "over_turn_budget", "rejected_call", "malformed",
        "invalid_then_correct"])
def test_rewards_of_hand_written_episodes(data, monkeypatch, script, settings, outcome):
    module = _module(AgenticGRPO, data, **settings)
    _script(monkeypatch, data.tokenizer, [[turn[0]] for turn in script])
    episodes = module.play([TASK])
    assert {k: getattr(episodes, k).item() for k in outcome} == outcome
    stats = episodes.stats()
    assert stats["invalid_call_rate"].item() == pytest.approx(outcome["invalid"] / outcome["turns"])


def test_gae_skips_the_columns_between_an_agents_tokens():
    rewards = torch.tensor([[0.0, 5.0, 0.0, 1.0]])  # the 5.0 sits on an observation token: ignored
    values = torch.tensor([[0.2, 9.0, 0.4, 0.5]])
    mask = torch.tensor([[1, 0, 1, 1]])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    compact, compact_returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.5]]),
                                   torch.ones(1, 3), gamma, lam)
    d2 = 1.0 - 0.5
    d1 = gamma * 0.5 - 0.4
    d0 = gamma * 0.4 - 0.2
    a1 = d1 + gamma * lam * d2
    expected = [d0 + gamma * lam * a1, 0.0, a1, d2]
    assert advantages[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert returns[0, [0, 2, 3]].tolist() == pytest.approx(compact_returns[0].tolist(), abs=1e-6)
    assert returns[0, 1] == 0


def test_ppo_gives_the_return_to_every_action_token_across_observations(data, monkeypatch):
    module = _module(AgenticPPO, data)
    _script(monkeypatch, data.tokenizer, [[CALL, CALL], [RIGHT, WRONG]])
    buffer = module.collect({"tasks": [TASK, TASK]})
    trainable = buffer["response_mask"]
    assert (~trainable).any()  # the observation tokens
    # LoRA B = 0 (policy == reference: no KL), a zero value head, gamma = lambda = 1: every action token's return
    # is its episode's return, the first call's tokens included; observation tokens get nothing.
    assert torch.equal(buffer["returns"], torch.tensor([1.0, 0.0])[:, None] * trainable)
    assert torch.equal(buffer["advantages"], buffer["returns"])
    assert buffer["train/success"] == 0.5 and buffer["train/score"] == 0.5


def test_ppo_fit_runs_the_epoch_end_kl_check_on_the_last_rollouts_tasks(tmp_path):
    data = AgenticTaskDataModule(num_train_tasks=8, num_eval_tasks=4, vocab_size=400, batch_size=4,
                                 eval_batch_size=4, tokenizer_cache=str(tmp_path / "tok"))
    module = AgenticPPO(lm=LMSettings(**TINY, lora=LoraSettings(r=4, alpha=32.0)), max_new_tokens=8,
                        minibatch_size=4, ppo_epochs=1)
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)  # 2 batches per epoch: an epoch ends after step 2
    assert trainer.current_epoch >= 1 and "train/epoch_end_kl" in trainer.callback_metrics


def test_one_grpo_update_favours_the_correct_episode(data, monkeypatch):
    torch.manual_seed(0)
    module = _module(AgenticGRPO, data, group_size=2, kl_coef=0.0)
    _script(monkeypatch, data.tokenizer, [[CALL, CALL], [RIGHT, WRONG]])
    buffer, logs = module.collect({"tasks": [TASK]})
    assert buffer["advantages"][0] > 0 > buffer["advantages"][1] and logs["train/success"] == 0.5
    mb = {k: v for k, v in buffer.items() if v.dim() > 0}
    start = int(buffer["start"])
    ids = mb["ids"][:, start:]
    answer = mb["trainable"] & (ids[0] != ids[1])  # the answer's tokens: 42 in one episode, 41 in the other
    assert answer.any()

    def answer_logprobs():
        with torch.no_grad():
            return (response_logprobs(module.lm, mb["ids"], mb["mask"], start)[0] * answer).sum(1)

    before = answer_logprobs()
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    module.grpo_losses(mb, start)["loss"].backward()
    optimizer.step()
    after = answer_logprobs()
    assert after[0] > before[0] and after[1] < before[1]


def test_sampled_rollouts_are_deterministic_for_a_seed(data):
    torch.manual_seed(0)
    module = _module(AgenticGRPO, data, group_size=3)
    batch = next(iter(data.val_dataloader()))

    def rollout(seed):
        return module.rollout_groups(batch, torch.Generator().manual_seed(seed))

    first, again, other = rollout(1), rollout(1), rollout(2)
    assert torch.equal(first.ids, again.ids) and torch.equal(first.rewards, again.rewards)
    assert torch.equal(first.trainable, again.trainable)
    assert not torch.equal(first.ids, other.ids)
    assert first.groups.tolist() == [i for i in range(len(batch["tasks"])) for _ in range(3)]


# --- data, settings and configs -------------------------------------------------------------------------------
def test_evaluation_tasks_are_held_out(data):
    train = {t.question for t in data.tasks["train"]}
    val, test = ({t.question for t in data.tasks[s]} for s in ("val", "test"))
    assert len(val) == len(test) == 8 and not (val & train) and not (test & train) and not (val & test)
    batch = next(iter(data.test_dataloader()))
    assert batch["tasks"] == data.tasks["test"] and batch["index"].tolist() == list(range(8))


def test_a_number_is_the_same_tokens_in_the_observation_and_in_the_answer(data, tmp_path):
    """Answering is copying the tool's result: with merged digits the observation's `` 3298`` starts with a token
    (`` 3``) that ``<finish>3298`` never has; with one token per digit the four digits are the same four tokens."""
    merged = AgenticTaskDataModule(num_train_tasks=200, num_eval_tasks=8, vocab_size=400, split_digits=False,
                                   tokenizer_cache=str(tmp_path))

    def digits(tokenizer, text):
        return [i for i in tokenizer(text, add_special_tokens=False).input_ids
                if tokenizer.decode([i]).strip().isdigit()]

    for dm, same in ((data, True), (merged, False)):
        observed = digits(dm.tokenizer, observation_text("3298"))
        answered = digits(dm.tokenizer, " <finish>3298</finish>")
        assert (observed == answered) is same
    assert [data.tokenizer.decode([i]) for i in digits(data.tokenizer, " <finish>3298</finish>")] == list("3298")


def test_the_environment_gives_the_reward_so_a_reward_model_is_refused():
    for cls in (AgenticGRPO, AgenticPPO):
        with pytest.raises(ValueError, match="drop reward_model_from"):
            cls(reward_model_from="reward.ckpt")
    with pytest.raises(ValueError, match="max_turns"):
        AgenticGRPO(max_turns=0)


@pytest.mark.parametrize(("config", "cls"), [("agentic_grpo", AgenticGRPO), ("agentic_ppo", AgenticPPO)])
def test_configs_parse_and_the_class_defaults_equal_them(capsys, config, cls):
    path = REPO / f"configs/rlhf/{config}.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"] == f"lightning_modules.agentic_rl.{cls.__name__}"
    assert resolved["data"]["class_path"] == "datamodules.agentic_demos.AgenticTaskDataModule"
    configured = yaml.safe_load(path.read_text())["model"]["init_args"]
    configured.pop("optimizer")
    defaults = dict(cls().hparams)
    assert all(defaults[k] == v for k, v in configured.items() if k != "lm") and defaults["reward_model_from"] is None


def test_agentic_grpo_resume_mid_iteration_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    data = AgenticTaskDataModule(num_train_tasks=60, num_eval_tasks=4, vocab_size=400, batch_size=2,
                                 eval_batch_size=4, tokenizer_cache=str(tmp_path / "tok"))
    sampled = agentic_rl.sample
    actions = [encode_action(data.tokenizer, a) for a in ("no sentinel", WRONG)]

    def seeded_actions(model, *args, **kwargs):  # a random tiny LM writes only invalid actions: all rewards tie
        tokens, _ = sampled(model, *args, **kwargs)  # draws from the run's generator: seeded as the policy's own
        chosen = pad([actions[int(t) % 2] for t in tokens[:, 0]], data.tokenizer.pad_token_id)
        return chosen, chosen != data.tokenizer.pad_token_id

    monkeypatch.setattr(agentic_rl, "sample", seeded_actions)

    def make():  # 2 tasks x 4 episodes, minibatches of 4, 1 epoch: iterations of 2 steps
        return AgenticGRPO(lm=LMSettings(**TINY, lora=LoraSettings(r=4, alpha=32.0)), group_size=4,
                           max_new_tokens=8, minibatch_size=4, ppo_epochs=1)

    module = _module(AgenticGRPO, data, group_size=4, max_new_tokens=8, minibatch_size=4)
    buffer, _ = module.collect(next(iter(data.train_dataloader())))
    assert buffer["advantages"].abs().sum() > 0  # the updates below move the adapter
    _check_resume(make, data, tmp_path, 3, 5)  # step 3 is inside the second iteration
