"""GRPO: group advantages, the k3 KL and the clipped loss against hand computations; the rollout seam; one update
moving the log-probs the right way; the non-finite guard; exact resume mid-iteration; DDP ranks identical; the
config equal to the class defaults."""

import math

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from datamodules.text_corpus import PromptDataModule
from experiment.cli import main
from lightning_modules.grpo import GRPO
from lightning_modules.rl import group_advantages, grpo_loss, kl_k3, shaped_scores
from models.lm_factory import LMSettings, LoraSettings
from models.lm_rollout import response_logprobs
from tests.conftest import REPO, TINY, TINY_CLI
from tests.conftest import TINY_STORIES as DATA
from tests.helpers import fit_on_two_processes
from tests.test_resume import _check_resume


@pytest.fixture(scope="module")
def prompts(cache):
    return PromptDataModule(**DATA, tokenizer_cache=cache, batch_size=4, eval_batch_size=8, batches_per_epoch=4)


def _grpo(prompts, **kwargs) -> GRPO:
    settings = dict(group_size=2, max_new_tokens=8, minibatch_size=4, ppo_epochs=1) | kwargs
    module = GRPO(lm=LMSettings(**TINY, lora=LoraSettings(r=4, alpha=32.0)), **settings)
    module.build(prompts.tokenizer)
    return module


def _attach(module) -> Trainer:
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)
    trainer.strategy.connect(module)
    module.trainer = trainer
    return trainer


def _perturb_adapter(module, std: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in module.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def _fit(module, datamodule, root, **trainer_kwargs) -> Trainer:
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      limit_val_batches=0, enable_checkpointing=False, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


# --- math -----------------------------------------------------------------------------------------------------
def test_group_advantages_match_a_hand_computation():
    # Two groups, interleaved and with arbitrary ids: {1, 2, 3} (ids 7) and {0, 4} (ids 2).
    rewards = torch.tensor([1.0, 0.0, 2.0, 4.0, 3.0])
    groups = torch.tensor([7, 2, 7, 2, 7])
    eps = 1e-4
    advantages, tied = group_advantages(rewards, groups, eps)
    std_a = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)  # population std: divide by G = 3
    std_b = math.sqrt(((0 - 2) ** 2 + (4 - 2) ** 2) / 2)
    expected = [-1 / (std_a + eps), -2 / (std_b + eps), 0.0, 2 / (std_b + eps), 1 / (std_a + eps)]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)
    assert not tied.any() and len(tied) == 2
    single, tied_single = group_advantages(torch.tensor([5.0]), torch.tensor([0]))
    assert single.tolist() == [0.0] and tied_single.tolist() == [True]  # a group of one: no signal, no NaN


def test_equal_rewards_give_exactly_zero_advantage_and_no_policy_gradient():
    # 0.1 x 3 is not exact in floating point: reward - mean would be a rounding error blown up by eps.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    advantages, tied = group_advantages(rewards, groups)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0] and advantages[3] > 0 > advantages[4]
    assert tied.tolist() == [True, False]
    logprobs = torch.log(torch.full((5, 3), 0.3)).requires_grad_()
    old = logprobs.detach() + 0.05
    loss = grpo_loss(logprobs, old, old, advantages, torch.ones(5, 3), clip_range=0.2, kl_coef=0.0)["loss"]
    loss.backward()
    assert torch.equal(logprobs.grad[:3], torch.zeros(3, 3))  # the tied group contributes nothing
    assert (logprobs.grad[3:] != 0).all()


def test_k3_matches_a_hand_computation_is_non_negative_and_averages_to_the_kl():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 - ln 0.5 - 1
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1, rel=1e-6)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_k3(a, b) >= 0).all() and torch.equal(kl_k3(a, a), torch.zeros(1000))
    # Its expectation under the policy is the exact KL(p || q).
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    assert (p * kl_k3(p.log(), q.log())).sum().item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)


