"""Benchmark of LeWorld: the two baselines and the three phases on 3 seeds, ablations, and batched vs per-sample speed.

    python bench/leworld.py [--seeds 0 1 2] [--ablation-seeds ...] [--difficulty medium|latent] [--jobs 1]
                            [--threads 0] [--out bench/results]

For each seed (``seed_everything`` and the task seed): the no-memory and oracle baselines, then Phase 1 -> Phase 2
-> Phase 3, each phase starting from the previous one's checkpoint, all with the default CPU configs
(``configs/leworld/*.yaml``; ``--difficulty latent``: their ``*_latent.yaml`` overlays); every model is then tested on
the held-out test sequences. For the ablation seeds (default: every seed), also "without Phase 1" (Phase 2 from
scratch for the steps of Phases 1 + 2), "without Phase 2" (Phase 1 continued for Phase 2's steps) and "without
Phase 3" (Phase 2 continued for Phase 3's steps).
``gap_closed = (mse_no_memory - mse_system) / (mse_no_memory - mse_oracle)`` per seed, with the system after Phase 3;
``gap_closed_strict`` the same against the best memory-free predictor (:func:`bayes_no_memory_mse`) instead of the
trained no-memory BLM; ``phase2_gain`` = test MSE of "without Phase 2" minus Phase 1 -> 2, ``phase3_gain`` = test MSE
of "without Phase 3" minus Phase 1 -> 2 -> 3 (means over the ablation seeds; > 0: the phase helps).

Speed, in the same run: reading 4,096 ranges from the 65,536 x 32 memory with prefix sums vs slicing one range at a
time, and one Phase 2 training step (batch 64, default CPU sizes) with batched reads vs per-sample reads (hard and
soft paths looped over samples, as the seed did).

Each seed runs in its own process (``--jobs`` at a time, ``bench/cli_runs.py``). Writes ``<out>/leworld.json`` (with
the git commit and library versions) and ``docs/figures/leworld_horizon_mse.png`` (``leworld_<difficulty>.json`` and
``leworld_<difficulty>_horizon_mse.png`` for another level); the last line printed is ``leworld: gap_closed=<mean
over seeds> hit_rate=<mean test hit rate> read_speedup=<x> step_speedup=<x> gap_closed_strict=<mean>
phase2_gain=<mean> phase3_gain=<mean>`` (:func:`summary_line`; ``nan`` where no seed has the runs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from cli_runs import add_wandb_option, in_processes, provenance, run_phase, start_wandb  # noqa: E402

from datamodules.leworld_data import LeWorldDataModule  # noqa: E402
from lightning_modules.leworld import LeWorldPhase2  # noqa: E402
from lightning_modules.leworld_losses import sequence_losses  # noqa: E402
from models.leworld import ArtificialMemory, LeWorldSystem  # noqa: E402

CONFIGS = REPO / "configs" / "leworld"
HORIZONS = 4
DIFFICULTIES = {"medium": "", "latent": "_latent"}  # the level -> the suffix of its configs
LIBRARIES = ("torch", "lightning", "torchmetrics")  # recorded with the results (LeWorld uses no transformers)


def fit_and_test(config: str, seed: int, folder: str, init_from: str | None = None, extra: list[str] = ()) -> dict:
    """Fit one config (checkpoint into ``folder``), test the final weights; returns test metrics and time."""
    overrides = ["--data.init_args.seed", str(seed), "--trainer.enable_model_summary", "false"]
    overrides += ["--trainer.callbacks.init_args.dirpath", folder, *extra]
    if init_from is not None:
        overrides += ["--model.init_args.init_from", init_from]
    run, metrics, seconds = run_phase(str(CONFIGS / config), seed, folder, *overrides)
    checkpoint = run.trainer.checkpoint_callback.best_model_path or run.trainer.checkpoint_callback.last_model_path
    return {"seconds": seconds, "steps": run.trainer.global_step, "test": metrics, "checkpoint": checkpoint}


def run_seed(seed: int, ablations: bool, suffix: str = "") -> tuple[int, dict]:
    """Every run of one seed (ablations too if ``ablations``) with the configs ``<name><suffix>.yaml``, each tested,
    and its gap closed."""
    cfg = lambda name: f"{name}{suffix}.yaml"  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        out = {name: fit_and_test(cfg(name), seed, f"{folder}/{name}") for name in ("no_memory", "oracle")}
        out["phase1"] = fit_and_test(cfg("phase1"), seed, f"{folder}/p1")
        out["phase2"] = fit_and_test(cfg("phase2"), seed, f"{folder}/p2", out["phase1"]["checkpoint"])
        out["phase3"] = fit_and_test(cfg("phase3"), seed, f"{folder}/p3", out["phase2"]["checkpoint"])
        if ablations:
            out["no_phase1"] = fit_and_test(cfg("ablation_no_phase1"), seed, f"{folder}/a1")
            out["no_phase2"] = fit_and_test(
                cfg("ablation_no_phase2"), seed, f"{folder}/a2", out["phase1"]["checkpoint"]
            )
            out["no_phase3"] = fit_and_test(
                cfg("ablation_no_phase3"), seed, f"{folder}/a3", out["phase2"]["checkpoint"]
            )
    for run in out.values():
        run.pop("checkpoint")
    nm, orc = out["no_memory"]["test"]["test/mse"], out["oracle"]["test"]["test/mse"]
    for run in out.values():
        run["gap_closed"] = (nm - run["test"]["test/mse"]) / (nm - orc)
    return seed, out


def data_args(suffix: str = "") -> dict:
    """The datamodule's arguments of ``phase1<suffix>.yaml`` (its overlay's data over ``phase1.yaml``'s)."""
    import yaml

    read = lambda name: yaml.safe_load((CONFIGS / name).read_text()).get("data", {}).get("init_args", {})  # noqa: E731
    return read("phase1.yaml") | (read(f"phase1{suffix}.yaml") if suffix else {})


