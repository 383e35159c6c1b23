"""bench/early_experience.py without long training: the summary and last line of a hand-made runs list (the best
recipe picked on validation, not test), the missing base, the figure, the base's overrides, and the --smoke run."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import early_experience as bench  # noqa: E402


def ee(recipe: str, seed: int, goals: int, held_out: float, val: float, ood: float = 0.0) -> dict:
    test = {"test/success/train": 0.5, "test/success/held_out": held_out, "test/success/out_of_domain": ood}
    curves = {split: [(0, 0.0), (10, val)] for split in bench.SPLITS}
    return {"stage": "ee", "recipe": recipe, "seed": seed, "expert_goals": goals, "test": test,
            "val_success": curves, "checkpoint": f"{recipe}-{seed}.ckpt"}


def grpo(start: str, seed: int, held_out: float, curve: list[tuple[int, float]]) -> dict:
    return {"stage": "grpo", "start": start, "seed": seed, "expert_goals": 1000,
            "test": {"test/success/held_out": held_out}, "val_success": {split: curve for split in bench.SPLITS}}


def runs() -> list[dict]:
    """Two seeds at 1,000 expert goals (and IL at 50). SR is better on validation (mean 0.70 vs 0.60) but worse on
    test (0.50 vs 0.80): the best recipe must be SR."""
    return [
        ee("il", 0, 1000, held_out=0.60, val=0.62), ee("il", 1, 1000, held_out=0.70, val=0.64),
        ee("il", 0, 50, held_out=0.10, val=0.10), ee("il", 1, 50, held_out=0.30, val=0.20),
        ee("iwm_il", 0, 1000, held_out=0.80, val=0.55, ood=0.9), ee("iwm_il", 1, 1000, held_out=0.80, val=0.65),
        ee("sr", 0, 1000, held_out=0.40, val=0.72, ood=0.2), ee("sr", 1, 1000, held_out=0.60, val=0.68, ood=0.1),
        grpo("il", 0, 0.5, [(0, 0.6), (5, 0.7)]), grpo("il", 1, 0.7, [(0, 0.6), (5, 0.5)]),
        grpo("sr", 0, 0.9, [(0, 0.7), (5, 0.8)]), grpo("sr", 1, 0.6, [(0, 0.7), (5, 0.9)]),
    ]


def test_the_best_recipe_is_chosen_on_validation_not_test():
    assert bench.best_recipe(runs(), 1000) == "sr"  # validation 0.70 > 0.60; on test iwm_il (0.80) would win
    assert bench.best_recipe(runs(), 50) is None  # only IL ran there


def test_the_last_line_from_hand_computed_means():
    line = bench.last_line(runs(), 1000)
    # il (0.6 + 0.7) / 2; iwm_il 0.8; sr (0.4 + 0.6) / 2; best = sr: 0.5 - 0.65; sr's OOD (0.2 + 0.1) / 2;
    # GRPO from IL (0.5 + 0.7) / 2, from the best (sr) (0.9 + 0.6) / 2.
    assert line == ("early_experience: il=0.650 iwm_il=0.800 sr=0.500 best_gain=-0.150 ood_best=0.150 "
                    "grpo_from_il=0.600 grpo_from_ee=0.750")


def test_what_did_not_run_is_nan():
    only_il = [r for r in runs() if r["stage"] == "ee" and r["recipe"] == "il"]
    assert bench.last_line(only_il, 1000) == ("early_experience: il=0.650 iwm_il=nan sr=nan best_gain=nan "
                                              "ood_best=nan grpo_from_il=nan grpo_from_ee=nan")


def test_the_summary_spreads_over_seeds_per_size():
    table = bench.summarise(runs())
    assert table["ee"]["il"][50]["held_out"] == {"mean": pytest.approx(0.2), "min": 0.1, "max": 0.3, "n": 2}
    assert table["ee"]["sr"][1000]["val_held_out"]["mean"] == pytest.approx(0.70)
    assert set(table["ee"]["iwm_il"]) == {1000}
    assert table["grpo"]["ee"]["max"] == 0.9


def test_grpo_starts_from_il_and_the_validation_best_of_each_seed():
    args = bench.parse(["--seeds", "0", "1", "--base", "none"])
    calls = bench.grpo_calls(args, {}, runs()[:8])
    assert [(start, seed, ckpt) for _, start, seed, ckpt in calls] == [
        ("il", 0, "il-0.ckpt"), ("sr", 0, "sr-0.ckpt"), ("il", 1, "il-1.ckpt"), ("sr", 1, "sr-1.ckpt")]
    assert bench.grpo_calls(args, {}, runs()) == []  # all done


def test_the_default_size_runs_first_and_every_run_has_the_same_budget():
    args = bench.parse(["--base", "none", "--seeds", "0"])
    calls = bench.ee_calls(args, {}, done=[ee("il", 0, 1000, 0.5, 0.5)])
    assert [(recipe, goals) for _, recipe, _, goals in calls][:2] == [("iwm_il", 1000), ("sr", 1000)]
    assert len(calls) == 3 * 4 - 1
    plan = {"base": None, "experience_goals": 1000, "branches": 3, "eval_goals": 50}
    small = bench.data_overrides(plan, 2, 50)
    assert small[small.index("--data.init_args.train_goals") + 1] == "50"
    assert small[small.index("--data.init_args.experience_goals") + 1] == "1000"  # independent of the expert data
    assert bench.budget_overrides(5000)[:4] == ["--trainer.max_steps", "5000", "--trainer.val_check_interval", "1000"]


def test_the_figure_is_drawn_from_a_hand_made_list(tmp_path):
    path = tmp_path / "figure.png"
    bench.plot(runs(), path)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    assert bench.band([[(0, 0.6), (5, 0.7)], [(0, 0.6), (5, 0.5), (9, 1.0)]]) == (
        [0, 5], [0.6, pytest.approx(0.6)], [0.6, 0.5], [0.6, 0.7])


def test_summarise_redraws_without_training(tmp_path):
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in runs()))
    done = subprocess.run([sys.executable, str(REPO / "bench/early_experience.py"), "--summarise", str(log),
                           "--out", str(tmp_path), "--figure", str(tmp_path / "f.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == bench.last_line(runs(), 1000)
    assert (tmp_path / "f.png").is_file()
    assert json.loads((tmp_path / bench.SUMMARY_FILE).read_text())["best_recipe"] == "sr"


def test_a_missing_base_stops_with_the_command_that_builds_it(tmp_path):
    missing = tmp_path / "checkpoints/pretrain/tiny/hf/model"
    with pytest.raises(bench.MissingBase, match="python train.py fit --config configs/pretrain/tiny.yaml"):
        bench.resolve_base(str(missing))
    assert bench.resolve_base("none") is None
    done = subprocess.run([sys.executable, str(REPO / "bench/early_experience.py"), "--base", str(missing),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0] == (f"Error: --base: the pretrained base '{missing}' does not exist: build it with "
                        "`python train.py fit --config configs/pretrain/tiny.yaml`")


def test_the_base_gives_the_model_the_tokenizer_and_the_length(tmp_path):
    from models.lm_factory import build_causal_lm, build_tokenizer, export_hf

    tokenizer = build_tokenizer(["a tiny text for a tiny base"] * 20, 300, str(tmp_path / "tok"))
    model = build_causal_lm("tiny-llama", tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    folder = export_hf(model, tokenizer, tmp_path / "base")["model"]
    base = bench.resolve_base(folder)
    positions = model.config.max_position_embeddings
    assert bench.base_overrides(base) == ["--model.init_args.lm.model_name", base, "--data.init_args.tokenizer",
                                          base, "--data.init_args.max_seq_length", str(positions)]
    assert bench.base_overrides(None) == []


@pytest.mark.slow
def test_the_smoke_run_wires_every_stage(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(REPO / "bench/early_experience.py"), "--smoke", "--base", "none",
                           "--seeds", "0", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = [json.loads(line) for line in open(tmp_path / bench.RUNS_FILE)]
    ee_runs = [r for r in recorded if r["stage"] == "ee"]
    assert sorted((r["recipe"], r["expert_goals"]) for r in ee_runs) == sorted(
        (recipe, goals) for recipe in bench.RECIPES for goals in (4, 8))
    assert {r["steps"] for r in recorded} == {bench.SMOKE["steps"], bench.SMOKE["grpo_steps"]}
    assert all(r["experience_goals"] == 12 for r in ee_runs)
    best = bench.best_recipe(recorded, 8)
    assert sorted(r["start"] for r in recorded if r["stage"] == "grpo") == sorted(["il", best])
    last = done.stdout.strip().splitlines()[-1]
    assert last == bench.last_line(recorded, 8) and not math.isnan(float(last.split("grpo_from_ee=")[1]))
    assert (tmp_path / "early_experience_data.png").is_file()
