"""RLHF math against hand computations, sampling, the reference model, rollback and the SFT -> RM -> PPO chain."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

from datamodules.text_corpus import PreferenceDataModule, PromptDataModule, TextCorpusDataModule
from experiment.cli import main
from lightning_modules.lm_phase import load_phase_checkpoint
from lightning_modules.ppo import PPORLHF
from lightning_modules.reward_model import PairwiseRewardModel, bradley_terry_loss
from lightning_modules.rl import clipped_policy_loss, clipped_value_loss
from lightning_modules.sft import CausalLMSFT
from models.lm_factory import LMSettings, LoraSettings, build_causal_lm
from models.lm_rollout import AdaptiveKLController, distinct_n, last_token_index, response_logprobs
from models.lm_text import position_ids, sample
from tests.conftest import REPO, TINY, TINY_CLI
from tests.conftest import TINY_STORIES as DATA
from tests.helpers import fit_on_two_processes


@pytest.fixture(scope="module")
def prompts(cache):
    return PromptDataModule(**DATA, tokenizer_cache=cache, batch_size=8, eval_batch_size=8, batches_per_epoch=4)


# --- math -----------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_with_centring_matches_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2 + 0.01 * (1 + 1) / 2
    assert bradley_terry_loss(chosen, rejected, 0.01).item() == pytest.approx(expected, rel=1e-6)
    # d/dc = -sigmoid(r - c) + 0.01 * 2 * (c + r): centring pulls a pair with high scores back towards zero.
    high = torch.tensor([5.0], requires_grad=True)
    bradley_terry_loss(high, torch.tensor([4.0]), 0.01).backward()
    assert high.grad.item() == pytest.approx(-F.sigmoid(torch.tensor(-1.0)).item() + 0.18, rel=1e-5)


def test_clipped_policy_loss_matches_hand_computation():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    loss, ratio, _ = clipped_policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped, pessimistic)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert ratio[0, 2].item() == 1.0  # padding has ratio 1


def test_clipped_value_loss_matches_hand_computation():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.5]])
    mask = torch.ones(1, 2)
    # token 0: clipped value 0.2 -> max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(0.25, 0.25)
    assert clipped_value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * (3.24 + 0.25) / 2)


def test_adaptive_kl_controller_moves_towards_the_target():
    controller = AdaptiveKLController(0.2, target=2.0, horizon=100)
    assert controller.update(2.0, n_steps=10) == pytest.approx(0.2)  # on target: unchanged
    assert controller.update(8.0, n_steps=10) == pytest.approx(0.2 * (1 + 0.2 * 0.1))  # error clipped to +0.2
    value = controller.value
    assert controller.update(1.8, n_steps=10) == pytest.approx(value * (1 - 0.1 * 0.1))  # kl/target - 1 = -0.1
    value = controller.value
    assert controller.update(0.0, n_steps=10) == pytest.approx(value * (1 - 0.2 * 0.1))  # -1 clipped to -0.2
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_distinct_n_and_padding_helpers():
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # ab, ba, ab + ab: 2 unique of 4
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 4]
    assert position_ids(mask)[0, 2:4].tolist() == [0, 1]


# --- sampling and log-probs -----------------------------------------------------------------------------------
def test_cached_sampling_matches_full_forward_and_ignores_left_padding(prompts):
    torch.manual_seed(0)
    tok = prompts.tokenizer
    lm = build_causal_lm("tiny-llama", tok, **TINY).eval()
    ids = torch.tensor([prompts.encode_prompt("Once upon a time, there was a cat named Tom.")])
    out, mask = sample(lm, ids, torch.ones_like(ids), 12, tok.eos_token_id, tok.pad_token_id, greedy=True)
    # Greedy decoding without a cache, one full forward per token.
    seq = ids
    for _ in range(out.shape[1]):
        seq = torch.cat([seq, lm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, ids.shape[1]:], out) and mask.all()
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    out_padded, _ = sample(lm, padded, padded_mask, 12, tok.eos_token_id, tok.pad_token_id, greedy=True)
    assert torch.equal(out_padded, out)


def test_sampling_stops_at_eos_and_logprobs_use_the_temperature(prompts):
    tok = prompts.tokenizer
    lm = build_causal_lm("tiny-llama", tok, **TINY).eval()

    class EosSecond(torch.nn.Module):  # the first token is sampled, the second is <eos>
        def __init__(self):
            super().__init__()
            self.lm, self.config = lm, lm.config

        def forward(self, input_ids=None, cache=None, **kwargs):
            out = self.lm(input_ids=input_ids, cache=cache, **kwargs)
            if input_ids.shape[1] == 1:
                out.logits[..., tok.eos_token_id] += 100.0
            return out

    batch = next(iter(prompts.test_dataloader()))
    out, mask = sample(EosSecond(), batch["prompt_ids"], batch["prompt_mask"], 5, tok.eos_token_id,
                       tok.pad_token_id, temperature=2.0)
    assert out.shape[1] == 2 and (out == tok.eos_token_id).any(1).all()  # stops once every row has ended
    first_eos = (out == tok.eos_token_id).float().argmax(1)
    for row, end in enumerate(first_eos.tolist()):
        assert mask[row, : end + 1].all() and not mask[row, end + 1 :].any()
        assert (out[row, end + 1 :] == tok.pad_token_id).all()
    ids = torch.cat([batch["prompt_ids"], out], 1)
    full_mask = torch.cat([batch["prompt_mask"], mask.long()], 1)
    p = batch["prompt_ids"].shape[1]
    logprobs, _, _ = response_logprobs(lm, ids, full_mask, p, temperature=2.0)
    logits = lm(input_ids=ids, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    manual = torch.log_softmax(logits[:, p - 1 : -1] / 2.0, -1).gather(-1, out.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs, manual, atol=1e-5)


# --- modules --------------------------------------------------------------------------------------------------
def _ppo(prompts, lora_r: int | None = None, **kwargs):
    lm = LMSettings(**TINY, lora=LoraSettings(r=lora_r, alpha=32.0) if lora_r else None)  # the PPO config's alpha
    module = PPORLHF(lm=lm, max_new_tokens=8, minibatch_size=4, ppo_epochs=1, **kwargs)
    module.build(prompts.tokenizer)
    return module


def test_ppo_reference_is_the_policy_without_adapter_and_value_head_starts_at_zero(prompts):
    module = _ppo(prompts, lora_r=4)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)
    trainer.strategy.connect(module)
    module.trainer = trainer
    batch = next(iter(prompts.test_dataloader()))
    rollout = module.collect(batch)
    assert torch.equal(rollout["kl"], torch.zeros_like(rollout["kl"]))  # LoRA B = 0: policy == reference
    assert torch.equal(rollout["values"], torch.zeros_like(rollout["values"]))
    # Gamma 1, lambda 1, no KL yet and zero values: every token's return is its sequence's clipped final reward.
    assert module.hparams.gamma == module.hparams.gae_lambda == 1.0
    rmask = rollout["response_mask"]
    response = rollout["ids"][:, int(rollout["prompt_length"]):]
    has_eos = ((response == module.tokenizer.eos_token_id) & rmask).any(1)
    score = module.reward_model(rollout["ids"], rollout["mask"])
    final = (score - module.hparams.missing_eos_penalty * (~has_eos).float()).clamp(-3.0, 3.0)
    assert torch.allclose(rollout["returns"], final[:, None] * rmask, atol=1e-6)
    assert torch.allclose(rollout["rewards"], final) and torch.allclose(rollout["train/score"], score.mean())
    with torch.no_grad():
        for name, p in module.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert module.collect(batch)["kl"].abs().sum() > 0


def test_kl_loss_is_the_exact_kl_to_the_reference_over_the_vocabulary_and_pulls_the_policy_back(prompts):
    torch.manual_seed(0)
    module = _ppo(prompts, lora_r=4, kl_loss_coef=0.5)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)
    trainer.strategy.connect(module)
    module.trainer = trainer
    with torch.no_grad():
        for name, p in module.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    rollout = module.collect(next(iter(prompts.test_dataloader())))
    p = int(rollout["prompt_length"])
    mb = {k: v for k, v in rollout.items() if v.dim() > 0}
    losses = module.ppo_losses(mb, p)
    inputs = dict(input_ids=rollout["ids"], attention_mask=rollout["mask"], position_ids=position_ids(rollout["mask"]))
    logits = module.lm(**inputs).logits[:, p - 1 : -1]
    with module.lm.disable_adapter():
        ref_logits = module.lm(**inputs).logits[:, p - 1 : -1]
    per_token = F.kl_div(F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1), log_target=True,
                         reduction="none").sum(-1)  # KL(policy || reference) at each response position
    rmask = rollout["response_mask"]
    expected = per_token[rmask].mean()
    assert expected > 0.01 and torch.allclose(losses["kl_loss"], expected, atol=1e-5)
    module.hparams.kl_loss_coef = 0.0
    without = module.ppo_losses(mb, p)
    assert "kl_loss" not in without
    assert torch.allclose(losses["loss"] - without["loss"], 0.5 * expected, atol=1e-5)
    module.zero_grad()
    losses["kl_loss"].backward()
    adapter = [q for n, q in module.lm.named_parameters() if "lora_" in n]
    with torch.no_grad():  # one small step against its gradient lowers the exact KL
        for q in adapter:
            q -= 0.05 * q.grad
    module.hparams.kl_loss_coef = 0.5
    assert module.ppo_losses(mb, p)["kl_loss"] < losses["kl_loss"]


def test_invalid_ppo_settings_fail_clearly():
    with pytest.raises(ValueError, match="clip_range=-0.1"):
        PPORLHF(clip_range=-0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPORLHF(kl_estimator="k2")
    with pytest.raises(ValueError, match="kl_loss_coef=-1"):
        PPORLHF(kl_loss_coef=-1.0)
    with pytest.raises(ValueError, match="LoRA"):
        CausalLMSFT(lm=LMSettings(load_in_4bit=True))


def _fit(module, datamodule, root, **trainer_kwargs):
    trainer_kwargs.setdefault("logger", False)
    trainer = Trainer(enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_ppo_trains_only_the_adapter_and_value_head(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, target_kl=None)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = _fit(module, prompts, tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=False)
    assert trainer.global_step == 3
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    moved = [n for n, p in module.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("lora_" in n for n in moved) and any("value_head" in n for n in moved)


def test_non_finite_rewards_roll_back_and_stop(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, max_rollbacks=3)
    with torch.no_grad():
        module.reward_model.head.linear.bias.fill_(float("nan"))
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with pytest.raises(FloatingPointError, match="3 rolled-back iterations in a row"):
        _fit(module, prompts, tmp_path, max_steps=10, limit_val_batches=0, enable_checkpointing=False)
    assert all(torch.equal(p, start[n]) for n, p in module.named_parameters() if p.requires_grad)


def test_train_rollbacks_counts_the_rolled_back_iterations_before_an_accepted_update(prompts, tmp_path, monkeypatch):
    module = _ppo(prompts, lora_r=4, target_kl=None)
    start, logged, log = module._start_iteration, [], module.log
    calls = iter(range(1000))

    def start_iteration(batch):  # the first rollout is rolled back, the others are accepted
        accepted = start(batch)
        if next(calls) == 0:
            module._rollback("test")
            return False
        return accepted

    monkeypatch.setattr(module, "_start_iteration", start_iteration)
    monkeypatch.setattr(module, "log", lambda name, value, *a, **k: logged.append(float(value)) if name ==
                        "train/rollbacks" else log(name, value, *a, **k))
    _fit(module, prompts, tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    assert logged == [1.0, 0.0] and int(module.rollback_count) == 1


def test_reward_model_logs_its_training_accuracy_every_step(cache, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    data = PreferenceDataModule(**DATA, tokenizer_cache=cache, batch_size=8)
    module = PairwiseRewardModel(lm=LMSettings(**TINY))
    module.build(data.tokenizer)
    _fit(module, data, tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False, log_every_n_steps=1,
         logger=CSVLogger(tmp_path))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    accuracy = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(accuracy) == 2 and all(a in (i / 8 for i in range(9)) for a in accuracy)  # a share of 8 pairs


class _SpikeAfterFirstIteration(Callback):
    """Pushes the adapter far from the reference once the first iteration is done, and records the rollback."""

    def __init__(self, steps_per_iteration: int) -> None:
        self.steps_per_iteration, self.coef_before, self.after_rollback = steps_per_iteration, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.steps_per_iteration and self.coef_before is None:
            self.coef_before = float(module.kl_coef_value)
            with torch.no_grad():
                for name, p in module.lm.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=5.0)
        elif int(module.rollback_count) == 1 and self.after_rollback is None:
            self.after_rollback = ({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
                                   float(module.kl_coef_value), trainer.global_step)


def test_kl_guard_rejects_a_spiking_rollout_restores_the_last_accepted_policy_and_doubles_the_coefficient(
        prompts, tmp_path):
    # k3 is non-negative per token, so the spike's KL estimate cannot come out below the guard by sampling noise.
    module = _ppo(prompts, lora_r=4, target_kl=None, kl_estimator="k3", max_kl=0.01)  # 2 steps per iteration
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    spike = _SpikeAfterFirstIteration(steps_per_iteration=2)
    trainer = _fit(module, prompts, tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False,
                   callbacks=[spike])
    params, coef, step = spike.after_rollback
    assert step == 2  # the rejected rollout took no optimiser step
    # The last accepted rollout was the first one, sampled by the starting weights: everything since is undone.
    assert all(torch.equal(p, start[n]) for n, p in params.items())
    # The controller moved the coefficient after the first rollout; the guard doubled it from there.
    assert coef == pytest.approx(2 * spike.coef_before)
    assert trainer.global_step == 4 and int(module.rollback_count) == 1  # training went on from there


class _SpikeAtTheLastStep(Callback):
    """Records the trainable weights when the last iteration starts, then pushes the adapter far from the
    reference after the run's last optimiser step, which no rollout of the run samples."""

    def __init__(self, last_iteration_step: int, last_step: int) -> None:
        self.last_iteration_step, self.last_step, self.at_last_iteration = last_iteration_step, last_step, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.last_iteration_step:
            self.at_last_iteration = {n: p.detach().clone() for n, p in module._trainable_state().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.last_step:
            with torch.no_grad():
                for name, p in module.lm.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=5.0)


