"""DPO: the loss and its gradient against hand computations, the logged pair metrics, one step raising the margin,
the same pairs as the reward model, and the config."""

import math

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from datamodules.text_corpus import PreferenceDataModule, PreferencePromptDataModule
from experiment.cli import main
from lightning_modules.dpo import DPO, dpo_loss
from models.lm_factory import LMSettings, LoraSettings
from models.lm_text import IGNORE_INDEX
from tests.conftest import REPO, TINY
from tests.conftest import TINY_STORIES as DATA
from tests.test_configs import class_defaults, differences


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("tokenizers"))
    return PreferencePromptDataModule(**DATA, tokenizer_cache=cache, batch_size=8, eval_batch_size=4)


def _dpo(data, lora_r: int | None = 4, **kwargs) -> DPO:
    module = DPO(lm=LMSettings(**TINY, lora=LoraSettings(r=lora_r, alpha=32.0) if lora_r else None),
                 max_new_tokens=8, **kwargs)
    module.build(data.tokenizer)
    return module


# --- math -----------------------------------------------------------------------------------------------------
def test_dpo_loss_and_rewards_match_a_hand_computation():
    # log-prob sums: policy chosen -5, rejected -7; reference chosen -6, rejected -6.5
    loss, chosen, rejected = dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]),
                                      torch.tensor([-6.5]), beta=0.1)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.05)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)))  # -log sigmoid(0.1 * (1 + 0.5))


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected_log_prob():
    policy_chosen, policy_rejected = torch.tensor([-5.0, -9.0], requires_grad=True), torch.tensor(
        [-7.0, -4.0], requires_grad=True)
    loss, _, _ = dpo_loss(policy_chosen, policy_rejected, torch.tensor([-6.0, -8.0]), torch.tensor([-6.5, -5.0]),
                          beta=0.5)
    loss.sum().backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # descent: chosen up, rejected down
    z = 0.5 * ((-9.0 + 8.0) - (-4.0 + 5.0))  # second pair: d loss / d chosen = -beta * sigmoid(-z)
    assert policy_chosen.grad[1].item() == pytest.approx(-0.5 / (1 + math.exp(z)))


def test_label_smoothing_mixes_the_loss_of_the_flipped_label():
    args = (torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.5]))
    loss, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    z = 0.15
    assert loss.item() == pytest.approx(0.8 * math.log(1 + math.exp(-z)) + 0.2 * math.log(1 + math.exp(z)))
    equal = (torch.zeros(1),) * 4
    assert dpo_loss(*equal, beta=0.1, label_smoothing=0.3)[0].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        DPO(beta=0.0)
    with pytest.raises(ValueError, match="sft_weight"):
        DPO(sft_weight=-1.0)


# --- data -----------------------------------------------------------------------------------------------------
def test_pairs_are_the_reward_models_split_into_a_shared_prompt_and_completion_only_labels(pairs):
    same = PreferenceDataModule(**DATA, tokenizer_cache=pairs.hparams.tokenizer_cache).pairs("train")
    prompted = pairs.prompted_pairs("train")
    assert [(f"{p} {c}".strip(), f"{p} {r}".strip()) for p, c, r in prompted] == same
    assert sum(p != "" for p, _, _ in prompted) > 0.7 * len(prompted)  # empty only where a shuffle moved the opening
    batch = pairs.collate(pairs.items("train")[:3])
    items = pairs.items("train")[:3]
    n_labelled = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert n_labelled == [len(c) for _, c, _ in items] + [len(r) for _, _, r in items]  # chosen rows, then rejected


