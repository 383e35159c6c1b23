"""The FSDP overlay: decoder layers as shard and checkpointing units, stacking on every LM config, and the refusals
(FSDP on CPU by Lightning; LoRA and 4-bit by the LM phases)."""

import pytest
import yaml
from lightning.pytorch import Trainer

from experiment.cli import main
from lightning_modules.sft import CausalLMSFT
from models.lm_factory import LMSettings, LoraSettings, build_causal_lm, build_tokenizer, decoder_layer_policy
from tests.conftest import REPO

FSDP = str(REPO / "configs/trainer/fsdp.yaml")
LM_CONFIGS = ["rlhf/sft.yaml", "rlhf/agentic_sft.yaml", "rlhf/reward.yaml", "rlhf/ppo.yaml",
              "early_experience/web_shop_il.yaml", "early_experience/web_shop_sr.yaml"]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-smollm3"])
def test_the_policy_picks_exactly_the_decoder_layers(tmp_path, arch):
    tokenizer = build_tokenizer([f"word {i}" for i in range(300)], vocab_size=300, cache_dir=tmp_path)
    model = build_causal_lm(arch, tokenizer, hidden_size=32, num_layers=3, num_heads=2)
    picked = [m for m in model.modules() if decoder_layer_policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert picked == list(model.model.layers)
    assert decoder_layer_policy(module=model, recurse=True, nonwrapped_numel=0)  # FSDP looks inside every module


def test_the_overlay_builds_an_fsdp_strategy_with_the_policy_for_wrapping_and_checkpointing():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy | str)
    config = parser.parse_object({"strategy": yaml.safe_load(open(FSDP))["trainer"]["strategy"]})
    strategy = parser.instantiate(config).strategy
    assert type(strategy) is FSDPStrategy and strategy.kwargs["auto_wrap_policy"] is decoder_layer_policy
    assert strategy._activation_checkpointing_kwargs == {"auto_wrap_policy": decoder_layer_policy}
    assert strategy._state_dict_type == "full"


@pytest.mark.parametrize("config", LM_CONFIGS)
def test_the_overlay_stacks_on_every_lm_config(in_tmp, capsys, config):
    base = yaml.safe_load((REPO / "configs" / config).read_text())
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / config), "--config", FSDP, "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    trainer = resolved["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", -1, "bf16-mixed")
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    policy = trainer["strategy"]["init_args"]["activation_checkpointing_policy"]
    assert policy == "models.lm_factory.decoder_layer_policy"
    if "model" in base:  # the experiment's own model survives the overlay
        assert resolved["model"]["class_path"] == base["model"]["class_path"]


def test_lightning_refuses_fsdp_on_cpu():
    with pytest.raises(ValueError, match=r"The strategy `fsdp` requires a GPU accelerator, but received "
                                         r"`accelerator='cpu'`"):
        Trainer(accelerator="cpu", devices=2, strategy="fsdp")


def test_lora_and_4bit_are_refused_under_fsdp():
    class FSDPStrategy:  # stands for Lightning's (which needs GPUs to be built)
        pass

    for lm, message in [(LMSettings(lora=LoraSettings()), "a LoRA adapter is not trained under FSDPStrategy"),
                        (LMSettings(lora=LoraSettings(), load_in_4bit=True), "load_in_4bit cannot be sharded")]:
        module = CausalLMSFT(lm=lm)
        module._trainer = type("T", (), {"strategy": FSDPStrategy()})()
        with pytest.raises(ValueError, match=message):
            module._build_lm(None)