def test_grpo_loss_matches_a_hand_computation():
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 9.0], [0.5, 1.0, 1.0]]))  # old log-probs 0: ratio = these
    old = torch.zeros(2, 3)
    ref = torch.log(torch.tensor([[1.0, 2.2, 1.0], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the last column is padding
    advantages = torch.tensor([1.0, -2.0])
    out = grpo_loss(logprobs, old, ref, advantages, mask, clip_range=0.2, kl_coef=0.1)
    # row 0 (A=1): max(-1.5, -1.2) = -1.2, max(-1.1, -1.1) = -1.1; row 1 (A=-2): max(1.0, 1.6) = 1.6, 2.0
    policy = (-1.2 - 1.1 + 1.6 + 2.0) / 4
    k3 = [1 / 1.5 + math.log(1.5) - 1, 2 - math.log(2) - 1, 2 - math.log(2) - 1, 0.0]
    assert out["policy_loss"].item() == pytest.approx(policy, abs=1e-6)
    assert out["kl"].item() == pytest.approx(sum(k3) / 4, abs=1e-6)
    assert out["loss"].item() == pytest.approx(policy + 0.1 * sum(k3) / 4, abs=1e-6)
    assert out["clip_frac"].item() == pytest.approx(2 / 4)  # 1.5 and 0.5 left [0.8, 1.2]


@pytest.mark.parametrize(("advantage", "ratio", "moves"), [
    (1.0, 1.0, "up"), (-1.0, 1.0, "down"),  # inside the range: follow the advantage
    (1.0, 1.5, "none"), (-1.0, 0.5, "none"),  # clipped: past the range in the advantage's direction, no gradient
    (-1.0, 1.5, "down"),  # the pessimistic bound keeps the gradient that undoes a bad move
])
def test_grpo_loss_gradient_raises_positive_advantage_tokens_and_stops_outside_the_clip_range(advantage, ratio,
                                                                                               moves):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = grpo_loss(logprobs, torch.zeros(1, 1), logprobs.detach(), torch.tensor([advantage]), torch.ones(1, 1),
                     clip_range=0.2, kl_coef=0.0)["loss"]
    loss.backward()
    step = -logprobs.grad.item()  # the direction gradient descent moves the token's log-prob
    assert {"up": step > 0, "down": step < 0, "none": step == 0}[moves]


def test_shaped_scores_penalise_responses_without_eos_then_clip():
    scores = torch.tensor([1.0, 5.0, -2.5])
    response = torch.tensor([[4, 2, 0], [4, 4, 4], [4, 4, 4]])  # eos id 2; row 0 ends, rows 1 and 2 run out
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert shaped_scores(scores, response, mask, 2, clip=3.0, missing_eos_penalty=1.0).tolist() == [1.0, 3.0, -3.0]
    assert shaped_scores(scores, response, mask, 2, clip=3.0).tolist() == [1.0, 3.0, -2.5]


def test_invalid_grpo_settings_fail_clearly():
    with pytest.raises(ValueError, match="group_size=1"):
        GRPO(group_size=1)
    with pytest.raises(ValueError, match="kl_coef=-0.1"):
        GRPO(kl_coef=-0.1)


# --- the module -----------------------------------------------------------------------------------------------
def test_rollout_answers_each_prompt_group_size_times_with_shaped_rewards(prompts):
    module = _grpo(prompts, group_size=3)
    _attach(module)
    batch = next(iter(prompts.test_dataloader()))
    b = len(batch["prompt_ids"])
    rollout = module.rollout_groups(batch, torch.Generator().manual_seed(0))
    assert rollout.groups.tolist() == [i for i in range(b) for _ in range(3)]
    assert torch.equal(rollout.ids[:, : rollout.start], batch["prompt_ids"].repeat_interleave(3, 0))
    response = rollout.ids[:, rollout.start :]
    assert torch.equal(rollout.trainable, rollout.mask[:, rollout.start :].bool())  # every response token trains
    score = module.score(batch["prompt_ids"].repeat_interleave(3, 0), batch["prompt_mask"].repeat_interleave(3, 0),
                         response, rollout.trainable)
    assert torch.allclose(rollout.rewards, shaped_scores(score, response, rollout.trainable,
                                                         module.tokenizer.eos_token_id, 3.0, 1.0))
    # LoRA B starts at 0: the policy is the reference, so the rollout's KL is exactly 0.
    buffer, logs = module.collect(batch)
    assert torch.equal(logs["train/kl"], torch.tensor(0.0))
    assert torch.equal(buffer["ref_logprobs"] * buffer["trainable"], buffer["logprobs"] * buffer["trainable"])
    assert logs["train/response_length"] == buffer["trainable"].sum() / (3 * b)


def test_kl_in_reward_moves_the_kl_from_the_loss_into_the_advantages(prompts, monkeypatch):
    torch.manual_seed(0)
    module = _grpo(prompts, group_size=4, kl_in_reward=True, kl_coef=0.5)
    _attach(module)
    _perturb_adapter(module)
    seen = {}
    rollout_groups = module.rollout_groups
    monkeypatch.setattr(module, "rollout_groups", lambda *a: seen.setdefault("rollout", rollout_groups(*a)))
    buffer, logs = module.collect(next(iter(prompts.test_dataloader())))
    rollout, mask = seen["rollout"], buffer["trainable"].float()
    kl = (kl_k3(buffer["logprobs"], buffer["ref_logprobs"]) * mask).sum(1)
    assert kl.mean() > 0.01 and torch.allclose(logs["train/kl"], kl.mean())
    expected, _ = group_advantages(rollout.rewards - 0.5 * kl, rollout.groups, 1e-4)
    assert torch.allclose(buffer["advantages"], expected, atol=1e-5)
    mb = {k: v for k, v in buffer.items() if v.dim() > 0}
    losses = module.grpo_losses(mb, int(buffer["start"]))
    assert losses["kl"] > 0 and torch.allclose(losses["loss"], losses["policy_loss"])  # no KL term in the loss


def test_one_update_raises_the_log_prob_of_the_positively_advantaged_sample(prompts):
    torch.manual_seed(0)
    module = _grpo(prompts, kl_coef=0.0)
    _attach(module)
    buffer, _ = module.collect(next(iter(prompts.test_dataloader())))
    start = int(buffer["start"])
    buffer["advantages"] = torch.zeros_like(buffer["advantages"])
    buffer["advantages"][:2] = torch.tensor([1.0, -1.0])
    mb = {k: v for k, v in buffer.items() if v.dim() > 0}

    def sequence_logprobs():
        with torch.no_grad():
            logprobs = response_logprobs(module.lm, mb["ids"], mb["mask"], start)[0]
        return (logprobs * mb["trainable"]).sum(1)

    before = sequence_logprobs()
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    module.grpo_losses(mb, start)["loss"].backward()
    optimizer.step()
    after = sequence_logprobs()
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.slow  # one to two minutes on 2 shared cores; the one-update test above is the fast check
def test_a_short_fit_raises_the_reward_model_score_of_the_policy_over_its_start(cache, tmp_path):
    torch.manual_seed(0)
    data = PromptDataModule(**DATA, tokenizer_cache=cache, batch_size=8, eval_batch_size=16, batches_per_epoch=100)
    # Every weight trains: a random tiny LM's logits are too flat for a LoRA adapter on attention to move far. The
    # reward is the raw score (no end-of-response penalty, which the policy would learn first), no KL anchor.
    module = GRPO(lm=LMSettings(**TINY, lora=None), group_size=4, max_new_tokens=6, minibatch_size=32, ppo_epochs=1,
                  kl_coef=0.0, missing_eos_penalty=None, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    module.build(data.tokenizer)
    batch = next(iter(data.test_dataloader()))

    def policy_score() -> float:  # the policy's responses to 16 held-out prompts, 4 draws each, fixed seeds
        return sum(float(module.compare(batch, torch.Generator().manual_seed(123 + k))["reward"].mean())
                   for k in range(4)) / 4

    before = policy_score()
    _fit(module, data, tmp_path, max_steps=24)
    assert policy_score() > before + 0.2  # seeds 0, 1, 2 of this setting: +0.46, +0.54, +0.85


def test_non_finite_rewards_are_skipped_by_the_guard_then_stop_training(prompts, tmp_path):
    module = _grpo(prompts)
    with torch.no_grad():
        module.reward_model.head.linear.bias.fill_(float("nan"))
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with pytest.raises(FloatingPointError, match="5 updates in a row had non-finite gradients"):
        _fit(module, prompts, tmp_path, max_steps=10)
    assert all(torch.equal(p, start[n]) for n, p in module.named_parameters() if p.requires_grad)


def test_training_moves_only_the_adapter_and_a_schedule_decays_the_learning_rate(prompts, tmp_path):
    module = _grpo(prompts, lr_decay="linear")
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = _fit(module, prompts, tmp_path, max_steps=4)
    assert trainer.global_step == 4
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    assert any(not torch.equal(p, adapter[n]) for n, p in module.named_parameters() if "lora_B" in n)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # linear to 0 at the end


def test_grpo_resume_mid_iteration_equals_the_uninterrupted_run(tmp_path):
    data = PromptDataModule(num_stories=60, vocab_size=320, batch_size=4, eval_batch_size=4,
                            tokenizer_cache=str(tmp_path / "tok"))

    def make():  # 4 prompts x 2 samples, minibatches of 4, 2 epochs: iterations of 4 steps
        return GRPO(lm=LMSettings(**TINY, lora=LoraSettings(r=4, alpha=32.0)), group_size=2, max_new_tokens=6,
                    minibatch_size=4, ppo_epochs=2)

    _check_resume(make, data, tmp_path, 6, 9)  # step 6 is inside the second iteration


@pytest.mark.slow  # about a minute: two processes start, build and train
def test_grpo_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path, cache):
    tiny = ["--data.init_args.num_stories", "120", "--data.init_args.vocab_size", "320", "--data.init_args.batch_size",
            "4", "--data.init_args.tokenizer_cache", cache, "--model.init_args.minibatch_size", "8",
            "--model.init_args.group_size", "2", "--model.init_args.max_new_tokens", "8", *TINY_CLI]
    saved = fit_on_two_processes("rlhf/grpo.yaml", tiny, tmp_path, max_steps=3)
    rank0, rank1 = saved["rank0.pt"], saved["rank1.pt"]
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # one update from both ranks' gradients
    assert any("lora_B" in k and rank0[k].abs().sum() > 0 for k in rank0)  # they did train (lora_B starts at 0)
    batches = [saved[f"batch_rank{k}.pt"] for k in (0, 1)]
    assert len(batches[0]["index"]) == 2  # 4 prompts over 2 ranks
    assert set(batches[0]["index"].tolist()) != set(batches[1]["index"].tolist())  # each rank its own prompts


def _holds(actual, expected) -> bool:
    """Whether ``actual`` has every (nested) value of ``expected``."""
    if isinstance(expected, dict):
        return all(_holds(actual[k], v) for k, v in expected.items())
    return actual == expected


def test_config_parses_and_the_class_defaults_equal_it(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/rlhf/grpo.yaml"), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]
    assert resolved["class_path"] == "lightning_modules.grpo.GRPO"
    configured = yaml.safe_load((REPO / "configs/rlhf/grpo.yaml").read_text())["model"]["init_args"]
    configured.pop("optimizer")
    defaults = dict(GRPO().hparams)  # the class's own defaults, as recorded in its hyperparameters
    assert _holds(resolved["init_args"], configured) and _holds(defaults, configured)
    assert configured["kl_in_reward"] is False and configured["lm"]["lora"]["r"] == 16
