"""Fit (and test) a config from a benchmark through the project's CLI, with its metrics in a CSV log (and, with
``--wandb``, in W&B, one group per benchmark invocation); the provenance that every benchmark's results file
records."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

from lightning.pytorch import Callback

LIBRARIES = ("torch", "lightning", "torchmetrics", "transformers", "peft", "bitsandbytes", "tokenizers", "optuna")
REPO = Path(__file__).resolve().parents[1]
WANDB_OVERLAY = REPO / "configs/logger/wandb.yaml"
WANDB_ENV = "BENCH_WANDB_GROUP"
"""``{"bench": ..., "group": ...}`` of the invocation when ``--wandb`` is on; the environment carries it into the
worker processes of ``in_processes``."""
USER_WANDB_MODE = os.environ.get("WANDB_MODE")
os.environ.setdefault("WANDB_MODE", "disabled")  # a benchmark logs to CSV; W&B only with --wandb


# --- W&B ablations --------------------------------------------------------------------------------------------
def add_wandb_option(parser: argparse.ArgumentParser) -> None:
    """The ``--wandb`` switch every benchmark has (off: no W&B at all, as before)."""
    parser.add_argument("--wandb", action="store_true", help="also log every run to W&B, offline unless WANDB_MODE "
                        "is set, in one group per invocation (upload with: wandb sync logs/wandb/offline-run-*)")


def start_wandb(args: argparse.Namespace, bench: str) -> str | None:
    """With ``--wandb``: name this invocation's group (``<bench>-<timestamp>``) for every run it starts, here and
    in worker processes, and log offline unless the user set ``WANDB_MODE``; returns the group (``None``: off)."""
    if not args.wandb:
        return None
    group = f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ[WANDB_ENV] = json.dumps({"bench": bench, "group": group})
    os.environ["WANDB_MODE"] = USER_WANDB_MODE or "offline"
    return group


def wandb_run(job_type: str, seed: int) -> dict | None:
    """W&B ``group``, ``job_type`` (the recipe or setting), ``tags`` (bench, recipe, seed) and ``name`` of one run;
    ``None`` when ``--wandb`` is off."""
    spec = os.environ.get(WANDB_ENV)
    if not spec:
        return None
    bench, group = json.loads(spec).values()
    return {"group": group, "job_type": job_type, "tags": [bench, job_type, f"seed-{seed}"],
            "name": f"{job_type}-seed-{seed}"}


def logger_overrides(folder: str, job_type: str, seed: int) -> list[str]:
    """``--trainer.logger`` of a run: the CSV log the benchmark reads, plus the W&B logger overlay
    (``configs/logger/wandb.yaml``) with the run's group, job type and tags when ``--wandb`` is on."""
    run = wandb_run(job_type, seed)
    if run is None:
        return ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", folder]
    import yaml

    wandb_logger = yaml.safe_load(WANDB_OVERLAY.read_text())["trainer"]["logger"]
    wandb_logger["init_args"] |= run
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": folder}}
    return ["--trainer.logger", json.dumps([csv_logger, wandb_logger])]  # CSV first: trainer.logger is the CSV log


def tune_overrides(job_type: str, seed: int) -> list[str]:
    """``train.py tune`` arguments that log each trial to W&B in this invocation's group (``[]`` when off)."""
    run = wandb_run(job_type, seed)
    if run is None:
        return []
    return ["--wandb.enabled", "true", "--wandb.group", run["group"], "--wandb.job_type", job_type,
            "--wandb.tags", json.dumps(run["tags"])]


