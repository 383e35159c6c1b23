"""bench/rlhf.py's pure parts, without training: the spread over seeds, proxy/gold agreement, PPO's KL-band report,
the summary of old and new results files (nan where a method or metric is missing) and the last line."""

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import rlhf as bench  # noqa: E402

from lightning_modules.ppo import PPORLHF  # noqa: E402

NAN = float("nan")


def seed_result(seed: int, ppo: tuple[float, float, float], grpo=None, dpo=None, **extra) -> dict:
    """A result as ``run_seed`` writes it; each method given as (proxy win rate, gold win rate, test KL)."""
    out = {"seed": seed, "sft": {"test/ppl": 1.3}, "reward": {"test/acc": 0.9},
           "agentic": {"test/tool_call_acc": 0.99}, "agentic_rl": {"success": NAN, "sft_success": NAN},
           "rollout_tokens_per_s": 4000.0, "kl_target": 2.0, "kl_rollbacks": 0,
           "ppo_curve": {"score": [], "kl": [], "kl_coef": []}}
    for method, figures in (("ppo", ppo), ("grpo", grpo), ("dpo", dpo)):
        if figures is not None:
            win, gold, kl = figures
            out[method] = {"test/win_rate": win, "test/gold_win_rate": gold, "test/kl": kl,
                           "test/reward_delta": 0.1, "test/tie_rate": 0.1}
    return out | extra


