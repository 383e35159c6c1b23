"""Early experience on the procedural web shop, from the pretrained base: imitation (IL) vs IWM then IL vs
self-reflection (SR) at several expert-data sizes, 3 seeds, then GRPO from the IL and the best early-experience
checkpoints.

    python bench/early_experience.py [--base checkpoints/pretrain/tiny/hf/model | none]
        [--expert-goals 50 150 500 1000] [--default-goals 1000] [--experience-goals 1000] [--branches 3]
        [--recipes il iwm_il sr] [--seeds 0 1 2] [--steps 5000] [--grpo-steps 300] [--jobs 1] [--threads 0]
    python bench/early_experience.py --smoke            # the whole wiring in minutes on tiny data (not a result)
    python bench/early_experience.py --summarise <out>/early_experience_data_runs.jsonl   # redraw, no training

Stage 1, per recipe, expert-data size G and seed S: ``python train.py fit`` of
``configs/early_experience/web_shop_<recipe>.yaml`` with ``--seed_everything S --data.init_args.seed S``, the LM and
the tokenizer from the pretrained base folder (``--base``, as docs/pretrain.md says; ``none``: the configs' model
from scratch with a tokenizer trained on the shop's text), ``train_goals G`` (the expert data: IL and SR examples)
and ``experience_goals max(E, G)`` (the goals whose expert states are branched K times for IWM, ``--experience-goals
E``, ``--branches K``), so the early-experience data does not shrink with the expert data. Every recipe makes the
same ``--steps`` updates (IWM -> IL spends the first tenth on IWM). Test plays goals that validation never saw
(``separate_test_goals``).

Stage 2, per seed: GRPO (``configs/early_experience/web_shop_grpo.yaml``, ``init_from``) for ``--grpo-steps`` updates
from that seed's IL checkpoint and from its best early-experience recipe's checkpoint at the default size
(``--default-goals``); the best recipe is the one with the highest mean final *validation* held-out success over
seeds, never test. Its validation curves are recorded.

Each finished run is appended to ``<out>/early_experience_data_runs.jsonl`` as it ends (``--resume`` reuses the
runs of the same settings found there), then ``<out>/early_experience_data.json`` (runs and summary) and the figure
(``--figure``: held-out success vs expert-data size per recipe, min-max over seeds; GRPO validation curves from each
start) are written. The last line printed is

    early_experience: il=<x> iwm_il=<x> sr=<x> best_gain=<x> ood_best=<x> grpo_from_il=<x> grpo_from_ee=<x>

il / iwm_il / sr: mean held-out test success at the default size; best_gain: the best early-experience recipe's
minus IL's; ood_best: its out-of-domain test success; grpo_from_*: mean held-out test success after GRPO from each
start; ``nan`` for what did not run. Runs go to ``--jobs`` processes of ``--threads`` CPU threads each. Every run
line and the JSON file record ``provenance`` (``cli_runs.provenance``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_runs import (  # noqa: E402
    MissingBase,
    add_wandb_option,
    csv_column,
    in_processes,
    provenance,
    resolve_base,
    run_phase,
    start_wandb,
)

RECIPES = {"il": "web_shop_il.yaml", "iwm_il": "web_shop_iwm_il.yaml", "sr": "web_shop_sr.yaml"}
SPLITS = ("train", "held_out", "out_of_domain")
GRPO_CONFIG = REPO / "configs" / "early_experience" / "web_shop_grpo.yaml"
DEFAULT_BASE = REPO / "checkpoints" / "pretrain" / "tiny" / "hf" / "model"
RUNS_FILE, SUMMARY_FILE = "early_experience_data_runs.jsonl", "early_experience_data.json"
NAN = float("nan")
SMOKE = {"expert_goals": [4, 8], "default_goals": 8, "experience_goals": 12, "eval_goals": 3, "steps": 6,
         "grpo_steps": 2, "seeds": [0]}
"""``--smoke``: two tiny expert-data sizes, a few updates, 3 goals per evaluation split, one validation after the
first update and one at the end (not a result)."""
SMOKE_EE = ["--data.init_args.batch_size", "4"]
SMOKE_GRPO = ["--data.init_args.goals_per_batch", "2", "--model.init_args.group_size", "2",
              "--model.init_args.minibatch_size", "8"]
PLAN_KEYS = ("base", "steps", "grpo_steps", "experience_goals", "branches", "eval_goals", "smoke", "extra")
"""The settings a run's result depends on besides its recipe, size and seed (``--resume`` matches them)."""


