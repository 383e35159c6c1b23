"""Resume from a checkpoint taken at any step (mid-epoch, across an epoch end, mid PPO iteration) equals the
uninterrupted run, exactly, on one CPU process."""

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.text_corpus import PromptDataModule, TextCorpusDataModule
from lightning_modules.ppo import PPORLHF
from lightning_modules.sft import CausalLMSFT
from models.lm_factory import LMSettings, LoraSettings
from tests.conftest import TINY

DATA = dict(num_stories=60, vocab_size=320)


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _run(make, data, folder, max_steps, save_at=None, ckpt_path=None):
    torch.manual_seed(0)
    module = make()
    module.build(data.tokenizer)
    callbacks = [ModelCheckpoint(dirpath=folder, every_n_train_steps=save_at, save_top_k=-1, filename="{step}")] \
        if save_at else []
    trainer = Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, enable_checkpointing=bool(save_at),
                      callbacks=callbacks, default_root_dir=folder)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def _check_resume(make, data, tmp_path, stop, total):
    straight = _weights(_run(make, data, tmp_path / "straight", total))
    _run(make, data, tmp_path / "first", stop, save_at=stop)
    checkpoint = tmp_path / "first" / f"step={stop}.ckpt"
    resumed = _weights(_run(make, data, tmp_path / "resumed", total, ckpt_path=checkpoint))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TextCorpusDataModule(**DATA, batch_size=8, tokenizer_cache=str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("stop", [3, 8], ids=["mid_epoch", "after_an_epoch_end"])  # 6 batches per epoch
def test_sft_resume_equals_the_uninterrupted_run(corpus, tmp_path, stop):
    assert len(corpus.train_dataloader()) == 6
    _check_resume(lambda: CausalLMSFT(lm=LMSettings(**TINY)), corpus, tmp_path, stop, 10)


def test_ppo_resume_mid_iteration_equals_the_uninterrupted_run(tmp_path):
    prompts = PromptDataModule(**DATA, batch_size=8, eval_batch_size=4, tokenizer_cache=str(tmp_path / "tok"))

    def make():
        return PPORLHF(lm=LMSettings(**TINY, lora=LoraSettings(r=4, alpha=32.0)), max_new_tokens=6, minibatch_size=4,
                       ppo_epochs=1, target_kl=None)

    _check_resume(make, prompts, tmp_path, 3, 6)  # iterations of 2 steps: step 3 is inside the second
