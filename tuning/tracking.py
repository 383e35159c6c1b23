"""Each tuning trial as one W&B run (its parameters, metrics and state) in a group named after the study, so
``wandb sync`` shows a study as one group. Off by default; offline unless logged in (as ``WandbLogger``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WandbSettings:
    """Logging every trial of the study to Weights & Biases."""

    enabled: bool = False
    """Log each trial as one W&B run (offline under ``<save_dir>/wandb`` unless logged in; ``WANDB_MODE`` wins)."""
    project: str = "experiential-agents"
    """W&B project."""
    group: str | None = None
    """Group of the trials' runs (``null``: the study's name)."""
    job_type: str | None = None
    """Job type of the trials' runs (``null``: the study's method)."""
    tags: list[str] = field(default_factory=list)
    """Tags of every trial's run, beside the study's name and method."""
    save_dir: str = "logs"
    """Folder of the W&B files (``<save_dir>/wandb``)."""


def wandb_mode() -> str | None:
    """``None`` (W&B reads ``WANDB_MODE``) when it is set, else online with credentials and offline without."""
    from experiment.wandb_logger import wandb_credentials_available

    if "WANDB_MODE" in os.environ:
        return None
    return "online" if wandb_credentials_available() else "offline"


def log_trial(settings: WandbSettings, study: str, method: str, number: int, params: dict[str, Any],
              state: str, results: dict[str, Any]) -> None:
    """One finished (or failed) trial as one W&B run: ``params`` as its config, the numbers in ``results`` (nested
    dicts as ``a/b``) as its summary and one logged step, and ``state`` (``COMPLETE`` / ``FAIL``)."""
    if not settings.enabled:
        return
    import wandb

    os.makedirs(settings.save_dir, exist_ok=True)
    numbers = _numbers(results)
    run = wandb.init(project=settings.project, group=settings.group or study, job_type=settings.job_type or method,
                     name=f"{study}-trial-{number}", tags=[study, method, *settings.tags], dir=settings.save_dir,
                     config={**params, "trial": number, "study": study, "method": method}, mode=wandb_mode(),
                     reinit="finish_previous")
    if numbers:
        run.log(numbers)
    run.summary.update({**numbers, "state": state})
    run.finish()


def _numbers(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested dict, keyed ``a/b``."""
    out: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out |= _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out
