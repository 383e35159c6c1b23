"""Benchmark of the tool agent: the default config and the seed's variant on 3 seeds, and the environment's speed.

    python bench/tool_agent.py [--seeds 0 1 2] [--out bench/results] [--env-only]

Each run trains with ``python train.py fit`` semantics, then is tested greedily on every digit combination of
every stage. Writes ``<out>/tool_agent.json`` (with the git commit and library versions) and
``<out>/tool_agent_curves.csv`` (validation curves); the last line printed is
``tool_agent: acc_min=<x> seconds=<median training time> env_speedup=<ratio>``, the speed-up measured on 65,536
episodes (smaller batches are printed above it). The speed-up is the ratio of median times over repeats that
alternate between the two environments, so that both see the same load; the ratio of the fastest times is printed
beside it. ``--env-only`` measures the environments only (no training, nothing written).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_runs import add_wandb_option, provenance, run_phase, start_wandb  # noqa: E402

from envs.tool_env import NUM_STAGES, ToolEnv  # noqa: E402
from envs.tool_env_loop import run_episode  # noqa: E402

ENV_BATCH_SIZES = (256, 8192, 65536)  # the speed-up reported last is that of the largest
CONFIGS = {"default": "configs/tool_agent/default.yaml", "seed_semantics": "configs/tool_agent/seed_semantics.yaml"}


def train_and_test(config: str, seed: int) -> dict:
    """Fit one config with one seed, test it on every problem; returns metrics, time and validation curve."""
    with tempfile.TemporaryDirectory() as folder:
        run, metrics, seconds = run_phase(str(REPO / config), seed, folder)
        trainer = run.trainer
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            curve = [
                {"step": int(r["step"]), **{k: float(r[k]) for k in r if k.startswith("val/greedy_acc/") and r[k]}}
                for r in csv.DictReader(f)
                if r.get("val/greedy_acc_min")
            ]
    return {"seed": seed, "seconds": seconds, "steps": trainer.global_step, "test": metrics, "curve": curve}


def env_speedup(n: int, repeats: int = 7) -> dict[str, float]:
    """Seconds to run ``n`` random episodes vectorised vs one at a time in Python (same rules), and their ratio.

    The repeats alternate between the two, so that a change in the machine's load hits both; returns the median
    and the fastest time of each and the ratio of the medians (``speedup``) and of the fastest times.
    """
    env = ToolEnv("register", max_steps=8)
    generator = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 10, (n, 5), generator=generator)
    stage = torch.randint(0, NUM_STAGES, (n,), generator=generator)
    tokens = env.action_tokens[torch.randint(0, env.num_actions, (n, env.max_steps), generator=generator)]

    def vectorised():
        state = env.reset(digits, stage)
        total = torch.zeros(n)
        for t in range(env.max_steps):
            total += env.step(state, tokens[:, t])[0]
        return total

    def loop():
        rows, stages, programs = digits.tolist(), stage.tolist(), tokens.tolist()
        return torch.tensor([run_episode(tuple(r), s, p)[0] for r, s, p in zip(rows, stages, programs)])

    assert torch.equal(vectorised(), loop()), "vectorised and per-sample environments disagree"
    fast, slow = zip(*[(_timed(vectorised), _timed(loop)) for _ in range(repeats)])
    fast_median, slow_median = statistics.median(fast), statistics.median(slow)
    return {
        "vectorised_s": fast_median,
        "loop_s": slow_median,
        "speedup": slow_median / fast_median,
        "vectorised_min_s": min(fast),
        "loop_min_s": min(slow),
        "speedup_of_min": min(slow) / min(fast),
    }


def print_env_timings(timings: dict[int, dict[str, float]]) -> None:
    """One line per batch size: median times and their ratio, then the fastest times and theirs."""
    for n, t in timings.items():
        print(
            f"environment, {n} episodes: {t['vectorised_s'] * 1e3:.1f} ms vectorised vs {t['loop_s'] * 1e3:.1f} ms "
            f"per-sample loop ({t['speedup']:.2f}x; fastest {t['vectorised_min_s'] * 1e3:.1f} vs "
            f"{t['loop_min_s'] * 1e3:.1f} ms, {t['speedup_of_min']:.2f}x)"
        )


def plot_curves(results: dict, path: Path) -> None:
    """Validation greedy accuracy per stage against training updates, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6), sharey=True)
    for ax, (name, runs) in zip(axes, results.items()):
        for run in runs:
            steps = [p["step"] for p in run["curve"]]
            for k, style in zip(range(NUM_STAGES), ("-", "--", ":")):
                accs = [p.get(f"val/greedy_acc/stage_{k}", float("nan")) for p in run["curve"]]
                ax.plot(steps, accs, style, color=f"C{k}", alpha=0.8, label=f"stage {k}" if run is runs[0] else None)
        ax.set_title(f"{name} ({len(runs)} seeds)")
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("greedy accuracy (validation)")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--env-only", action="store_true", help="measure the environments' speed only")
    add_wandb_option(parser)
    args = parser.parse_args()
    if args.env_only:
        timings = {n: env_speedup(n) for n in ENV_BATCH_SIZES}
        print_env_timings(timings)
        print(f"tool_agent: env_speedup={timings[ENV_BATCH_SIZES[-1]]['speedup']:.1f}")
        return
    start_wandb(args, "tool_agent")
    args.out.mkdir(parents=True, exist_ok=True)

    results = {name: [train_and_test(config, seed) for seed in args.seeds] for name, config in CONFIGS.items()}
    timings = {n: env_speedup(n) for n in ENV_BATCH_SIZES}
    speedup = timings[ENV_BATCH_SIZES[-1]]["speedup"]
    summary = {f"env_{n}": t for n, t in timings.items()}
    record = {"runs": results, "summary": summary, "provenance": provenance()}
    (args.out / "tool_agent.json").write_text(json.dumps(record, indent=2))
    with open(args.out / "tool_agent_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "seed", "step", *[f"stage_{k}" for k in range(NUM_STAGES)]])
        for name, runs in results.items():
            for run in runs:
                for point in run["curve"]:
                    accs = [point.get(f"val/greedy_acc/stage_{k}", "") for k in range(NUM_STAGES)]
                    writer.writerow([name, run["seed"], point["step"], *accs])

    plot_curves(results, REPO / "docs" / "figures" / "tool_agent_curves.png")
    print(
        "| config | seed | updates | seconds | "
        + " | ".join(f"acc stage {k} | reward stage {k}" for k in range(NUM_STAGES))
        + " |"
    )
    for name, runs in results.items():
        for run in runs:
            cells = " | ".join(
                f"{run['test'][f'test/greedy_acc/stage_{k}']:.4f} | {run['test'][f'test/reward/stage_{k}']:.3f}"
                for k in range(NUM_STAGES)
            )
            print(f"| {name} | {run['seed']} | {run['steps']} | {run['seconds']:.1f} | {cells} |")
    print_env_timings(timings)
    default = results["default"]
    acc_min = min(run["test"][f"test/greedy_acc/stage_{k}"] for run in default for k in range(NUM_STAGES))
    seconds = statistics.median(run["seconds"] for run in default)
    print(f"tool_agent: acc_min={acc_min:.4f} seconds={seconds:.1f} env_speedup={speedup:.1f}")


if __name__ == "__main__":
    main_bench()
