"""Early experience on the procedural web shop: imitation (IL) vs IWM then IL vs self-reflection (SR), 3 seeds.

    python bench/early_experience.py [--seeds 0 1 2] [--recipes il iwm_il sr] [--jobs 1] [--out bench/results]

Each run is ``python train.py fit`` of ``configs/early_experience/web_shop_<recipe>.yaml`` with
``--seed_everything S --data.init_args.seed S`` (the goals, the branching and the batches), then a test of the
final weights on the train, held-out and out-of-domain goals. Runs go to ``--jobs`` processes with the CPU threads
shared among them.

Appends every finished run to ``<out>/early_experience_runs.jsonl`` as it ends, then writes
``<out>/early_experience.json`` (per-run validation curves and test metrics, and their summary) and
``docs/figures/early_experience_success.png`` (success over training, mean and range over seeds); the last line
printed is ``early_experience: il=<x> iwm_il=<y> sr=<z> best_held_out=<w>`` (mean held-out test success).
Each run line and the JSON file record ``provenance`` (commit, uncommitted changes, library and Python versions;
see ``cli_runs.provenance``); a run summarised from an older JSONL file has none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_runs import add_wandb_option, csv_column, in_processes, provenance, run_phase, start_wandb  # noqa: E402

RECIPES = {"il": "web_shop_il.yaml", "iwm_il": "web_shop_iwm_il.yaml", "sr": "web_shop_sr.yaml"}
SPLITS = ("train", "held_out", "out_of_domain")


def run(recipe: str, seed: int, extra: list[str]) -> dict:
    config = str(REPO / "configs" / "early_experience" / RECIPES[recipe])
    overrides = ["--data.init_args.seed", str(seed), "--trainer.enable_model_summary", "false", *extra]
    with tempfile.TemporaryDirectory() as folder:
        cli, test, seconds = run_phase(config, seed, folder, *overrides, job_type=recipe)
        curves = {split: csv_column(cli, f"val/success/{split}") for split in SPLITS}
    print(f"{recipe} seed {seed}: held-out {test['test/success/held_out']:.2f} in {seconds:.0f} s", flush=True)
    return {
        "recipe": recipe,
        "seed": seed,
        "seconds": seconds,
        "steps": cli.trainer.global_step,
        "test": test,
        "val_success": curves,
    }


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, min and max over seeds of each test metric, per recipe."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r["test"] for r in runs if r["recipe"] == recipe]
        table[recipe] = {
            key: {
                "mean": statistics.fmean(m[key] for m in mine),
                "min": min(m[key] for m in mine),
                "max": max(m[key] for m in mine),
            }
            for key in mine[0]
        }
    return table


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for axis, split in zip(axes, SPLITS):
        for recipe in dict.fromkeys(r["recipe"] for r in runs):
            curves = [r["val_success"][split] for r in runs if r["recipe"] == recipe]
            steps = [s for s, _ in curves[0]]
            values = [[v for _, v in c] for c in curves]
            mean = [statistics.fmean(col) for col in zip(*values)]
            axis.plot(steps, mean, marker="o", label=recipe)
            axis.fill_between(steps, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)], alpha=0.2)
        axis.set_title(f"{split} goals")
        axis.set_xlabel("update")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (greedy episodes)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: all cores / jobs)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "early_experience_success.png"))
    parser.add_argument(
        "--summarise",
        nargs="+",
        metavar="JSONL",
        help="only summarise the runs in these files (e.g. from several hosts)",
    )
    parser.add_argument("extra", nargs="*", help="further CLI overrides for every run, after --")
    add_wandb_option(parser)
    args = parser.parse_args()

    source = provenance()  # of the code that runs (or summarises), taken before anything is written
    if args.summarise:
        runs = [json.loads(line) for path in args.summarise for line in open(path) if line.strip()]
        return report(runs, args, source)
    start_wandb(args, "early_experience")
    calls = [(recipe, seed, args.extra) for recipe in args.recipes for seed in args.seeds]  # first recipe first
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = []
    # Each finished run is appended at once, so an interrupted benchmark keeps what it measured.
    with open(Path(args.out) / "early_experience_runs.jsonl", "a") as log:
        for result in in_processes(run, calls, args.jobs, args.threads):
            result["provenance"] = source
            runs.append(result)
            log.write(json.dumps(result) + "\n")
            log.flush()
    report(runs, args, source)


def report(runs: list[dict], args: argparse.Namespace, source: dict) -> None:
    """Write the summary (with ``source``, the provenance of this process) and the plot; print the table and the
    last line."""
    runs.sort(key=lambda r: (list(RECIPES).index(r["recipe"]), r["seed"]))
    table = summarise(runs)
    with open(Path(args.out) / "early_experience.json", "w") as handle:
        json.dump({"provenance": source, "runs": runs, "summary": table}, handle, indent=1)
    plot(runs, Path(args.figure))
    for recipe, metrics in table.items():
        cells = "  ".join(
            f"{split} {metrics[f'test/success/{split}']['mean']:.3f} "
            f"[{metrics[f'test/success/{split}']['min']:.2f}, {metrics[f'test/success/{split}']['max']:.2f}]"
            for split in SPLITS
        )
        print(f"{recipe:7s} success  {cells}")
    held_out = {recipe: m["test/success/held_out"]["mean"] for recipe, m in table.items()}
    figures = " ".join(f"{recipe}={value:.3f}" for recipe, value in held_out.items())
    print(f"early_experience: {figures} best_held_out={max(held_out.values()):.3f}")


if __name__ == "__main__":
    main()