def test_a_policy_out_of_band_at_the_end_of_an_epoch_returns_to_the_last_accepted_one(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, target_kl=None, kl_estimator="k3", max_kl=0.01)  # 2 steps per iteration
    spike = _SpikeAtTheLastStep(last_iteration_step=2, last_step=4)
    _fit(module, prompts, tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False, callbacks=[spike])
    # The run ends with the policy that sampled the last accepted rollout, not with the spiked one.
    assert int(module.rollback_count) == 1
    assert all(torch.equal(p, spike.at_last_iteration[n]) for n, p in module._trainable_state().items())


def test_a_policy_in_band_at_the_end_of_an_epoch_is_kept(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, target_kl=None, kl_estimator="k3", max_kl=0.01)
    _fit(module, prompts, tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False)
    assert int(module.rollback_count) == 0


class _SpikeAfterStep(Callback):
    """Pushes the adapter far from the reference after one optimiser step."""

    def __init__(self, step: int) -> None:
        self.step, self.done = step, False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:  # once: a rejected step leaves global_step as it is
            self.done = True
            with torch.no_grad():
                for name, p in module.lm.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=5.0)


def test_an_update_that_leaves_the_band_mid_iteration_is_rejected_before_the_policy_samples(prompts, tmp_path,
                                                                                            monkeypatch):
    module = _ppo(prompts, lora_r=4, target_kl=None, kl_estimator="k3", max_kl=0.01)  # 2 steps per iteration
    rollout_kls, collect = [], module.collect
    monkeypatch.setattr(module, "collect", lambda batch: rollout_kls.append(float((out := collect(batch))["kl"]
                                                                                  .mean())) or out)
    # The spike comes after the iteration's first update; its second minibatch estimates the spiked policy's KL.
    with pytest.warns(UserWarning, match="estimated KL .* of the updated policy > max_kl"):
        _fit(module, prompts, tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False,
             callbacks=[_SpikeAfterStep(1)])
    assert int(module.rollback_count) == 1
    # Rollouts: the first, one from the restored policy, and the epoch end's; none sampled by the spiked policy.
    assert len(rollout_kls) == 3 and max(rollout_kls) <= 0.01


