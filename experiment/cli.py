"""The command line: ``python train.py {fit,validate,test,predict} --config configs/<system>/<x>.yaml``, and
``python train.py tune --config configs/tuning/<x>.yaml`` (the tuning study, see ``tuning/cli.py``).

A config may start with ``base: <file>`` (or a list of files), paths relative to it: those configs are read
first and this one overlays them, so an ablation file holds only what it changes.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from experiment.save_config import RunConfigSaver

CONFIG_FLAGS = ("--config", "-c")
# Flat LM arguments of run configs saved before the LM settings were one ``lm`` object.
LEGACY_LM_KEYS = ("model_name", "hidden_size", "num_layers", "num_heads", "load_in_4bit", "trust_remote_code")
LEGACY_LORA_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                    "lora_target_modules": "target_modules"}


def upgrade_legacy_config(content: dict) -> dict:
    """A config whose LM phase still has the flat arguments (``model_name``, ``lora_r``, ...) with them moved
    into the ``lm`` settings; any other config unchanged."""
    init_args = ((content.get("model") or {}).get("init_args") or {}) if isinstance(content, dict) else {}
    if "lm" in init_args or not any(k in init_args for k in (*LEGACY_LM_KEYS, *LEGACY_LORA_KEYS)):
        return content
    lm = {k: init_args.pop(k) for k in LEGACY_LM_KEYS if k in init_args}
    lora = {new: init_args.pop(old) for old, new in LEGACY_LORA_KEYS.items() if old in init_args}
    if lora:
        lm["lora"] = None if lora.get("r") is None else lora
    init_args["lm"] = lm
    return content


def config_chain(path: str | Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """``path`` preceded by the configs it overlays (its ``base`` key, recursively), in reading order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in seen:
        raise ValueError(f"config {str(path)!r} overlays itself through its base configs")
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    bases = content.get("base") if isinstance(content, dict) else None
    bases = [bases] if isinstance(bases, str) else list(bases or [])
    chain = [c for base in bases for c in config_chain(path.parent / base, (*seen, resolved))]
    return [*chain, str(path)]


def _config_argument(path: str) -> str:
    """The file itself, or the text of its upgrade when it is a legacy run config."""
    with open(path) as f:
        content = yaml.safe_load(f)
    upgraded = upgrade_legacy_config(copy.deepcopy(content))
    return path if upgraded == content else yaml.safe_dump(upgraded, sort_keys=False)


def expand_config_bases(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` preceded by ``--config BASE`` for each config ``FILE`` overlays (and
    legacy run configs upgraded)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, _, value = arg.partition("=")
        if flag in CONFIG_FLAGS and (value or i + 1 < len(argv)):
            if not value:
                i += 1
                value = argv[i]
            out += [part for c in config_chain(value) for part in ("--config", _config_argument(c))] if value.endswith(
                (".yaml", ".yml")) else [flag, value]
        else:
            out.append(arg)
        i += 1
    return out


def _resolve(class_path: str) -> object:
    """The class a dotted path names (the path itself when it cannot be imported), so aliases compare equal."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def refuse_checkpoint_of_another_class(ckpt_path: str | None, class_path: str | None) -> None:
    """Raise if ``ckpt_path`` was written by a model of another class than ``class_path`` (the config's model), as
    the CLI recorded it in the checkpoint's hyperparameters; a checkpoint without that record passes (the module's
    own check, ``GuardedModule.on_load_checkpoint``, still applies)."""
    if not ckpt_path or not class_path or not Path(ckpt_path).is_file():
        return
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return  # unreadable: the Trainer reports it when it restores the checkpoint
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path") if isinstance(checkpoint, dict) else None
    if saved and _resolve(saved) is not _resolve(class_path):
        raise ValueError(f"{ckpt_path!r} was written by {saved}, but the config's model is {class_path}: resume a "
                         "run with its own config, or start this one from it with init_from")


class ExperimentCLI(LightningCLI):
    """LightningCLI whose configs may name the configs they overlay (``base``), and which refuses a ``--ckpt_path``
    written by another model class than the config's."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--base", type=str | list[str] | None, default=None,
            help="Configs that this config overlays (read before it; paths relative to it).",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the config's model with the one a ``--ckpt_path`` names in its hyperparameters: ``fit
        # --config phase2.yaml --ckpt_path phase1.ckpt`` trained Phase 1. Refuse that before it happens.
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            model = config.get("model")
            refuse_checkpoint_of_another_class(config.get("ckpt_path"), model.get("class_path") if model else None)
        super()._parse_ckpt_path()


def main(args: list[str] | None = None) -> LightningCLI | dict:
    """Build the CLI; any LightningModule / LightningDataModule subclass can be named in a config.

    ``tune`` runs a tuning study instead (its own validated config; it returns the best episode)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["tune"]:
        from tuning.cli import main as tune

        return tune(argv[1:])
    # The expanded argv is passed as ``args``; a DDP launcher re-runs the original sys.argv, which expands alike.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return ExperimentCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        auto_configure_optimizers=False,
        args=expand_config_bases(argv),
    )