def base_overrides(base: str | None) -> list[str]:
    """The LM and the tokenizer from the base folder (docs/pretrain.md), training examples cut to its positions."""
    if base is None:
        return []
    positions = json.loads((Path(base) / "config.json").read_text())["max_position_embeddings"]
    return ["--model.init_args.lm.model_name", base, "--data.init_args.tokenizer", base,
            "--data.init_args.max_seq_length", str(positions)]


def data_overrides(plan: dict, seed: int, goals: int) -> list[str]:
    """The data settings of a run with ``goals`` expert goals; GRPO repeats them (the same tokenizer and goals)."""
    return ["--data.init_args.seed", str(seed), "--data.init_args.train_goals", str(goals),
            "--data.init_args.experience_goals", str(max(plan["experience_goals"], goals)),
            "--data.init_args.branches", str(plan["branches"]), "--data.init_args.eval_goals", str(plan["eval_goals"]),
            "--data.init_args.separate_test_goals", "true", *base_overrides(plan["base"])]


def budget_overrides(steps: int, smoke: bool = False) -> list[str]:
    """``steps`` updates with five validations (two with ``smoke``), besides the one before the first update."""
    every = max(1, steps // (2 if smoke else 5))  # the last validation is of the final weights
    return ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(every),
            "--trainer.enable_model_summary", "false"]


