"""The shared guards: non-finite updates skipped and rolled back, non-finite checkpoints never written or read,
checkpoints of another class refused, unreadable checkpoints named."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from datamodules.agentic_demos import AgenticDemoDataModule
from datamodules.early_experience import EarlyExperienceDataModule
from datamodules.text_corpus import PreferenceDataModule, PreferencePromptDataModule, TextCorpusDataModule
from lightning_modules.dpo import DPO
from lightning_modules.early_experience import EarlyExperienceAgent
from lightning_modules.guarded import NonFiniteGuard
from lightning_modules.lm_phase import load_phase_checkpoint
from lightning_modules.reward_model import PairwiseRewardModel
from lightning_modules.sft import AgenticSFT, CausalLMSFT
from models.lm_factory import LMSettings
from tests.helpers import InjectNaN

TINY = LMSettings(hidden_size=32, num_layers=1, num_heads=2)
DATA = dict(num_stories=120, vocab_size=320, batch_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return TextCorpusDataModule(**DATA, tokenizer_cache=str(tmp_path_factory.mktemp("tok")))


def _sft(data):
    torch.manual_seed(0)
    module = CausalLMSFT(lm=TINY)
    module.build(data.tokenizer)
    return module


def _trainer(tmp_path, *callbacks, **kwargs):
    # The injector runs before the module's guard (a module's callbacks come after the Trainer's).
    kwargs = {"max_steps": 6, "logger": False, "limit_val_batches": 0} | kwargs
    return Trainer(enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=list(callbacks), **kwargs)


def test_a_nan_weight_is_rolled_back_and_training_continues(data, tmp_path):
    module = _sft(data)
    trainer = _trainer(tmp_path, InjectNaN({3}), enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert trainer.global_step == 6 and guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_steps_in_a_row_stop_with_a_clear_error(data, tmp_path):
    module = _sft(data)
    with pytest.raises(FloatingPointError, match="5 updates in a row had non-finite weights"):
        _trainer(tmp_path, InjectNaN(set(range(1, 20))), enable_checkpointing=False).fit(module, datamodule=data)


def test_non_finite_gradients_skip_the_update(data, tmp_path):
    class NaNGrad(Callback):
        def on_after_backward(self, trainer, module):
            if trainer.global_step == 2:
                next(p for p in module.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")

    module = _sft(data)
    before = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 2:
                before.update({n: p.detach().clone() for n, p in module.named_parameters()})

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if before and "after" not in before:
                before["after"] = {n: p.detach().clone() for n, p in module.named_parameters()}

    _trainer(tmp_path, NaNGrad(), Record(), enable_checkpointing=False, max_steps=4).fit(module, datamodule=data)
    after = before.pop("after")
    assert all(torch.equal(after[n], before[n]) for n in before)  # the step with an infinite gradient changed nothing


def test_a_non_finite_checkpoint_is_never_written(data, tmp_path):
    module = _sft(data)
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] = float("nan")
    trainer = _trainer(tmp_path, max_steps=0)
    trainer.strategy.connect(module)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_init_from_refuses_unreadable_and_non_finite_checkpoints(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.ckpt.*not a readable checkpoint"):
        load_phase_checkpoint(str(tmp_path / "empty.ckpt"))
    torch.save({"merged_lm": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match="nan.ckpt.*non-finite"):
        load_phase_checkpoint(str(tmp_path / "nan.ckpt"))


def test_resuming_with_a_checkpoint_of_another_phase_is_refused(data, tmp_path):
    module = _sft(data)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=data)
    sft_checkpoint = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    pairs = PreferenceDataModule(**DATA, tokenizer_cache=str(tmp_path / "tok"))
    reward = PairwiseRewardModel(lm=TINY)
    reward.build(pairs.tokenizer)
    with pytest.raises(ValueError, match="written by lightning_modules.sft.CausalLMSFT, not by .*PairwiseRewardModel"):
        _trainer(tmp_path / "rm", max_steps=2).fit(reward, datamodule=pairs, ckpt_path=sft_checkpoint)


# --- every LM LightningModule -----------------------------------------------------------------------------------
def _reward_model(folder):
    data = PreferenceDataModule(**DATA, tokenizer_cache=folder)
    return PairwiseRewardModel(lm=TINY), data


def _dpo(folder):
    data = PreferencePromptDataModule(**DATA, tokenizer_cache=folder)
    return DPO(lm=TINY, max_new_tokens=4), data


def _agentic_sft(folder):
    data = AgenticDemoDataModule(num_train_tasks=40, num_eval_tasks=4, vocab_size=320, batch_size=8,
                                 tokenizer_cache=folder)
    return AgenticSFT(lm=TINY, max_new_tokens=4), data


def _early_experience(folder):
    data = EarlyExperienceDataModule(env="tiny_shop", train_goals=12, eval_goals=2, batch_size=4, vocab_size=320,
                                     tokenizer_cache=folder)
    return EarlyExperienceAgent(lm=TINY, evaluate_before_training=False), data


@pytest.mark.parametrize("make", [_reward_model, _dpo, _agentic_sft, _early_experience],
                         ids=["reward_model", "dpo", "agentic_sft", "early_experience"])
def test_every_lm_module_rolls_back_a_nan_weight_and_goes_on(make, tmp_path):
    torch.manual_seed(0)
    module, data = make(str(tmp_path / "tok"))
    module.build(data.tokenizer)
    trainer = _trainer(tmp_path, InjectNaN({3}), enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert trainer.global_step == 6 and guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