def bayes_no_memory_mse(seed: int, suffix: str = "") -> float:
    """Test MSE of the best predictor without memory: next page known, ``x_{t+1} = decay * x_t`` (the drive has mean
    zero and, on the fresh evaluation memory, nothing in the history predicts it). On the ``latent`` level it is
    also told the hidden regime (``decay * (1 - 2 r_t)``), which a memory-free model can only infer: a lower bound
    on the error of any memory-free predictor, so ``gap_closed_strict`` is, if anything, too strict."""
    data = LeWorldDataModule(**(data_args(suffix) | {"seed": seed}))
    test = data.split("test")
    states, pages = test["states"], data.hparams.num_pages
    decay = torch.full(states.shape[:2], data.hparams.decay)
    if "regime" in test:
        decay = decay * (1 - 2 * test["regime"]).float()
    x_next = decay[:, :-1, None] * states[:, :-1, pages:]
    pred = torch.cat([states[:, :-1, :pages].roll(1, -1), x_next], -1)
    return float(((pred - states[:, 1:]) ** 2).mean())


def add_strict_gaps(results: dict, bayes: dict[int, float]) -> None:
    """Each run's ``gap_closed_vs_bayes``: the gap closed against the best memory-free predictor's test MSE
    (``bayes[seed]``) instead of the trained no-memory BLM's. ``nan`` when that predictor is not worse than the
    oracle (on ``latent`` it is told the hidden regime, which the oracle must infer): there is no gap to close."""
    for seed, runs in results.items():
        gap = bayes[seed] - runs["oracle"]["test"]["test/mse"]
        for run in runs.values():
            run["bayes_no_memory_mse"] = bayes[seed]
            run["gap_closed_vs_bayes"] = (bayes[seed] - run["test"]["test/mse"]) / gap if gap > 0 else math.nan


def phase_gains(results: dict) -> dict[str, list[float]]:
    """Per seed that ran the ablation: ``phase1`` = "without Phase 1" minus Phase 1 -> 2, ``phase2`` = "without Phase
    2" (Phase 1 continued) minus Phase 1 -> 2, ``phase3`` = "without Phase 3" (Phase 2 continued) minus Phase 1 -> 2
    -> 3, each in test MSE (> 0: the phase lowers the error)."""
    pairs = {"phase1": ("no_phase1", "phase2"), "phase2": ("no_phase2", "phase2"), "phase3": ("no_phase3", "phase3")}
    mse = lambda run: run["test"]["test/mse"]  # noqa: E731
    return {
        phase: [mse(runs[ablation]) - mse(runs[full]) for runs in results.values() if ablation in runs]
        for phase, (ablation, full) in pairs.items()
    }