class TrainClock(Callback):
    """Seconds of the training loop (``on_train_start`` to ``on_train_end``, its validations included); a fit adds
    it with ``--trainer.callbacks+=cli_runs.TrainClock``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._start


class PPORollouts(Callback):
    """Every rollout a PPO run (``lightning_modules.ppo.PPORLHF``) samples: its training step, mean sequence KL
    (``train/kl``) and whether it was kept (not rolled back in its own batch), and the largest ``train/policy_kl`` of
    the updates made. The CSV log writes only every ``log_every_n_steps``-th batch's latest values, so it can miss a
    rollout (a rejected one, one cut short by the early stop); a fit adds this with
    ``--trainer.callbacks+=cli_runs.PPORollouts``."""

    def __init__(self) -> None:
        self.rollouts: list[dict] = []
        self.policy_kl_max = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._samples = pl_module.iteration.done  # PPO samples a rollout when no minibatch of the last one is left
        self._rollbacks, self._step = int(pl_module.rollback_count), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics  # this batch's values of what it logged
        if self._samples and "train/kl" in metrics:
            kept = int(pl_module.rollback_count) == self._rollbacks
            self.rollouts.append({"step": self._step, "kl": float(metrics["train/kl"]), "accepted": kept})
        if trainer.global_step > self._step and "train/policy_kl" in metrics:  # an update was made and logged
            value = float(metrics["train/policy_kl"])
            self.policy_kl_max = value if math.isnan(self.policy_kl_max) else max(self.policy_kl_max, value)


def run_phase(config: str, seed: int, folder: str, *overrides: str, test: bool = True,
              job_type: str | None = None) -> tuple[object, dict, float]:
    """Fit one config and test it; returns the CLI object, the test metrics and the fit time in seconds.
    ``job_type``: the run's recipe or setting in W&B (default: the config's file name)."""
    from experiment.cli import main

    job_type = job_type or Path(config).stem
    if wandb_run(job_type, seed) is not None:
        import wandb

        wandb.finish()  # the previous run of this process (its test metrics included) ends before this one starts
    args = [
        "fit",
        "--config",
        config,
        "--seed_everything",
        str(seed),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        folder,
        *logger_overrides(folder, job_type, seed),
        *overrides,
    ]
    start = time.perf_counter()
    cli = main(args)
    seconds = time.perf_counter() - start
    return cli, test_phase(cli) if test else {}, seconds


def test_phase(cli, ckpt_path: str | None = None) -> dict:
    """Test metrics of a fitted CLI's model (``ckpt_path="best"``: of the checkpoint its ModelCheckpoint kept)."""
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def csv_column(cli, column: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row of the run's CSV log where ``column`` was logged."""
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def in_processes(fn: Callable, calls: list[tuple], jobs: int, threads: int) -> Iterator:
    """``fn(*call)`` for every call in ``jobs`` fresh processes of ``threads`` CPU threads each (0: all cores /
    jobs), yielded as they finish."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_with_threads, threads, fn, call) for call in calls]
        for future in as_completed(futures):
            yield future.result()


def _with_threads(threads: int, fn: Callable, call: tuple):
    import torch

    torch.set_num_threads(threads)
    return fn(*call)


# --- a pretrained base -----------------------------------------------------------------------------------------
class MissingBase(ValueError):
    """The pretrained base folder does not exist."""


def resolve_base(name: str) -> str | None:
    """The base folder as an absolute path (``none``: ``None``, the configs' model from scratch); a missing folder
    raises ``MissingBase`` naming the command that builds it."""
    if name.lower() == "none":
        return None
    from models.lm_factory import pretrain_command

    folder = Path(name).expanduser().resolve()
    if not folder.is_dir():
        command = pretrain_command(str(folder)) or "python train.py fit --config configs/pretrain/tiny.yaml"
        raise MissingBase(f"the pretrained base {name!r} does not exist: build it with `{command}`")
    return str(folder)


def provenance(packages: tuple[str, ...] = LIBRARIES) -> dict:
    """Where a results file comes from: the repository's commit (``None`` outside git), whether tracked files had
    uncommitted changes, the versions of ``packages`` (those importable) and Python's."""
    import platform
    from importlib import util

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None  # tracked files only
    versions = {}
    for name in packages:
        try:
            if util.find_spec(name) is not None:
                versions[name] = metadata.version(name)
        except (ImportError, ValueError, metadata.PackageNotFoundError):
            pass
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(status and status.strip()),
        "versions": versions,
        "python": platform.python_version(),
    }
