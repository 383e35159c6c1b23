"""``python train.py tune --config configs/tuning/default.yaml``: the tuning study from a validated config.

    python train.py tune --help                                   # every option, documented
    python train.py tune --config configs/tuning/default.yaml --print_config
    python train.py tune --config configs/tuning/default.yaml --study.n_trials 12
    python train.py tune --config configs/tuning/default.yaml --export_only true \
        --study.export_messages messages.jsonl                    # export the agent messages, train nothing
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from optuna.trial import TrialState

from datamodules.instructions import InstructionDataModule
from experiment.cli import (
    ConfigError,
    exit_with_error,
    instantiate_naming_keys,
    one_line_config_errors,
    parse_naming_keys,
)
from models.lm_factory import LMSettings, LoraSettings
from tuning.backends import BackendSettings
from tuning.seal import SealSettings
from tuning.study import StudySettings, Tuning, best_summary, export_messages
from tuning.tracking import WandbSettings
from tuning.trial import TrialSettings

SECTIONS = {"study": StudySettings, "data": InstructionDataModule, "trial": TrialSettings, "trial.lm": LMSettings,
            "trial.lm.lora": LoraSettings, "agents": BackendSettings, "seal": SealSettings, "wandb": WandbSettings}
"""Config key -> settings class: a refused value is reported as ``<key>.<field>``."""


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the settings' field docstrings become --help
    parser = ArgumentParser(prog="train.py tune", description="Agentic (or TPE / random) tuning of LoRA SFT.",
                            allow_abbrev=False, exit_on_error=False)  # --study.n_trial is not --study.n_trials
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (several stack; later ones win)")
    parser.add_class_arguments(StudySettings, "study", help="The study: storage, method, budget, stopping.")
    parser.add_class_arguments(InstructionDataModule, "data", help="The instruction task.")
    parser.add_class_arguments(TrialSettings, "trial", help="The model and length of every trial.")
    parser.add_class_arguments(BackendSettings, "agents", help="The backend of the agents.")
    parser.add_class_arguments(SealSettings, "seal", help="The SEAL stage.")
    parser.add_class_arguments(WandbSettings, "wandb", help="Each trial as one W&B run, grouped by study (off).")
    parser.add_argument("--export_only", type=bool, default=False,
                        help="Only write study.export_messages from the stored study; train nothing.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse, validate and run; prints and returns the best episode. A config error (unknown key, value out of
    range, missing file or study) exits with status 2 and one line ``Error: <key>: <why>`` (its traceback with
    ``EXPERIENTIAL_AGENTS_DEBUG=1``)."""
    parser = build_parser()
    with one_line_config_errors():
        init = instantiate_naming_keys(parser, parse_naming_keys(parser, argv), SECTIONS)
        if init.export_only:
            study = stored_study(init.study)
    if init.export_only:
        count = export_messages(study, init.study.export_messages)
        print(f"exported {count} messages to {init.study.export_messages}")
        return best_summary(study)
    study = Tuning(init.study, init.data, init.trial, init.agents, init.seal, init.wandb).run()
    summary = best_summary(study)
    print(json.dumps(summary))
    sys.stdout.flush()
    short = shortfall(study, init.study.n_trials)
    if short:
        exit_with_error(short, status=1)  # the study is short of its episodes: run the command again
    return summary


def shortfall(study: optuna.Study, n_trials: int) -> str | None:
    """Why the study ended with fewer than ``n_trials`` finished episodes (``None`` when it has them, or when the
    Judge stopped it): the count of failed trials and the last one's error."""
    if "stop" in study.user_attrs:
        return None
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state == TrialState.COMPLETE for t in trials)
    if finished >= n_trials:
        return None
    failed = [t for t in trials if t.state == TrialState.FAIL]
    last = next((t.user_attrs["error"] for t in reversed(failed) if "error" in t.user_attrs), "no error recorded")
    return (f"study {study.study_name!r}: {finished} of {n_trials} episodes finished, {len(failed)} trials failed "
            f"(last: {' '.join(last.split())}); run the same command again to continue")


def stored_study(settings: StudySettings) -> optuna.Study:
    """The existing study of ``settings`` for ``--export_only``: ``ConfigError`` when there is nothing to export,
    and no database file is created for a study that does not exist."""
    if not settings.export_messages:
        raise ConfigError("study.export_messages", "--export_only needs a path to write the messages to")
    if settings.storage.startswith("sqlite:///"):
        path = settings.storage[len("sqlite:///"):]
        if path in ("", ":memory:") or not Path(path).is_file():
            raise ConfigError("study.storage", f"no database file {path!r}: nothing to export")
    try:
        return optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    except KeyError:
        raise ConfigError("study.study_name", f"no study named {settings.study_name!r} in {settings.storage}") from None