def test_kl_guard_raises_the_coefficient_at_most_to_ten_times_its_initial_value(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, target_kl=None, kl_estimator="k3", max_kl=0.01, kl_coef=0.2)
    module.kl_coef_value.fill_(1.5)  # as if earlier spikes had raised it already
    spike = _SpikeAfterFirstIteration(steps_per_iteration=2)
    _fit(module, prompts, tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False, callbacks=[spike])
    assert spike.coef_before > 1.0 and spike.after_rollback[1] == pytest.approx(2.0)  # not 2 x 1.5


def test_kl_guard_backs_off_one_accepted_rollout_per_rejection_in_a_row_then_stops_training(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, max_kl=1.0, max_rollbacks=3)
    trainer = _fit(module, prompts, tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    opt_state = module.optimizers().optimizer.state_dict()
    # Three accepted policies, oldest first, told apart by their adapter weights.
    history = [({n: torch.full_like(p, float(i)) for n, p in module._trainable_state().items()}, opt_state)
               for i in range(3)]
    module._accepted.clear()
    module._accepted.extend(history)
    module.rollbacks, trainer.should_stop = 0, False

    def restored() -> float:
        return float(next(p for n, p in module._trainable_state().items() if "lora_B" in n).flatten()[0])

    module._rollback("spike", back_off=True)
    assert restored() == 2.0 and not trainer.should_stop  # first rejection: the last accepted policy
    module._rollback("spike", back_off=True)
    assert restored() == 1.0 and not trainer.should_stop  # it sampled a rejected rollout too: one further back
    module._rollback("spike", back_off=True)
    assert restored() == 0.0 and trainer.should_stop  # max_rollbacks in a row: stop there, without an error


def test_invalid_kl_guard_fails_clearly():
    with pytest.raises(ValueError, match="max_kl=0"):
        PPORLHF(max_kl=0)


def test_sft_lowers_perplexity(cache, tmp_path):
    torch.manual_seed(0)
    data = TextCorpusDataModule(**DATA, tokenizer_cache=cache, batch_size=16, eval_batch_size=64)
    sft = CausalLMSFT(lm=LMSettings(**TINY), optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    sft.build(data.tokenizer)
    before = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        sft, datamodule=data, verbose=False)[0]["val/ppl"]
    _fit(sft, data, tmp_path, max_epochs=8, enable_checkpointing=False, limit_val_batches=0)
    after = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        sft, datamodule=data, verbose=False)[0]["val/ppl"]
    assert after < 0.2 * before