def run_ee(plan: dict, recipe: str, seed: int, goals: int) -> dict:
    """One early-experience run; its final checkpoint is kept when ``goals`` is the default size (GRPO's start)."""
    overrides = [*data_overrides(plan, seed, goals), *budget_overrides(plan["steps"], plan["smoke"]),
                 *(["--data.init_args.iwm_steps", str(plan["steps"] // 10)] if recipe == "iwm_il" else []),
                 *(SMOKE_EE if plan["smoke"] else []), *plan["extra"]]
    with tempfile.TemporaryDirectory() as folder:
        cli, test, seconds = run_phase(str(REPO / "configs" / "early_experience" / RECIPES[recipe]), seed, folder,
                                       *overrides, job_type=f"{recipe}-goals-{goals}")
        curves = {split: csv_column(cli, f"val/success/{split}") for split in SPLITS}
        kept = None
        if goals == plan["default_goals"]:
            kept = Path(plan["checkpoints"]) / f"{recipe}-goals{goals}-seed{seed}.ckpt"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cli.trainer.checkpoint_callback.last_model_path, kept)
    print(f"{recipe} {goals} goals seed {seed}: held-out {test['test/success/held_out']:.2f} in {seconds:.0f} s",
          flush=True)
    return {"stage": "ee", "recipe": recipe, "seed": seed, "expert_goals": goals,
            "experience_goals": max(plan["experience_goals"], goals), "steps": cli.trainer.global_step,
            "seconds": seconds, "test": test, "val_success": curves, "checkpoint": str(kept) if kept else None}


def run_grpo(plan: dict, start: str, seed: int, checkpoint: str) -> dict:
    """GRPO from ``checkpoint`` (the ``start`` recipe's run of this seed at the default size)."""
    overrides = [*data_overrides(plan, seed, plan["default_goals"]),
                 *budget_overrides(plan["grpo_steps"], plan["smoke"]), "--model.init_args.init_from", checkpoint,
                 *(SMOKE_GRPO if plan["smoke"] else []), *plan["extra"]]
    with tempfile.TemporaryDirectory() as folder:
        cli, test, seconds = run_phase(str(GRPO_CONFIG), seed, folder, *overrides, job_type=f"grpo-from-{start}")
        success = {split: csv_column(cli, f"val/success/{split}") for split in SPLITS}
        reward = {split: csv_column(cli, f"val/reward/{split}") for split in SPLITS}
    print(f"grpo from {start} seed {seed}: held-out {test['test/success/held_out']:.2f} in {seconds:.0f} s",
          flush=True)
    return {"stage": "grpo", "start": start, "seed": seed, "expert_goals": plan["default_goals"],
            "steps": cli.trainer.global_step, "seconds": seconds, "test": test, "val_success": success,
            "val_reward": reward}


# --- the summary (pure: tested on hand-made runs) ---------------------------------------------------------------
def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": NAN, "min": NAN, "max": NAN, "n": 0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def final_validation(run: dict, split: str = "held_out") -> float:
    """The last validation success on ``split`` (the final weights, on the validation goals)."""
    curve = run["val_success"][split]
    return curve[-1][1] if curve else NAN


def ee_runs(runs: list[dict], recipe: str, goals: int) -> list[dict]:
    return [r for r in runs if r["stage"] == "ee" and r["recipe"] == recipe and r["expert_goals"] == goals]


def best_recipe(runs: list[dict], goals: int) -> str | None:
    """The early-experience recipe (not IL) with the highest mean final validation held-out success at ``goals``
    expert goals; test success plays no part. ``None`` when none ran."""
    means = {recipe: stats([final_validation(r) for r in ee_runs(runs, recipe, goals)])["mean"]
             for recipe in RECIPES if recipe != "il"}
    ran = {recipe: mean for recipe, mean in means.items() if not math.isnan(mean)}
    return max(ran, key=ran.get) if ran else None  # the first listed wins a tie


def summarise(runs: list[dict]) -> dict:
    """Per recipe and expert-data size: test success per split and final validation held-out success (mean, min,
    max over seeds); per GRPO start: held-out test success."""
    table: dict[str, dict[int, dict]] = {}
    for recipe in RECIPES:
        for goals in sorted({r["expert_goals"] for r in runs if r["stage"] == "ee" and r["recipe"] == recipe}):
            mine = ee_runs(runs, recipe, goals)
            cell = {split: stats([r["test"][f"test/success/{split}"] for r in mine]) for split in SPLITS}
            table.setdefault(recipe, {})[goals] = cell | {"val_held_out": stats([final_validation(r) for r in mine])}
    grpo = {kind: stats([r["test"]["test/success/held_out"] for r in runs
                         if r["stage"] == "grpo" and (r["start"] == "il") == (kind == "il")])
            for kind in ("il", "ee")}
    return {"ee": table, "grpo": grpo}


def last_line(runs: list[dict], default_goals: int) -> str:
    summary = summarise(runs)
    table, grpo = summary["ee"], summary["grpo"]

    def success(recipe: str | None, split: str = "held_out") -> float:
        return table.get(recipe, {}).get(default_goals, {}).get(split, {"mean": NAN})["mean"]

    best = best_recipe(runs, default_goals)
    figures = {recipe: success(recipe) for recipe in RECIPES} | {
        "best_gain": success(best) - success("il"), "ood_best": success(best, "out_of_domain"),
        "grpo_from_il": grpo["il"]["mean"], "grpo_from_ee": grpo["ee"]["mean"]}
    return "early_experience: " + " ".join(f"{key}={value:.3f}" for key, value in figures.items())


def band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every curve has, and the mean, min and max over the curves there."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    values = [[dict(c)[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(runs: list[dict], path: Path) -> None:
    """Left: held-out test success vs expert goals per recipe (mean, min-max bars over seeds). Right: GRPO's
    validation held-out success over its updates from each start (mean, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for recipe, cells in summarise(runs)["ee"].items():
        sizes = sorted(cells)
        mean, low, high = ([cells[g]["held_out"][k] for g in sizes] for k in ("mean", "min", "max"))
        spread = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
        left.errorbar(sizes, mean, yerr=spread, marker="o", capsize=4, label=recipe)
    sizes = sorted({r["expert_goals"] for r in runs if r["stage"] == "ee"})
    left.set(xscale="log", xlabel="expert goals (IL data)", ylabel="held-out success (test)",
             title="success vs expert data (min-max over seeds)")
    left.set_xticks(sizes, [str(g) for g in sizes], minor=False)
    left.minorticks_off()
    for start in dict.fromkeys(r["start"] for r in runs if r["stage"] == "grpo"):
        steps, mean, low, high = band([r["val_success"]["held_out"] for r in runs
                                       if r["stage"] == "grpo" and r["start"] == start])
        right.plot(steps, mean, marker="o", label=f"GRPO from {start}")
        right.fill_between(steps, low, high, alpha=0.2)
    right.set(xlabel="GRPO update", ylabel="held-out success (validation)", title="GRPO after early experience")
    for axis in (left, right):
        axis.set_ylim(-0.03, 1.03)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(runs: list[dict], goals: int, path: Path) -> None:
    """Validation success over training on each split per recipe at ``goals`` expert goals (mean, min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for axis, split in zip(axes, SPLITS):
        for recipe in RECIPES:
            curves = [r["val_success"][split] for r in ee_runs(runs, recipe, goals)]
            if curves:
                steps, mean, low, high = band(curves)
                axis.plot(steps, mean, marker="o", label=recipe)
                axis.fill_between(steps, low, high, alpha=0.2)
        axis.set(title=f"{split} goals", xlabel="update")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (greedy episodes)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], out: Path, figure: Path, default_goals: int, source: dict) -> str:
    """Write the summary and the figure, print the table and return (and print) the last line."""
    runs.sort(key=lambda r: (r["stage"], r.get("recipe", r.get("start")), r["expert_goals"], r["seed"]))
    summary = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / SUMMARY_FILE, "w") as handle:
        json.dump({"provenance": source, "default_goals": default_goals,
                   "best_recipe": best_recipe(runs, default_goals), "runs": runs, "summary": summary}, handle, indent=1)
    plot(runs, figure)
    for recipe, cells in summary["ee"].items():
        for goals, cell in cells.items():
            parts = "  ".join(f"{split} {cell[split]['mean']:.3f} [{cell[split]['min']:.2f}, {cell[split]['max']:.2f}]"
                              for split in SPLITS)
            print(f"{recipe:7s} {goals:5d} goals  {parts}  (val held-out {cell['val_held_out']['mean']:.3f})")
    line = last_line(runs, default_goals)
    print(line)
    return line