def mean_or_nan(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def summary_line(results: dict, reads: dict, steps: dict) -> str:
    """The benchmark's last line from the runs (``add_strict_gaps`` applied) and the speed measurements."""
    gap = mean_or_nan([runs["phase3"]["gap_closed"] for runs in results.values()])
    strict = mean_or_nan([runs["phase3"]["gap_closed_vs_bayes"] for runs in results.values()])
    hit = mean_or_nan([runs["phase3"]["test"]["test/hit_rate"] for runs in results.values()])
    gains = phase_gains(results)
    return (
        f"leworld: gap_closed={gap:.4f} hit_rate={hit:.4f} read_speedup={reads['speedup']:.1f} "
        f"step_speedup={steps['speedup']:.1f} gap_closed_strict={strict:.4f} "
        f"phase2_gain={mean_or_nan(gains['phase2']):.4f} phase3_gain={mean_or_nan(gains['phase3']):.4f}"
    )


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_speed(num_ranges: int = 4096, repeats: int = 3) -> dict:
    """Seconds to read ``num_ranges`` range means from the seed-size memory: prefix sums vs one slice at a time."""
    memory = ArtificialMemory(65536, 32, 256)
    g = torch.Generator().manual_seed(0)
    memory.load_bits(torch.randint(0, 2, (65536, 32), generator=g).float())
    starts = torch.randint(0, 65536 - 256, (num_ranges,), generator=g)
    ends = starts + torch.randint(1, 257, (num_ranges,), generator=g)
    assert torch.equal(memory.range_mean(starts, ends), memory.range_mean_loop(starts, ends))
    batched = _best_of(lambda: memory.range_mean(starts, ends), repeats)
    loop = _best_of(lambda: memory.range_mean_loop(starts, ends), repeats)
    return {"ranges": num_ranges, "batched_s": batched, "loop_s": loop, "speedup": loop / batched}


def step_speed(repeats: int = 3) -> dict:
    """Seconds of one Phase 2 training step (forward, backward, AdamW) with batched vs per-sample reads."""
    data = LeWorldDataModule(train_sequences=64)  # the default CPU task and, below, model sizes
    batch = data.split("train")
    result = {}
    for impl in ("batched", "loop"):
        torch.manual_seed(0)
        module = LeWorldPhase2(LeWorldSystem())
        module.system.memory.load_bits(data.memory_bits)
        module.system.read_impl = impl
        optimizer = torch.optim.AdamW(module.parameters(), lr=3e-4)

        def step(module=module, optimizer=optimizer):
            out = module.system.multi_step_forward(batch["states"], batch["chars"])
            _, loss = sequence_losses(out["steps"], batch["states"], {"balance": 0.01})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step()  # warm-up
        result[f"{impl}_s"] = _best_of(step, repeats)
    result["speedup"] = result["loop_s"] / result["batched_s"]
    return result


def plot_horizons(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        n
        for n in ("no_memory", "oracle", "phase1", "phase2", "phase3", "no_phase1", "no_phase2", "no_phase3")
        if all(n in r for r in results.values()) or any(n in r for r in results.values())
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    hs = list(range(1, HORIZONS + 1))
    for name in names:
        runs = [r[name] for r in results.values() if name in r]
        curve = [statistics.mean(run["test"][f"test/mse/h{h}"] for run in runs) for h in hs]
        ax.plot(hs, curve, marker="o", label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.set_xlabel("horizon (open-loop steps from the first state)")
    ax.set_ylabel("test MSE")
    ax.set_yscale("log")
    ax.set_xticks(hs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=None, help="default: every seed")
    parser.add_argument("--difficulty", choices=list(DIFFICULTIES), default="medium",
                        help="the task level: medium (the default configs) or latent (their *_latent.yaml overlays)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel (one process each)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: all cores / jobs)")
    parser.add_argument("--from-json", type=Path, help="reuse the runs of an earlier leworld.json (re-measure speed)")
    add_wandb_option(parser)
    args = parser.parse_args()
    start_wandb(args, "leworld")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = DIFFICULTIES[args.difficulty]
    name = f"leworld{'_' + args.difficulty if suffix else ''}"
    ablation_seeds = args.seeds if args.ablation_seeds is None else args.ablation_seeds

    results = {}
    if args.from_json is not None:
        results = {int(k): v for k, v in json.loads(args.from_json.read_text())["runs"].items()}
    else:
        calls = [(seed, seed in ablation_seeds, suffix) for seed in args.seeds]
        for seed, runs in in_processes(run_seed, calls, args.jobs, args.threads):
            results[seed] = runs
            partial = {"provenance": provenance(LIBRARIES), "difficulty": args.difficulty,
                       "runs": dict(sorted(results.items()))}
            (args.out / f"{name}.json").write_text(json.dumps(partial, indent=2))  # partial results stay on disk
        results = dict(sorted(results.items()))
    add_strict_gaps(results, {seed: bayes_no_memory_mse(seed, suffix) for seed in results})
    reads, steps = read_speed(), step_speed()
    summary = {"read": reads, "step": steps}
    record = {"provenance": provenance(LIBRARIES), "difficulty": args.difficulty, "runs": results, "speed": summary}
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2))
    plot_horizons(results, REPO / "docs" / "figures" / f"{name}_horizon_mse.png")

    cols = ["mse", "mae", "hit_rate", "routing_entropy", *[f"mse/h{h}" for h in range(1, HORIZONS + 1)]]
    print("| run | seed | steps | seconds | gap_closed | " + " | ".join(cols) + " |")
    for seed, runs in results.items():
        for name, run in runs.items():
            cells = " | ".join(f"{run['test'][f'test/{c}']:.4f}" if f"test/{c}" in run["test"] else "-" for c in cols)
            print(f"| {name} | {seed} | {run['steps']} | {run['seconds']:.0f} | {run['gap_closed']:.3f} | {cells} |")
    print(
        f"reads of {reads['ranges']} ranges: {reads['batched_s'] * 1e3:.2f} ms batched vs "
        f"{reads['loop_s'] * 1e3:.1f} ms per-sample loop ({reads['speedup']:.1f}x)"
    )
    print(
        f"Phase 2 training step: {steps['batched_s'] * 1e3:.0f} ms batched vs {steps['loop_s'] * 1e3:.0f} ms "
        f"per-sample loop ({steps['speedup']:.1f}x)"
    )
    gaps = [runs["phase3"]["gap_closed"] for runs in results.values()]
    ratio = [runs["oracle"]["test"]["test/mse"] / runs["no_memory"]["test"]["test/mse"] for runs in results.values()]
    print(
        f"gap_closed per seed: {[round(g, 4) for g in gaps]}; oracle/no-memory MSE ratio: "
        f"{[round(r, 4) for r in ratio]}"
    )
    runs_ = list(results.values())
    bayes = [runs["phase3"]["gap_closed_vs_bayes"] for runs in runs_]
    bayes_ratio = [
        runs["oracle"]["test"]["test/mse"] / runs["phase3"]["bayes_no_memory_mse"] for runs in results.values()
    ]
    print(
        f"against the best memory-free predictor (MSE {[round(r['phase3']['bayes_no_memory_mse'], 3) for r in runs_]}) "
        f"gap_closed {[round(g, 4) for g in bayes]}, oracle ratio {[round(r, 4) for r in bayes_ratio]}"
    )
    spread = statistics.stdev(r["phase3"]["test"]["test/mse"] for r in runs_) if len(runs_) > 1 else math.nan
    for phase, gains in phase_gains(results).items():
        print(f"{phase} gain per ablation seed: {[round(g, 4) for g in gains]} (Phase 3 test MSE spread over "
              f"seeds: std {spread:.4f})")
    print(summary_line(results, reads, steps))


if __name__ == "__main__":
    main_bench()