def test_phases_chain_through_checkpoints(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
              "--data.init_args.num_stories", "120", "--data.init_args.vocab_size", "320",
              "--data.init_args.tokenizer_cache", cache, *TINY_CLI]
    sft = main(["fit", "--config", str(REPO / "configs/rlhf/sft.yaml"), *common])
    sft_ckpt = sft.trainer.checkpoint_callback.last_model_path
    merged = load_phase_checkpoint(sft_ckpt)["merged_lm"]
    rm = main(["fit", "--config", str(REPO / "configs/rlhf/reward.yaml"), *common, "--trainer.max_steps", "0",
               "--model.init_args.init_from", sft_ckpt])
    # max_steps 0: the reward model's backbone is exactly the SFT model
    rm_state = rm.model.lm.state_dict()
    assert all(torch.equal(rm_state[k], v) for k, v in merged.items())
    rm = main(["fit", "--config", str(REPO / "configs/rlhf/reward.yaml"), *common, "--model.init_args.init_from",
               sft_ckpt])
    rm_ckpt = rm.trainer.checkpoint_callback.last_model_path
    ppo = main(["fit", "--config", str(REPO / "configs/rlhf/ppo.yaml"), *common, "--model.init_args.init_from",
                sft_ckpt, "--model.init_args.reward_model_from", rm_ckpt, "--model.init_args.max_new_tokens", "8",
                "--data.init_args.eval_batch_size", "8"])
    head = load_phase_checkpoint(rm_ckpt)["reward_head"]
    assert torch.equal(ppo.model.reward_model.head.linear.weight, head["linear.weight"])
    with ppo.model.lm.disable_adapter():  # the reference is the SFT model
        ref = ppo.model.lm.state_dict()
    assert all(torch.equal(ref[k.replace("model.", "base_model.model.model.", 1)
                               if f"base_model.model.{k}" not in ref else f"base_model.model.{k}"], v)
               for k, v in merged.items() if "proj" not in k)
    metrics = ppo.trainer.validate(ppo.model, datamodule=ppo.datamodule, verbose=False)[0]
    assert 0.0 <= metrics["val/win_rate"] <= 1.0 and metrics["val/kl"] >= 0.0
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        PairwiseRewardModel(init_from="missing.ckpt").build(PreferenceDataModule(**DATA, tokenizer_cache=cache)
                                                             .tokenizer)