def test_spread_is_mean_std_min_max_over_the_seeds_that_have_a_value():
    s = bench.spread([0.5, 0.7, NAN, 0.9])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (pytest.approx(0.7), 0.5, 0.9, 3)
    assert s["std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9: sqrt((0.04 + 0 + 0.04) / 2)
    one = bench.spread([0.6])
    assert one["mean"] == one["min"] == one["max"] == 0.6 and math.isnan(one["std"])
    none = bench.spread([NAN, NAN])
    assert none["n"] == 0 and all(math.isnan(none[k]) for k in ("mean", "std", "min", "max"))


@pytest.mark.parametrize("proxy, gold, agree", [
    (0.7, 0.55, True), (0.3, 0.45, True), (0.5, 0.5, True),  # the same side of 0.5
    (0.7, 0.45, False), (0.6, 0.5, False), (0.4, 0.6, False),  # the reward model gamed, or a tie on one side only
    (NAN, 0.6, None), (0.6, NAN, None),
])
def test_proxy_and_gold_agree_when_on_the_same_side_of_one_half(proxy, gold, agree):
    assert bench.proxy_gold_agree(proxy, gold) is agree


def test_method_summary_spreads_each_figure_and_counts_seeds_agreeing():
    results = [seed_result(0, (0.6, 0.55, 1.0), grpo=(0.7, 0.40, 2.0)),
               seed_result(1, (0.8, 0.65, 2.0), grpo=(0.6, 0.52, 3.0)),
               seed_result(2, (0.4, 0.60, 3.0))]  # no GRPO for this seed
    ppo, grpo = bench.method_summary(results, "ppo"), bench.method_summary(results, "grpo")
    assert ppo["win_rate"]["mean"] == pytest.approx(0.6) and ppo["gold_win_rate"]["mean"] == pytest.approx(0.6)
    assert (ppo["kl"]["min"], ppo["kl"]["max"], ppo["kl"]["std"]) == (1.0, 3.0, pytest.approx(1.0))
    assert ppo["proxy_gold_agree"] is True and (ppo["seeds_agreeing"], ppo["seeds_judged"]) == (2, 3)
    assert grpo["win_rate"]["n"] == 2 and grpo["gold_win_rate"]["mean"] == pytest.approx(0.46)
    assert grpo["proxy_gold_agree"] is False and (grpo["seeds_agreeing"], grpo["seeds_judged"]) == (1, 2)
    dpo = bench.method_summary(results, "dpo")  # not run: nan, no verdict
    assert math.isnan(dpo["win_rate"]["mean"]) and dpo["proxy_gold_agree"] is None and dpo["seeds_judged"] == 0


def test_ppo_kl_report_uses_the_band_of_ppo_and_separates_accepted_rollouts():
    in_band = PPORLHF(kl_target=2.0).in_kl_band  # top of the band: 1.2 x 2.0 = 2.4 nats
    rollouts = [{"step": 0, "kl": 0.1, "accepted": True}, {"step": 4, "kl": 2.3, "accepted": True},
                {"step": 8, "kl": 2.6, "accepted": False}, {"step": 8, "kl": 1.9, "accepted": True}]
    result = seed_result(0, (0.6, 0.6, 2.2), ppo_last={"test/kl": 2.5}, ppo_rollouts=rollouts, kl_rollbacks=1,
                         ppo_policy_kl_max=2.35, ppo_epoch_end_kl=[1.7, 2.1])
    report = bench.ppo_kl_report(result, in_band)
    assert (report["kept_kl"], report["kept_in_band"], report["last_kl"], report["last_in_band"]) == (
        2.2, True, 2.5, False)
    assert (report["train_kl_max_accepted"], report["train_kl_max_all"]) == (2.3, 2.6)
    assert (report["rollouts"], report["rejected"], report["policy_kl_max"], report["epoch_end_kl_max"]) == (
        4, 1, 2.35, 2.1)
    # The band from the rollout record, not the CSV log's samples of it.
    band = bench.kl_band(result)
    assert (band["kl_max"], band["kl_above_band"], band["kl_rejected"]) == (2.6, 0.25, 0.25)
    untested = bench.ppo_kl_report(seed_result(1, (0.6, 0.6, NAN)), in_band)  # no test KL, no rollout record
    assert untested["kept_in_band"] is None and math.isnan(untested["train_kl_max_all"])


def test_band_summary_counts_policies_in_band_over_seeds():
    reports = [
        {"kept_in_band": True, "last_in_band": False, "train_kl_max_accepted": 2.3, "train_kl_max_all": 2.6,
         "policy_kl_max": 2.0, "epoch_end_kl_max": NAN, "rejected": 2},
        {"kept_in_band": True, "last_in_band": True, "train_kl_max_accepted": 2.1, "train_kl_max_all": 2.1,
         "policy_kl_max": 2.2, "epoch_end_kl_max": 1.5, "rejected": 0},
    ]
    results = [seed_result(s, (0.6, 0.6, 1.0), ppo_kl_report=r) for s, r in enumerate(reports)]
    band = bench.band_summary(results + [seed_result(2, (0.6, 0.6, 1.0))])  # a run without a report is left out
    assert band == {"kept_in_band": 2, "last_in_band": 1, "train_kl_max_accepted": 2.3, "train_kl_max_all": 2.6,
                    "policy_kl_max": 2.2, "epoch_end_kl_max": 1.5, "seeds": 2, "rejected": 2}


def test_summary_and_last_line_of_all_three_methods():
    results = [seed_result(0, (0.6, 0.55, 1.0), grpo=(0.7, 0.40, 2.0), dpo=(0.5, 0.6, 0.5)),
               seed_result(1, (0.8, 0.65, 2.0), grpo=(0.6, 0.50, 3.0), dpo=(0.7, 0.7, 1.5))]
    figures = bench.summary(results)
    assert figures["win_rate"] == pytest.approx(0.7) and figures["kl"] == pytest.approx(1.5)
    assert figures["gold_win_rate"] == pytest.approx(0.6) and figures["grpo_gold"] == pytest.approx(0.45)
    assert figures["dpo_gold"] == pytest.approx(0.65)
    assert bench.last_line(figures) == (
        "rlhf: rm_acc=0.900 win_rate=0.700 kl=1.500 tool_call_acc=0.990 rollout_tokens_per_s=4000 "
        "gold_win_rate=0.600 grpo_gold=0.450 dpo_gold=0.650 agentic_success=nan agentic_sft_success=nan")
    line = bench.method_line("grpo", figures["methods"]["grpo"])
    assert "gold_win_rate=0.450+-0.071 [0.400, 0.500]" in line and "proxy_gold_agree=NO" in line


def test_a_subset_of_methods_leaves_the_others_nan():
    figures = bench.summary([seed_result(0, None, dpo=(0.6, 0.7, 0.4)) | {"rollout_tokens_per_s": NAN}])
    assert figures["dpo_gold"] == pytest.approx(0.7)
    for key in ("win_rate", "kl", "gold_win_rate", "grpo_gold", "kl_max", "rollout_tokens_per_s"):
        assert math.isnan(figures[key]), key
    assert "win_rate=nan" in bench.last_line(figures) and figures["ppo_kl_band"]["seeds"] == 0


def test_the_old_results_file_keeps_its_figures_and_gets_nan_for_the_new_ones():
    record = json.loads((REPO / "bench/results/rlhf_ppo_only.json").read_text())
    figures = bench.summary(record["runs"])  # written before GRPO, DPO and the gold judge were benchmarked
    for key in ("rm_acc", "win_rate", "kl", "tool_call_acc", "rollout_tokens_per_s", "kl_max"):
        assert figures[key] == pytest.approx(record["summary"][key]), key
    for key in ("gold_win_rate", "grpo_gold", "dpo_gold", "agentic_success", "agentic_sft_success"):
        assert math.isnan(figures[key]), key
    assert "selected_step=720" in bench.seed_line(record["runs"][0])


def test_smoke_runs_give_every_story_phase_the_same_corpus():
    """The phases share a tokenizer only when they read the same stories."""
    def stories(phase: str) -> str:
        overrides = bench.smoke_overrides(phase)
        return overrides[overrides.index("--data.init_args.num_stories") + 1]

    assert {stories(p) for p in ("sft", "reward", *bench.METHODS)} == {"400"}
    assert "--data.init_args.num_stories" not in bench.smoke_overrides("agentic_sft")


def test_the_rollout_recorder_keeps_every_rollout_and_marks_the_rejected_ones():
    from types import SimpleNamespace

    import torch
    from cli_runs import PPORollouts

    recorder, trainer = PPORollouts(), SimpleNamespace(global_step=0, callback_metrics={})
    ppo = SimpleNamespace(iteration=SimpleNamespace(done=True), rollback_count=torch.tensor(0))

    def batch(samples: bool, logged: dict, steps: int, rollbacks: int = 0) -> None:
        ppo.iteration.done = samples
        recorder.on_train_batch_start(trainer, ppo, None, 0)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})  # stale values stay
        trainer.global_step += steps
        ppo.rollback_count += rollbacks
        recorder.on_train_batch_end(trainer, ppo, None, None, 0)

    batch(True, {"train/kl": 0.5, "train/policy_kl": 0.6}, steps=1)  # a rollout, then its first update
    batch(False, {"train/policy_kl": 0.9}, steps=1)
    batch(True, {"train/kl": 2.6}, steps=0, rollbacks=1)  # rejected by the KL guard: no update
    trainer.callback_metrics["train/policy_kl"] = torch.tensor(5.0)  # logged by no update of this batch
    batch(False, {}, steps=0)
    batch(True, {"train/kl": 1.9, "train/policy_kl": 0.7}, steps=1)
    assert [(r["step"], r["accepted"]) for r in recorder.rollouts] == [(0, True), (2, False), (2, True)]
    assert [r["kl"] for r in recorder.rollouts] == pytest.approx([0.5, 2.6, 1.9])
    assert recorder.policy_kl_max == pytest.approx(0.9)


