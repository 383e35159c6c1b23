"""Every LM phase writes Hugging Face folders at the end of fit: the merged model + tokenizer and the adapter."""

import copy

import torch
from lightning.pytorch import Trainer

from datamodules.text_corpus import TextCorpusDataModule
from lightning_modules.sft import CausalLMSFT
from models.lm_factory import LMSettings, LoraSettings


def test_fit_exports_a_merged_model_and_an_adapter_that_reload_to_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = TextCorpusDataModule(num_stories=40, vocab_size=320, batch_size=8, tokenizer_cache=str(tmp_path / "tok"))
    torch.manual_seed(0)
    module = CausalLMSFT(lm=LMSettings(hidden_size=32, num_layers=1, num_heads=2, lora=LoraSettings(r=4)),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    module.build(data.tokenizer)
    copy.deepcopy(module.lm).unload().save_pretrained(tmp_path / "base")  # lora_B = 0: the base weights
    Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=data)
    ids = next(iter(data.val_dataloader()))["input_ids"][:4]
    module.lm.eval()
    with torch.no_grad():
        expected = module.lm(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "model").eval()
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "hf" / "adapter").eval()
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-5)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "base")(input_ids=ids).logits, expected,
                              atol=1e-3)  # the adapter trained
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf" / "model")
    assert tokenizer.get_vocab() == data.tokenizer.get_vocab()


def test_4bit_placement_follows_the_trainer_and_fsdp_is_refused(tmp_path):
    import pytest

    module = CausalLMSFT(lm=LMSettings(hidden_size=32, num_layers=1, num_heads=2, lora=LoraSettings(r=4),
                                       load_in_4bit=True))
    trainer = Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    module.trainer = trainer
    assert module._placement() == ("cpu", torch.bfloat16)  # quantised on the Trainer's device, bf16 compute

    class FSDPStrategy:  # stands for Lightning's: 4-bit weights cannot be sharded
        pass

    module._trainer = type("T", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(ValueError, match="load_in_4bit cannot be sharded by FSDPStrategy"):
        module._check_strategy_for_4bit()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    data = TextCorpusDataModule(num_stories=40, vocab_size=320, batch_size=8, tokenizer_cache=str(tmp_path / "tok"))
    batch = next(iter(data.val_dataloader()))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMSFT(lm=LMSettings(hidden_size=32, num_layers=2, num_heads=2, lora=LoraSettings(r=4),
                                           gradient_checkpointing=checkpointing))
        module.build(data.tokenizer)
        module.train()
        assert module.lm.is_gradient_checkpointing == checkpointing
        module.model_step(batch)[0].backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
