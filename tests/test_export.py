"""Every LM phase writes Hugging Face folders at the end of fit: the merged model + tokenizer and the adapter."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.text_corpus import TextCorpusDataModule
from experiment.cli import main
from lightning_modules.sft import CausalLMSFT
from models.lm_factory import LMSettings, LoraSettings
from tests.conftest import REPO


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


def _fit_cli(tmp_path, *overrides):
    from experiment.cli import main

    return main(["fit", "--config", str(REPO / "configs/rlhf/sft.yaml"), "--trainer.max_steps", "3",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path), "--data.init_args.num_stories", "40",
                 "--data.init_args.vocab_size", "320", "--data.init_args.tokenizer_cache", str(tmp_path / "tok"),
                 "--model.init_args.lm.hidden_size", "32", "--model.init_args.lm.num_layers", "1",
                 "--model.init_args.lm.num_heads", "2", "--model.init_args.export", "false", *overrides])


def test_export_subcommand_writes_the_folders_of_fit_from_a_checkpoint(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from experiment.cli import main

    fit = _fit_cli(tmp_path, "--model.init_args.lm.lora.r", "4", "--model.init_args.optimizer.init_args.lr", "0.05")
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    run = Path(ckpt).parent.parent
    assert not (run / "hf").exists()  # export false: nothing written at the end of fit
    written = main(["export", "--ckpt_path", ckpt])
    assert written == {"adapter": str(run / "hf" / "adapter"), "model": str(run / "hf" / "model")}
    lm = fit.model.lm.eval()
    ids = next(iter(fit.datamodule.val_dataloader()))["input_ids"][:4]
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(run / "hf" / "model")(input_ids=ids).logits,
                              expected, atol=1e-5)
        base = copy.deepcopy(lm).unload()  # the frozen base the adapter goes on
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the adapter trained
        adapted = PeftModel.from_pretrained(base, run / "hf" / "adapter").eval()
        assert torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-5)
    assert set(main(["export", "--ckpt_path", ckpt, "--output", str(tmp_path / "elsewhere")])) == {"adapter", "model"}
    assert (tmp_path / "elsewhere" / "model" / "tokenizer.json").exists()


def test_export_of_a_checkpoint_that_is_not_an_lm_phase_is_one_line(tmp_path):
    ckpt = tmp_path / "tool_agent.ckpt"
    torch.save({"module_class": "lightning_modules.tool_agent.ToolAgentA2C", "state_dict": {}}, ckpt)
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "export", "--ckpt_path", str(ckpt)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"Error: ValueError: '{ckpt}' was written by lightning_modules.tool_agent.ToolAgentA2C, not by an LM phase: "
        "export takes the checkpoint of an SFT, reward-model, PPO, GRPO, DPO, pretraining or early-experience run  "
        "(--debug shows the traceback)"]


def test_export_without_a_checkpoint_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--output", "somewhere"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "Error: ckpt_path: required: the checkpoint of an LM phase to export")