def test_ppo_checkpoint_is_small_and_resumes(prompts, tmp_path):
    module = _ppo(prompts, lora_r=4, kl_target=0.5, kl_horizon=10)
    trainer = _fit(module, prompts, tmp_path, max_steps=2, limit_val_batches=0)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any(k.startswith("reward_model.") for k in saved["state_dict"])  # rebuilt from its own checkpoint
    coef = saved["state_dict"]["kl_coef_value"]
    assert coef != 0.2  # the controller moved it (KL 0 < target: down)
    resumed = _ppo(prompts, lora_r=4, kl_target=0.5, kl_horizon=10)
    lora = {k: v for k, v in saved["state_dict"].items() if "lora_" in k}
    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["coef"] = pl_module.kl_coef_value.clone()
            seen["lora"] = {k: v.clone() for k, v in pl_module.state_dict().items() if "lora_" in k}

    trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_val_batches=0, enable_checkpointing=False,
                      callbacks=[AtStart()])
    trainer.fit(resumed, datamodule=prompts, ckpt_path=ckpt)
    assert trainer.global_step == 3
    assert torch.equal(seen["coef"], coef)  # the controller's state came back
    assert seen["lora"].keys() == lora.keys() and all(torch.equal(seen["lora"][k], v) for k, v in lora.items())


