"""Fit (and test) a config from a benchmark through the project's CLI, with its metrics in a CSV log; the
provenance that every benchmark's results file records."""

from __future__ import annotations

import csv
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



class TrainClock(Callback):
    """Seconds of the training loop (``on_train_start`` to ``on_train_end``, its validations included); a fit adds
    it with ``--trainer.callbacks+=cli_runs.TrainClock``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._start


def run_phase(config: str, seed: int, folder: str, *overrides: str, test: bool = True) -> tuple[object, dict, float]:
    """Fit one config and test it; returns the CLI object, the test metrics and the fit time in seconds."""
    from experiment.cli import main

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
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        folder,
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


def provenance(packages: tuple[str, ...] = LIBRARIES) -> dict:
    """Where a results file comes from: the repository's commit (``None`` outside git), whether tracked files had
    uncommitted changes, the versions of ``packages`` (those importable) and Python's."""
    import platform
    from importlib import util

    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
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
