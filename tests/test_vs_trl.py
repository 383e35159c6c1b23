"""bench/vs_trl.py's pure parts, without TRL: TRL's configs get our numbers, the speed ratio and the last line, the
rollout rate, and one gold-judge reward for both sides."""

import inspect
import math
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import vs_trl  # noqa: E402

from lightning_modules.dpo import DPO  # noqa: E402
from lightning_modules.grpo import GRPO  # noqa: E402
from lightning_modules.ppo import PPORLHF  # noqa: E402


def defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}


def trl_updates_per_rollout(kwargs: dict) -> int:
    """What TRL's GRPO / RLOO do: one optimiser step per minibatch of the generation batch, ``num_iterations``
    passes."""
    return kwargs["generation_batch_size"] // kwargs["per_device_train_batch_size"] * kwargs["num_iterations"]


def test_trl_grpo_gets_our_grpo_numbers():
    s = vs_trl.config_settings("grpo")
    ours = defaults(GRPO)
    assert (s["group_size"], s["ppo_epochs"], s["minibatch_size"]) == (ours["group_size"], ours["ppo_epochs"],
                                                                       ours["minibatch_size"]) == (4, 2, 32)
    trl = vs_trl.trl_config("grpo", s, updates=12, seed=3)
    assert trl["num_generations"] == 4 and trl["generation_batch_size"] == 16 * 4  # 16 prompts x 4 samples
    assert trl["per_device_train_batch_size"] == 32 and trl["num_iterations"] == 2 and trl["max_steps"] == 12
    assert trl_updates_per_rollout(trl) == vs_trl.updates_per_rollout(s) == 4
    assert (trl["learning_rate"], trl["adam_epsilon"], trl["weight_decay"]) == (2.5e-4, 1e-5, 0.0)
    assert (trl["beta"], trl["epsilon"], trl["max_grad_norm"]) == (ours["kl_coef"], ours["clip_range"],
                                                                   ours["max_grad_norm"]) == (0.2, 0.2, 0.5)
    assert (trl["max_completion_length"], trl["temperature"], trl["top_k"], trl["top_p"]) == (96, 1.0, 0, 1.0)
    # ours averages the loss over the minibatch's tokens and scales by the group's std; fp32 on the CPU, no schedule
    assert trl["loss_type"] == "bnpo" and trl["scale_rewards"] == "group"
    assert trl["use_cpu"] and not trl["bf16"] and not trl["gradient_checkpointing"]
    assert trl["lr_scheduler_type"] == "constant" and trl["seed"] == 3 and trl["gradient_accumulation_steps"] == 1


def test_trl_rloo_stands_in_for_ppo_with_the_same_rollout_and_updates():
    s = vs_trl.config_settings("ppo")
    trl = vs_trl.trl_config("ppo", s, updates=8, seed=0)
    assert vs_trl.rollout_size(s) == trl["generation_batch_size"] == 64  # 64 prompts x 1 = 32 prompts x 2
    assert trl["num_generations"] == vs_trl.RLOO_GROUP == 2
    assert trl_updates_per_rollout(trl) == vs_trl.updates_per_rollout(s) == 4
    assert (trl["beta"], trl["epsilon"]) == (defaults(PPORLHF)["kl_coef"], defaults(PPORLHF)["clip_range"])
    assert trl["normalize_advantages"] and "loss_type" not in trl
    # the reward both sides optimise is the gold score as it is: ours neither clips it nor penalises a missing EOS
    assert vs_trl.ours_settings("ppo", s) == {"reward_clip": vs_trl.NO_CLIP, "missing_eos_penalty": None}


def test_trl_dpo_gets_our_dpo_numbers():
    s = vs_trl.config_settings("dpo") | {"max_length": 128}
    trl = vs_trl.trl_config("dpo", s, updates=20, seed=0)
    assert (trl["beta"], trl["label_smoothing"]) == (defaults(DPO)["beta"], defaults(DPO)["label_smoothing"])
    assert (trl["per_device_train_batch_size"], trl["learning_rate"], trl["max_grad_norm"]) == (32, 5e-4, 1.0)
    assert trl["loss_type"] == ["sigmoid", "sft"] and trl["loss_weights"] == [1.0, defaults(DPO)["sft_weight"]]
    assert trl["max_length"] == 128 and trl["truncation_mode"] == "keep_start"
    assert trl["adam_epsilon"] == 1e-8 and not trl["precompute_ref_log_probs"]  # torch's AdamW eps, as ours
    assert vs_trl.ours_settings("dpo", s) == {}


def test_speed_ratio_is_trl_over_ours_and_nan_without_both():
    assert vs_trl.speed_ratio(3.0, 1.5) == 2.0  # TRL takes twice as long per update: we are 2x faster
    for trl, ours in ((0.0, 1.0), (1.0, float("nan")), (float("inf"), 1.0)):
        assert math.isnan(vs_trl.speed_ratio(trl, ours))


def test_the_last_line_reports_ratios_and_mean_gold_win_rates():
    side = lambda s, g: {"seconds_per_update": s, "gold_win_rate": g}  # noqa: E731
    results = {"grpo": {"ours": side(0.5, 0.7), "trl": side(1.0, 0.4)},
               "dpo": {"ours": side(0.2, 0.5), "trl": side(0.1, 0.6)}}
    assert vs_trl.summary_line(results) == ("vs_trl: ppo_speed_ratio=nan grpo_speed_ratio=2.000 "
                                            "dpo_speed_ratio=0.500 gold_ours=0.600 gold_trl=0.500")


def test_rollout_rate_leaves_out_the_first_rollout():
    assert vs_trl.rate([(100, 10.0), (300, 1.0), (100, 1.0)]) == 200.0
    assert math.isnan(vs_trl.rate([(100, 1.0)]))


@pytest.fixture(scope="module")
def stories():
    from datamodules.text_corpus import PromptDataModule

    return PromptDataModule(num_stories=40)


def test_both_sides_get_the_same_gold_reward(stories):
    tok = stories.tokenizer
    index = stories.split("train")[:2]
    prompts = [stories.prompt_and_completion(i)[0] for i in index]
    clean = [stories.encode_completion(stories.prompt_and_completion(i)[1]) for i in index]
    broken = [clean[0], tok(" Once upon a bear.", add_special_tokens=False).input_ids + [tok.eos_token_id]]
    trl = vs_trl.trl_gold_reward(tok)([f"<bos> {p}" for p in prompts], completion_ids=broken)
    # ours: the judge as the reward model, on left-padded prompts then right-padded responses
    prompt_ids, prompt_mask = (stories.collate_prompts([(stories.encode_prompt(p), 0) for p in prompts])[k]
                               for k in ("prompt_ids", "prompt_mask"))
    width = max(map(len, broken))
    response = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in broken])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in broken])
    judge = vs_trl.GoldJudge(tok)
    judge.prompt_length = prompt_ids.shape[1]
    ours = judge(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1))
    assert trl == ours.tolist()
    assert trl[0] == 0.0 and trl[1] < 0  # a clean generated story, and a garbled one