# --- the module -----------------------------------------------------------------------------------------------
def test_logged_pair_metrics_match_a_hand_example(pairs):
    module = _dpo(pairs, beta=0.5, sft_weight=0.0)  # plain DPO: the loss is the hand example's

    def pair_logprobs(batch):  # 4 pairs: policy log-ratios chosen [1, 0, -1, 2], rejected [0, 0, 1, -2]
        assert len(batch["input_ids"]) == 8
        return torch.tensor([1.0, 0.0, -1.0, 2.0, 0.0, 0.0, 1.0, -2.0]), torch.zeros(8)

    def compare(batch, generator=None):
        n = len(batch["prompt_ids"])
        return {"reward": torch.ones(n), "reward_ref": torch.zeros(n), "kl": torch.zeros(n), "length": torch.ones(n),
                "texts": [""] * n, "ref_texts": [""] * n}

    module.pair_logprobs, module.compare = pair_logprobs, compare
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    metrics = trainer.validate(module, datamodule=pairs, verbose=False)[0]
    chosen, rejected = torch.tensor([0.5, 0.0, -0.5, 1.0]), torch.tensor([0.0, 0.0, 0.5, -1.0])
    assert metrics["val/rewards/chosen"] == pytest.approx(0.25) and metrics["val/rewards/rejected"] == pytest.approx(
        -0.125)
    assert metrics["val/rewards/margin"] == pytest.approx(0.375)
    assert metrics["val/rewards/accuracy"] == pytest.approx(0.5)  # a tie is not a correct pair
    assert metrics["val/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(chosen - rejected).mean().item())
    assert metrics["val/win_rate"] == 1.0 and metrics["val/gold_win_rate"] == 0.5  # the evaluation of PolicyRL


@pytest.mark.parametrize("lora_r", [4, None], ids=["lora", "full"])
def test_one_dpo_step_raises_the_margin_and_leaves_the_reference(pairs, lora_r):
    module = _dpo(pairs, lora_r=lora_r, beta=0.1, sft_weight=0.0)
    batch = next(iter(pairs.train_dataloader()))
    with torch.no_grad():
        _, chosen, rejected, _ = module.model_step(batch)
        reference_before = module.pair_logprobs(batch)[1]
    assert torch.equal(chosen, torch.zeros_like(chosen)) and torch.equal(rejected, torch.zeros_like(rejected))
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5 if lora_r else 0.05)
    loss, _, _, _ = module.model_step(batch)
    loss.mean().backward()
    optimizer.step()
    with torch.no_grad():
        loss_after, chosen, rejected, _ = module.model_step(batch)
        reference_after = module.pair_logprobs(batch)[1]
    assert (chosen - rejected).mean() > 0 and loss_after.mean() < loss.mean()
    assert torch.equal(reference_after, reference_before)  # the SFT model (adapter off / frozen copy) did not move


def test_dpo_config_parses_and_holds_the_class_defaults(capsys):
    path = REPO / "configs/rlhf/dpo.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"] == "lightning_modules.dpo.DPO"
    assert resolved["data"]["class_path"] == "datamodules.text_corpus.PreferencePromptDataModule"
    config = yaml.safe_load(path.read_text())
    assert differences(config["model"]["init_args"], class_defaults(DPO), "model.") == []
    assert differences(config["data"]["init_args"], class_defaults(PreferencePromptDataModule), "data.") == []
    assert resolved["model"]["init_args"]["beta"] == DPO().hparams.beta == 0.1



def _chosen_rise_after_one_step(pairs, batch, sft_weight: float) -> float:
    """Mean change of the chosen completions' summed log-prob after one SGD step from a fresh LoRA (seed 0)."""
    torch.manual_seed(0)
    module = _dpo(pairs, beta=0.1, sft_weight=sft_weight)
    with torch.no_grad():
        before = module.pair_logprobs(batch)[0].chunk(2)[0]
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    module.model_step(batch)[0].mean().backward()
    optimizer.step()
    with torch.no_grad():
        return (module.pair_logprobs(batch)[0].chunk(2)[0] - before).mean().item()


def test_sft_weight_adds_the_chosen_per_token_nll_and_its_gradient_raises_the_chosen_likelihood(pairs):
    module = _dpo(pairs, beta=0.1, sft_weight=0.5)
    batch = next(iter(pairs.train_dataloader()))
    with torch.no_grad():
        policy, reference = module.pair_logprobs(batch)
        loss, _, _, nll = module.model_step(batch)
    chosen_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)[: len(policy) // 2]
    plain = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=0.1)[0]
    assert torch.allclose(nll, -policy.chunk(2)[0] / chosen_tokens)  # by hand: summed log-prob / its tokens
    assert torch.allclose(loss, plain + 0.5 * nll, atol=1e-6)
    # the NLL term's gradient adds to DPO's: the same first step raises the chosen likelihood more with it
    assert _chosen_rise_after_one_step(pairs, batch, 1.0) > _chosen_rise_after_one_step(pairs, batch, 0.0)