def test_keep_reuses_a_seeds_sft_and_reward_model_only_when_their_settings_match(tmp_path, monkeypatch):
    from types import SimpleNamespace

    trained = []

    def run_phase(config, seed, folder, *overrides):
        trained.append(Path(config).stem)
        cli = SimpleNamespace(trainer=SimpleNamespace(checkpoint_callback=SimpleNamespace(
            last_model_path=f"{folder}/last.ckpt")))
        return cli, {"test/metric": 1.0}, 2.0

    monkeypatch.setattr(bench, "run_phase", run_phase)
    args = SimpleNamespace(keep=str(tmp_path), sft_epochs=2, rm_epochs=3, smoke=False, accelerator="cpu")
    first = bench.sft_and_reward_model(0, args, str(tmp_path / "seed0"), lambda phase: [])
    assert trained == ["sft", "reward"] and first["reward"] == f"{tmp_path}/seed0/rm/last.ckpt"
    assert bench.sft_and_reward_model(0, args, str(tmp_path / "seed0"), lambda phase: []) == first
    assert trained == ["sft", "reward"]  # reused, not trained again
    args.rm_epochs = 1
    with pytest.raises(SystemExit, match="rm_epochs"):
        bench.sft_and_reward_model(0, args, str(tmp_path / "seed0"), lambda phase: [])