# --- the command ------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="pretrained base folder (none: from scratch)")
    parser.add_argument("--expert-goals", type=int, nargs="+", help="expert-data sizes (default 50 150 500 1000)")
    parser.add_argument("--default-goals", type=int, help="the size of the last line and GRPO (default 1000)")
    parser.add_argument("--experience-goals", type=int, help="goals branched for IWM at every size (default 1000)")
    parser.add_argument("--branches", type=int, default=3, help="K, alternatives per branched state")
    parser.add_argument("--eval-goals", type=int, help="goals per evaluation split (default 50)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--steps", type=int, help="updates of every early-experience run (default 5000)")
    parser.add_argument("--grpo-steps", type=int, help="GRPO updates from each start (default 300; 0: no GRPO)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few updates: the wiring, in minutes")
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs of the same settings")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: all cores / jobs)")
    parser.add_argument("--out", help="results folder (default bench/results; a fresh one with --smoke)")
    parser.add_argument("--figure", help="default docs/figures/early_experience_data.png (<out> with --smoke)")
    parser.add_argument("--curves-figure", help="also draw success over training per split at the default size")
    parser.add_argument("--checkpoints", help="where the default-size checkpoints are kept for GRPO "
                        "(default checkpoints/early_experience_bench; <out> with --smoke)")
    parser.add_argument("--summarise", nargs="+", metavar="JSONL", help="only summarise the runs in these files")
    parser.add_argument("extra", nargs="*", help="further CLI overrides for every run, after --")
    add_wandb_option(parser)
    args = parser.parse_args(argv)
    fill_defaults(args)
    return args


