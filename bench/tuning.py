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

SEAL's knowledge-incorporation protocol (``tuning/seal_protocol.py``) runs from the pretrained base (``--seal-base``)
for ``--seal-seeds``: exact match on the questions of held-out passages after no update, an update on the passage
alone, on the passage + the instruction-tuned model's self-edit, and on the passage + the self-edit of the writer
after ReST-EM rounds, with the chance baseline.

``--parts studies`` or ``--parts seal`` runs one part and keeps the other from ``<out>/tuning.json``.

Writes ``<out>/tuning.json`` (each part with the git commit and library versions it ran at); the last line printed is
``tuning: agentic=<best val loss> tpe=<mean best over seeds> random=<mean best over seeds> trials=<n>
tpe_from_default=<x> random_from_default=<x> agentic_from_sampled=<x> seal_passage=<(b)> seal_base_edit=<(c)>
seal_writer=<(d)> seal_chance=<x>`` (SEAL figures: mean test exact match over the seeds).
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

from cli_runs import (  # noqa: E402
    MissingBase,
    add_wandb_option,
    in_processes,
    provenance,
    resolve_base,
    start_wandb,
    tune_overrides,
)

from experiment.cli import main  # noqa: E402

CONFIG = str(REPO / "configs/tuning/default.yaml")
SEAL_BASE = "checkpoints/pretrain/small/hf/model"
SEAL_CONDITIONS = {"no_update": "(a) no update", "passage": "(b) passage", "base_self_edit": "(c) + base self-edit",
                   "rest_em_self_edit": "(d) + ReST-EM writer's self-edit"}


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


def run_studies(trials: int, seeds: list[int], seal: bool) -> dict:
    """Every method's studies; their mean best validation loss and wall time."""
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        runs.append(run_study("agentic", trials, 0, seal, folder))
        for seed in seeds:
            labels = [label for label in SETTINGS if label != "agentic"]
            for label in labels:
                runs.append(run_study(label, trials, seed, False, folder))
            print(json.dumps({r["method"]: r["best_val_loss"] for r in runs[-len(labels):]} | {"seed": seed}),
                  flush=True)
    best = {m: statistics.mean(r["best_val_loss"] for r in runs if r["method"] == m) for m in SETTINGS}
    seconds = {m: statistics.mean(r["seconds"] for r in runs if r["method"] == m) for m in best}
    return {"trials": trials, "seeds": seeds, "seal": seal, "best_val_loss": best, "seconds": seconds, "runs": runs}


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def seal_options(pairs: list[str]) -> dict:
    """``--seal-option name=value`` pairs as ``SealProtocolSettings`` fields, each value cast to its field's type."""
    from tuning.seal_protocol import SealProtocolSettings

    defaults = SealProtocolSettings(base="")
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name in ("base", "seed") or not hasattr(defaults, name):
            raise ValueError(f"--seal-option: expected name=value with a SealProtocolSettings field other than base "
                             f"and seed, got {pair!r}")
        kind = type(getattr(defaults, name))
        if kind is bool and value.lower() not in BOOLEANS:
            raise ValueError(f"--seal-option {name}: expected one of {sorted(BOOLEANS)}, got {value!r}")
        options[name] = BOOLEANS[value.lower()] if kind is bool else kind(value)
    return options


def seal_run(base: str, seed: int, options: dict) -> dict:
    """One seed of the SEAL protocol (in its own process)."""
    from tuning.seal_protocol import SealProtocolSettings, run_protocol

    start = time.perf_counter()
    result = run_protocol(SealProtocolSettings(base=base, seed=seed, **options))
    return result | {"seed": seed, "seconds": round(time.perf_counter() - start, 1)}