def test_evaluation_kl_is_zero_for_the_reference_and_positive_after_updates(prompts):
    module = _ppo(prompts, lora_r=4, eval_temperature=0.7)
    batch = next(iter(prompts.test_dataloader()))
    out = module.compare(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out["kl"], torch.zeros_like(out["kl"]))
    assert torch.equal(out["reward"], out["reward_ref"])  # same weights, same seed: the same samples
    with torch.no_grad():
        for name, p in module.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = module.compare(batch, torch.Generator().manual_seed(0))
    assert out["kl"].mean() > 0  # an estimate of KL(policy || reference) at the evaluation temperature


@pytest.mark.parametrize(("kl_target", "in_band"), [(None, True), (2.0, False), (2.5, True)])
def test_validation_win_rate_in_band_is_the_win_rate_only_while_the_kl_is_not_above_the_band(prompts, cache,
                                                                                             kl_target, in_band):
    module = _ppo(prompts, lora_r=4, kl_target=kl_target)
    data = PromptDataModule(**DATA, tokenizer_cache=cache, batch_size=8, eval_batch_size=4)

    def compare(batch, generator=None):  # per 4 prompts: a win, a tie, two losses; sequence KL 2.8 or 3.0
        n = len(batch["prompt_ids"])
        assert n % 4 == 0
        reward = torch.tensor([1.0, 0.0, -1.0, -1.0]).repeat(n // 4)
        kl = torch.tensor([2.8, 3.0]).repeat(n // 2)
        return {"reward": reward, "reward_ref": torch.zeros(n), "kl": kl, "length": torch.ones(n), "texts": [""] * n,
                "ref_texts": [""] * n}

    module.compare = compare
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/win_rate"] == pytest.approx(1.5 / 4) and metrics["val/kl"] == pytest.approx(2.9)
    assert metrics["val/win_rate_in_band"] == pytest.approx(1.5 / 4 if in_band else 0.0)  # band top: 1.2 x target


def test_ppo_test_perplexity_of_policy_and_reference_on_held_out_completions(prompts):
    module = _ppo(prompts, lora_r=4)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1)
    before = trainer.test(module, datamodule=prompts, verbose=False)[0]
    assert before["test/ppl"] == pytest.approx(before["test/ppl_ref"])  # LoRA B = 0: policy == reference
    # by hand: exp of the mean negative log-likelihood of the completion tokens under the reference
    batch = next(iter(prompts.test_dataloader()))
    pairs = [prompts.encode_pair(*prompts.prompt_and_completion(int(i))) for i in batch["index"]]
    nll = []
    with torch.no_grad():
        for p, c in pairs:
            logits = module.lm(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            nll.append(F.cross_entropy(logits, torch.tensor(c), reduction="none"))
    assert before["test/ppl_ref"] == pytest.approx(torch.cat(nll).mean().exp().item(), rel=1e-4)
    with torch.no_grad():
        for name, p in module.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    after = trainer.test(module, datamodule=prompts, verbose=False)[0]
    assert after["test/ppl_ref"] == pytest.approx(before["test/ppl_ref"])  # the reference did not move
    assert after["test/ppl"] != pytest.approx(after["test/ppl_ref"])


def test_ppo_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path, cache):
    tiny = ["--data.init_args.num_stories", "120", "--data.init_args.vocab_size", "320", "--data.init_args.batch_size",
            "16", "--data.init_args.tokenizer_cache", cache, "--model.init_args.minibatch_size", "4",
            "--model.init_args.max_new_tokens", "8", *TINY_CLI]
    saved = fit_on_two_processes("rlhf/ppo.yaml", tiny, tmp_path, max_steps=4)
    rank0, rank1 = saved["rank0.pt"], saved["rank1.pt"]
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the ranks took the same decisions and updates
    assert any("lora_B" in k and rank0[k].abs().sum() > 0 for k in rank0)  # and they did train (lora_B starts at 0)


def test_sft_ddp_on_two_cpu_processes_trains_different_shards_into_identical_ranks(tmp_path, cache):
    tiny = ["--data.init_args.num_stories", "120", "--data.init_args.vocab_size", "320", "--data.init_args.batch_size",
            "8", "--data.init_args.tokenizer_cache", cache, *TINY_CLI]
    saved = fit_on_two_processes("rlhf/sft.yaml", tiny, tmp_path, max_steps=3)
    load = saved.__getitem__
    start0, start1, end0, end1 = (load(f"{p}rank{k}.pt") for p in ("start_", "") for k in (0, 1))
    batch0, batch1 = load("batch_rank0.pt"), load("batch_rank1.pt")
    assert len(batch0["input_ids"]) == 4  # the global batch of 8 is shared between the two processes
    assert not torch.equal(batch0["input_ids"], batch1["input_ids"])  # each rank reads its own shard
    assert all(torch.equal(start0[k], start1[k]) for k in start0)  # the same initial weights
    assert end0.keys() == end1.keys() and all(torch.equal(end0[k], end1[k]) for k in end0)  # gradients all-reduced
    assert any(not torch.equal(end0[k], start0[k]) for k in end0)  # and it did train


SEED_MODELS = {"EleutherAI/pythia-70m-deduped", "EleutherAI/pythia-160m-deduped", "EleutherAI/pythia-410m-deduped",
               "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M"}
MODEL_OVERLAYS = sorted((REPO / "configs/rlhf/models").glob("*.yaml"))


def test_there_is_a_model_overlay_for_every_model_of_the_seed():
    import yaml

    names = {yaml.safe_load(p.read_text())["model"]["init_args"]["lm"]["model_name"] for p in MODEL_OVERLAYS}
    assert names == SEED_MODELS


@pytest.mark.parametrize("overlay", MODEL_OVERLAYS, ids=lambda p: p.stem)
def test_model_overlay_sets_model_and_tokenizer_of_every_phase(overlay, capsys):
    import yaml

    name = yaml.safe_load(overlay.read_text())["model"]["init_args"]["lm"]["model_name"]
    for phase in ("sft", "reward", "ppo", "dpo", "grpo"):
        base = yaml.safe_load((REPO / f"configs/rlhf/{phase}.yaml").read_text())
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(REPO / f"configs/rlhf/{phase}.yaml"), "--config", str(overlay),
                  "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["class_path"] == base["model"]["class_path"]  # the phase survives the overlay
        lm = config["model"]["init_args"]["lm"]
        assert lm["model_name"] == name == config["data"]["init_args"]["tokenizer"]
        assert lm["lora"]["r"] == 16
        assert config["data"]["init_args"]["num_stories"] == base["data"]["init_args"]["num_stories"]


def test_pythia_overlay_trains_a_lora_adapter_on_a_local_gpt_neox_folder(cache, tmp_path, monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = TextCorpusDataModule(**DATA, tokenizer_cache=cache).tokenizer
    folder = tmp_path / "pythia-like"
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    run = main(["fit", "--config", str(REPO / "configs/rlhf/sft.yaml"), "--config",
                str(REPO / "configs/rlhf/models/pythia-70m.yaml"), "--model.init_args.lm.model_name", str(folder),
                "--data.init_args.tokenizer", str(folder), "--data.init_args.num_stories", "120",
                "--trainer.fast_dev_run", "true"])
    trainable = {n: p for n, p in run.model.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen
    assert any("query_key_value" in n for n in trainable)  # "auto" found GPT-NeoX's attention projections
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trainable.items())  # the adapter trained
