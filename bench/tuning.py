"""Benchmark of the tuning loop: the agentic team vs Optuna TPE vs random search at an equal trial budget on the
default offline task (``configs/tuning/default.yaml``).

    python bench/tuning.py [--trials 10] [--seeds 0 1 2] [--no-seal] [--out bench/results]

Every method runs ``python train.py tune`` on a fresh SQLite study with the same trial function (same model,
data, trial seed and step cap); only the choice of hyperparameters differs. The rule-based agents are
deterministic, so the agentic study runs once; TPE and random search run once per sampler seed. The Judge's
patience is set to the budget so that every method gets all its trials. The agentic study also runs its SEAL
stage and QA evaluation after every episode (``--no-seal`` turns both off), which its wall time includes.

The starting point is measured too: ``agentic`` starts from the agents' default configuration and ``tpe`` /
``random`` sample from the start (``--study.start_from_default false``), as the first published comparison did;
``tpe_from_default`` / ``random_from_default`` get the agents' default as their first trial, and
``agentic_from_sampled`` starts the agents where random search starts for each seed (without SEAL and QA, which
the rule-based Tuner does not read).

Writes ``<out>/tuning.json`` (with the git commit and library versions); the last line printed is
``tuning: agentic=<best val loss> tpe=<mean best over seeds> random=<mean best over seeds> trials=<n>
tpe_from_default=<x> random_from_default=<x> agentic_from_sampled=<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_runs import add_wandb_option, provenance, start_wandb, tune_overrides  # noqa: E402

from experiment.cli import main  # noqa: E402

CONFIG = str(REPO / "configs/tuning/default.yaml")


# label: (method, whether its first episode is the agents' default configuration)
SETTINGS = {"agentic": ("agentic", True), "tpe": ("tpe", False), "random": ("random", False),
            "tpe_from_default": ("tpe", True), "random_from_default": ("random", True),
            "agentic_from_sampled": ("agentic", False)}


def run_study(label: str, trials: int, seed: int, seal: bool, folder: str) -> dict:
    """One study of ``trials`` finished episodes; its best value, best-so-far curve, wall time and records."""
    method, from_default = SETTINGS[label]
    storage = f"sqlite:///{folder}/{label}_{seed}.db"
    args = ["tune", "--config", CONFIG, "--study.method", method, "--study.n_trials", str(trials),
            "--study.seed", str(seed), "--study.storage", storage, "--study.study_name", f"bench-{label}-{seed}",
            "--study.patience", str(trials), "--study.export_messages", f"{folder}/{label}_{seed}.jsonl",
            "--study.start_from_default", str(from_default).lower()]
    if not seal:
        args += ["--seal.enabled", "false", "--study.qa", "false"]
    args += tune_overrides(label, seed)
    start = time.perf_counter()
    summary = main(args)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=f"bench-{label}-{seed}", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    curve = [min(t.value for t in complete[:k + 1]) for k in range(len(complete))]
    records = [{"trial": t.number, "params": t.params, "val_loss": t.value,
                "val_ppl": t.user_attrs["metrics"]["val_ppl"], "seal": t.user_attrs.get("seal_summary"),
                "qa": t.user_attrs.get("qa")} for t in complete]
    return {"method": label, "seed": seed, "best_val_loss": summary["best_val_loss"],
            "best_params": summary["best_params"], "seconds": round(seconds, 1), "curve": curve, "trials": records}


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="finished trials per study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampler seeds of TPE and random")
    parser.add_argument("--no-seal", action="store_true", help="agentic study without SEAL and QA")
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    add_wandb_option(parser)
    args = parser.parse_args()
    start_wandb(args, "tuning")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        runs.append(run_study("agentic", args.trials, 0, not args.no_seal, folder))
        for seed in args.seeds:
            labels = [label for label in SETTINGS if label != "agentic"]
            for label in labels:
                runs.append(run_study(label, args.trials, seed, False, folder))
            print(json.dumps({r["method"]: r["best_val_loss"] for r in runs[-len(labels):]} | {"seed": seed}),
                  flush=True)
    best = {m: statistics.mean(r["best_val_loss"] for r in runs if r["method"] == m) for m in SETTINGS}
    seconds = {m: statistics.mean(r["seconds"] for r in runs if r["method"] == m) for m in best}
    result = {"trials": args.trials, "seeds": args.seeds, "seal": not args.no_seal, "best_val_loss": best,
              "seconds": seconds, "runs": runs, "provenance": provenance()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tuning.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "tuning.json")
    for method in best:
        print(f"{method:20s} best val loss {best[method]:.4f}  wall time {seconds[method]:.1f}s")
    print(f"tuning: agentic={best['agentic']:.4f} tpe={best['tpe']:.4f} random={best['random']:.4f} "
          f"trials={args.trials} tpe_from_default={best['tpe_from_default']:.4f} "
          f"random_from_default={best['random_from_default']:.4f} "
          f"agentic_from_sampled={best['agentic_from_sampled']:.4f}")


if __name__ == "__main__":
    main_bench()
