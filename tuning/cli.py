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

import optuna
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from datamodules.instructions import InstructionDataModule
from tuning.backends import BackendSettings
from tuning.seal import SealSettings
from tuning.study import StudySettings, Tuning, best_summary, export_messages
from tuning.trial import TrialSettings


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the settings' field docstrings become --help
    parser = ArgumentParser(prog="train.py tune", description="Agentic (or TPE / random) tuning of LoRA SFT.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (several stack; later ones win)")
    parser.add_class_arguments(StudySettings, "study", help="The study: storage, method, budget, stopping.")
    parser.add_class_arguments(InstructionDataModule, "data", help="The instruction task.")
    parser.add_class_arguments(TrialSettings, "trial", help="The model and length of every trial.")
    parser.add_class_arguments(BackendSettings, "agents", help="The backend of the agents.")
    parser.add_class_arguments(SealSettings, "seal", help="The SEAL stage.")
    parser.add_argument("--export_only", type=bool, default=False,
                        help="Only write study.export_messages from the stored study; train nothing.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse, validate and run; prints and returns the best episode."""
    parser = build_parser()
    config = parser.parse_args(argv)  # unknown keys and bad values stop here with a message naming them
    try:
        init = parser.instantiate_classes(config)
    except (ValueError, FileNotFoundError) as error:  # a value out of range, a missing data file
        parser.error(f"{type(error).__name__}: {error}")
    if init.export_only:
        if not init.study.export_messages:
            parser.error("--export_only needs --study.export_messages PATH")
        try:
            study = optuna.load_study(study_name=init.study.study_name, storage=init.study.storage)
        except KeyError:
            parser.error(f"no study named {init.study.study_name!r} in {init.study.storage}")
        count = export_messages(study, init.study.export_messages)
        print(f"exported {count} messages to {init.study.export_messages}")
        return best_summary(study)
    study = Tuning(init.study, init.data, init.trial, init.agents, init.seal).run()
    summary = best_summary(study)
    print(json.dumps(summary))
    sys.stdout.flush()
    return summary