def run_seal_protocol(base: str, seeds: list[int], jobs: int, threads: int, options: dict) -> dict:
    """The SEAL protocol for every seed, and each condition's mean, min and max exact match per split."""
    runs = sorted(in_processes(seal_run, [(base, seed, options) for seed in seeds], jobs, threads),
                  key=lambda r: r["seed"])
    summary = {split: {c: {"mean": statistics.mean(v), "min": min(v), "max": max(v)}
                       for c in SEAL_CONDITIONS
                       for v in [[r[split]["exact_match"][c] for r in runs]]} for split in ("val", "test")}
    return {"base": base, "seeds": seeds, "chance": runs[0]["chance"], "summary": summary, "runs": runs}


def previous_part(out: Path, key: str) -> dict | None:
    """A part of the results file that this invocation does not rerun (``None``: there is none; its figures print
    as nan)."""
    path = out / "tuning.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get(key) is None:
        print(f"note: {path} has no {key!r} results to keep; their figures print as nan", file=sys.stderr)
    return result.get(key)


def last_line(studies: dict | None, seal: dict | None) -> str:
    """The benchmark's last line (nan for a part that neither ran nor was kept)."""
    nan = float("nan")
    best = studies["best_val_loss"] if studies else dict.fromkeys(SETTINGS, nan)
    test = seal["summary"]["test"] if seal else {c: {"mean": nan} for c in SEAL_CONDITIONS}
    return (f"tuning: agentic={best['agentic']:.4f} tpe={best['tpe']:.4f} random={best['random']:.4f} "
            f"trials={studies['trials'] if studies else 'nan'} tpe_from_default={best['tpe_from_default']:.4f} "
            f"random_from_default={best['random_from_default']:.4f} "
            f"agentic_from_sampled={best['agentic_from_sampled']:.4f} seal_passage={test['passage']['mean']:.3f} "
            f"seal_base_edit={test['base_self_edit']['mean']:.3f} seal_writer={test['rest_em_self_edit']['mean']:.3f} "
            f"seal_chance={seal['chance'] if seal else nan:.3f}")


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="finished trials per study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampler seeds of TPE and random")
    parser.add_argument("--no-seal", action="store_true", help="agentic study without SEAL and QA")
    parser.add_argument("--parts", nargs="+", choices=("studies", "seal"), default=["studies", "seal"])
    parser.add_argument("--seal-base", default=SEAL_BASE, help="pretrained base of the SEAL protocol")
    parser.add_argument("--seal-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seal-option", nargs="*", default=[], metavar="NAME=VALUE",
                        help="a SealProtocolSettings field other than the default (e.g. kind=qa)")
    parser.add_argument("--jobs", type=int, default=1, help="SEAL protocol seeds run at once")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per SEAL job (0: all cores / jobs)")
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    add_wandb_option(parser)
    args = parser.parse_args()
    out = Path(args.out)
    try:
        seal_base = resolve_base(args.seal_base) if "seal" in args.parts else None
    except MissingBase as error:
        sys.exit(f"Error: --seal-base: {error}")
    try:
        options = seal_options(args.seal_option)
    except ValueError as error:
        sys.exit(f"Error: {error}")
    start_wandb(args, "tuning")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = (run_studies(args.trials, args.seeds, not args.no_seal) | {"provenance": provenance()}
               if "studies" in args.parts else previous_part(out, "studies"))
    seal = (run_seal_protocol(seal_base, args.seal_seeds, args.jobs, args.threads, options)
            | {"options": options, "provenance": provenance()}
            if "seal" in args.parts else previous_part(out, "seal_protocol"))
    result = {"studies": studies, "seal_protocol": seal}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tuning.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "tuning.json")
    for method in studies["best_val_loss"] if studies else []:
        print(f"{method:20s} best val loss {studies['best_val_loss'][method]:.4f}  "
              f"wall time {studies['seconds'][method]:.1f}s")
    for condition, label in SEAL_CONDITIONS.items() if seal else []:
        figures = seal["summary"]["test"][condition]
        print(f"SEAL {label:34s} test exact match {figures['mean']:.3f} ({figures['min']:.3f}-{figures['max']:.3f})")
    print(last_line(studies, seal))


if __name__ == "__main__":
    main_bench()
