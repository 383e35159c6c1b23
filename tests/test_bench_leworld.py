"""bench/leworld.py's pure parts, without training: the strict gap, the phase gains and the last line."""

import math
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import leworld as bench  # noqa: E402


def run(mse: float, hit: float | None = None, gap: float = 0.0) -> dict:
    test = {"test/mse": mse} | ({"test/hit_rate": hit} if hit is not None else {})
    return {"test": test, "gap_closed": gap, "steps": 1, "seconds": 1.0}


def results() -> dict:
    """Two seeds; only seed 0 ran the ablations."""
    return {
        0: {"no_memory": run(2.0), "oracle": run(0.2), "phase1": run(0.8), "phase2": run(0.6),
            "phase3": run(0.4, hit=0.9, gap=0.9), "no_phase1": run(1.5), "no_phase2": run(0.7), "no_phase3": run(0.5)},
        1: {"no_memory": run(2.0), "oracle": run(0.4), "phase1": run(0.9), "phase2": run(0.7),
            "phase3": run(0.6, hit=0.8, gap=0.8)},
    }


def test_strict_gap_is_measured_against_the_best_memory_free_predictor():
    res = results()
    bench.add_strict_gaps(res, {0: 1.2, 1: 1.0})
    assert res[0]["phase3"]["gap_closed_vs_bayes"] == pytest.approx((1.2 - 0.4) / (1.2 - 0.2))
    assert res[1]["phase3"]["gap_closed_vs_bayes"] == pytest.approx((1.0 - 0.6) / (1.0 - 0.4))
    assert res[1]["oracle"]["gap_closed_vs_bayes"] == pytest.approx(1.0)


def test_strict_gap_is_nan_when_the_memory_free_predictor_beats_the_oracle():
    res = results()
    bench.add_strict_gaps(res, {0: 0.1, 1: 1.0})  # seed 0: told what the oracle must infer, below its 0.2
    assert math.isnan(res[0]["phase3"]["gap_closed_vs_bayes"]) and math.isnan(res[0]["oracle"]["gap_closed_vs_bayes"])
    assert res[1]["phase3"]["gap_closed_vs_bayes"] == pytest.approx((1.0 - 0.6) / (1.0 - 0.4))


def test_phase_gains_are_ablation_minus_full_on_the_seeds_that_ran_them():
    gains = bench.phase_gains(results())
    assert gains["phase1"] == [pytest.approx(1.5 - 0.6)]
    assert gains["phase2"] == [pytest.approx(0.7 - 0.6)]
    assert gains["phase3"] == [pytest.approx(0.5 - 0.4)]


def test_last_line_has_the_strict_gap_and_the_phase_gains():
    res = results()
    bench.add_strict_gaps(res, {0: 1.2, 1: 1.0})
    line = bench.summary_line(res, {"speedup": 70.04}, {"speedup": 5.06})
    strict = ((1.2 - 0.4) / 1.0 + (1.0 - 0.6) / 0.6) / 2  # 0.7333
    assert line == (f"leworld: gap_closed=0.8500 hit_rate=0.8500 read_speedup=70.0 step_speedup=5.1 "
                    f"gap_closed_strict={strict:.4f} phase2_gain=0.1000 phase3_gain=0.1000")


def test_last_line_says_nan_without_ablations():
    res = {seed: {k: v for k, v in runs.items() if not k.startswith("no_phase")} for seed, runs in results().items()}
    bench.add_strict_gaps(res, {0: 1.2, 1: 1.0})
    line = bench.summary_line(res, {"speedup": 1.0}, {"speedup": 1.0})
    assert line.endswith("phase2_gain=nan phase3_gain=nan")
    assert math.isnan(bench.mean_or_nan([]))


def test_each_level_has_its_configs_and_latent_data_args_overlay_the_base():
    for suffix in bench.DIFFICULTIES.values():
        for name in ("no_memory", "oracle", "phase1", "phase2", "phase3", "ablation_no_phase1", "ablation_no_phase2",
                     "ablation_no_phase3"):
            assert (bench.CONFIGS / f"{name}{suffix}.yaml").is_file(), f"{name}{suffix}.yaml"
    assert bench.data_args("_latent") == bench.data_args() | {"difficulty": "latent", "regime_switch_prob": 0.05}