def fill_defaults(args: argparse.Namespace) -> None:
    """The table's configuration, or ``SMOKE``'s with ``--smoke``, for every option left unset."""
    table = {"expert_goals": [50, 150, 500, 1000], "default_goals": 1000, "experience_goals": 1000,
             "eval_goals": 50, "steps": 5000, "grpo_steps": 300, "seeds": [0, 1, 2]}
    for key, value in (SMOKE if args.smoke else table).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="early_experience_smoke_") if args.smoke else str(REPO / "bench/results")
    if args.figure is None:
        folder = Path(args.out) if args.smoke else REPO / "docs" / "figures"
        args.figure = str(folder / "early_experience_data.png")
    if args.checkpoints is None:
        args.checkpoints = str(Path(args.out) / "checkpoints" if args.smoke
                               else REPO / "checkpoints" / "early_experience_bench")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    source = provenance()  # of the code that runs (or summarises), taken before anything is written
    out, figure = Path(args.out), Path(args.figure)
    if args.summarise:
        runs = load_runs(args.summarise)
        report(runs, out, figure, args.default_goals, source)
        if args.curves_figure:
            plot_training(runs, args.default_goals, Path(args.curves_figure))
        return
    try:
        base = resolve_base(args.base)
    except MissingBase as error:
        print(f"Error: --base: {error}", file=sys.stderr)
        sys.exit(2)
    plan = {"base": base, "steps": args.steps, "grpo_steps": args.grpo_steps,
            "experience_goals": args.experience_goals, "branches": args.branches, "eval_goals": args.eval_goals,
            "smoke": args.smoke, "extra": args.extra, "default_goals": args.default_goals,
            "checkpoints": args.checkpoints}
    start_wandb(args, "early_experience")
    out.mkdir(parents=True, exist_ok=True)
    done = finished_runs(out / RUNS_FILE, plan) if args.resume else []
    runs = run_stage(run_ee, ee_calls(args, plan, done), args, out, plan, source, done)
    runs += run_stage(run_grpo, grpo_calls(args, plan, runs), args, out, plan, source, done)
    report(runs, out, figure, args.default_goals, source)
    if args.curves_figure:
        plot_training(runs, args.default_goals, Path(args.curves_figure))


def load_runs(paths: list[str]) -> list[dict]:
    """The runs of JSONL files; a run recorded before expert-data sizes were measured is an early-experience run
    of the configs' 1,000 training goals."""
    runs = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    for run in runs:
        run.setdefault("stage", "ee")
        run.setdefault("expert_goals", 1000)
    return runs


def ee_calls(args: argparse.Namespace, plan: dict, done: list[dict]) -> list[tuple]:
    """Every (recipe, seed, size) not already done, the default size first (GRPO needs its checkpoints)."""
    sizes = sorted(args.expert_goals, key=lambda g: (g != args.default_goals, g))
    have = {(r["recipe"], r["seed"], r["expert_goals"]) for r in done if r["stage"] == "ee"}
    return [(plan, recipe, seed, goals) for goals in sizes for recipe in args.recipes for seed in args.seeds
            if (recipe, seed, goals) not in have]


def grpo_calls(args: argparse.Namespace, plan: dict, runs: list[dict]) -> list[tuple]:
    """GRPO from IL and from the best early-experience recipe (by validation) of each seed at the default size."""
    best = best_recipe(runs, args.default_goals)
    if not args.grpo_steps:
        return []
    have = {(r["start"], r["seed"]) for r in runs if r["stage"] == "grpo"}
    starts = {(r["recipe"], r["seed"]): r["checkpoint"] for r in runs
              if r["stage"] == "ee" and r["expert_goals"] == args.default_goals and r.get("checkpoint")}
    return [(plan, start, seed, starts[start, seed]) for seed in args.seeds for start in ("il", best)
            if start is not None and (start, seed) in starts and (start, seed) not in have]


def run_stage(fn, calls: list[tuple], args: argparse.Namespace, out: Path, plan: dict, source: dict,
              done: list[dict]) -> list[dict]:
    """Run ``calls`` in ``--jobs`` processes, appending each result to the runs file as it ends (an interrupted
    benchmark keeps what it measured); returns the reused runs of this stage and the new ones."""
    stage = "ee" if fn is run_ee else "grpo"
    runs = [r for r in done if r["stage"] == stage]
    with open(out / RUNS_FILE, "a") as log:
        for result in in_processes(fn, calls, args.jobs, args.threads):
            result |= {"plan": {k: plan[k] for k in PLAN_KEYS}, "provenance": source}
            runs.append(result)
            log.write(json.dumps(result) + "\n")
            log.flush()
    return runs


def finished_runs(path: Path, plan: dict) -> list[dict]:
    """The runs of ``path`` made with the same settings; a default-size run whose checkpoint is gone is dropped
    (GRPO starts from it)."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in open(path) if line.strip()]
    same = [r for r in runs if r.get("plan") == {k: plan[k] for k in PLAN_KEYS}]
    return [r for r in same if r["stage"] == "grpo" or r["expert_goals"] != plan["default_goals"]
            or (r.get("checkpoint") and Path(r["checkpoint"]).exists())]


if __name__ == "__main__":
    main()
