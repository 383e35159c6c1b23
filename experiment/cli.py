"""The command line: ``python train.py {fit,validate,test,predict} --config configs/<system>/<x>.yaml``,
``python train.py tune --config configs/tuning/<x>.yaml`` (the tuning study, see ``tuning/cli.py``) and
``python train.py export --ckpt_path <ckpt> [--output <folder>]`` (an LM phase's Hugging Face folders).

A config may start with ``base: <file>`` (or a list of files), paths relative to it: those configs are read
first and this one overlays them, so an ablation file holds only what it changes.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from experiment.save_config import RunConfigSaver

CONFIG_FLAGS = ("--config", "-c")
DEBUG_FLAG = "--debug"
# Problems with what the user gave (a config value, a file, a model name, a diverged run): one line, not a traceback.
USER_ERRORS = (argparse.ArgumentError, ValueError, TypeError, FileNotFoundError, OSError, FloatingPointError, KeyError)
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


DEBUG_ENV = "EXPERIENTIAL_AGENTS_DEBUG"
"""``EXPERIENTIAL_AGENTS_DEBUG=1`` (or ``--debug``): an error shows its traceback instead of one
``Error: <key>: <why>`` line."""


class ConfigError(Exception):
    """A config that cannot run: the dotted ``key`` it is about (``study.n_trials``) and ``why``."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def debugging() -> bool:
    """Whether errors show their traceback (``--debug`` or ``EXPERIENTIAL_AGENTS_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def exit_with_error(message: str, status: int = 2) -> None:
    """End the command with one line, ``Error: <message>``, on stderr and exit ``status`` (2: bad input)."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(status) from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_UNKNOWN = (re.compile(r"Group '([^']+)' does not accept option '([^']+)'"),
            re.compile(r"Option '([^']+)' is not accepted"))


def config_error(error: BaseException, options: list[str] = ()) -> ConfigError:
    """A parser's error (argparse / jsonargparse: unknown option, bad value, missing file) as a ``ConfigError``
    naming the key; ``options`` (the parser's option strings) suggest the option an unknown one was close to."""
    message = str(error)
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if unknown:
        token = (unknown.group(1).split() or ["arguments"])[0]
        if not token.startswith("-"):
            return ConfigError(token, "unexpected argument")
        name = token.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.85)
        hint = f" (did you mean {close[0]}? options are never abbreviated)" if close else ""
        return ConfigError(name.lstrip("-"), "unknown option" + hint)
    for pattern in _UNKNOWN:
        match = pattern.search(message)
        if match:
            return ConfigError(".".join(match.groups()), "unknown option")
    value = re.match(r'Parser key "([^"]+)":?(.*)', message, re.S)
    if value:
        return ConfigError(value.group(1), _one_line(value.group(2)))
    return ConfigError("arguments", _one_line(message))


def parse_naming_keys(parser, argv: list[str] | None):
    """``parser.parse_args(argv)``; a ``ConfigError`` naming the key of an unknown option or a bad value."""
    parser.exit_on_error = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as error:
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        raise config_error(error, options) from error


def settings_error(error: BaseException, section: str, cls: type) -> ConfigError:
    """A settings class's refusal (``ValueError`` / ``FileNotFoundError`` from its ``__init__``) as a
    ``ConfigError``: ``section.field`` when the message starts with ``<field> must``, else ``section``."""
    match = re.match(r"([A-Za-z_]\w*)((?:\.\w+)*) must (.*)", str(error), re.S)
    if match and match.group(1) in inspect.signature(cls).parameters:
        return ConfigError(f"{section}.{match.group(1)}{match.group(2)}", _one_line("must " + match.group(3)))
    return ConfigError(section, _one_line(error))


def instantiate_naming_keys(parser, config, sections: dict[str, type]):
    """``parser.instantiate(config)``; a ``ConfigError`` naming the key when one of ``sections`` (dotted config
    key -> settings class) refuses its values, even from inside a union that jsonargparse reports as a whole."""
    refused: list[ConfigError] = []

    def instantiator(section: str):
        def make(cls, *args, **kwargs):
            try:
                return cls(*args, **kwargs)
            except (ValueError, FileNotFoundError) as error:
                refused.append(settings_error(error, section, cls))
                raise
        return make

    try:
        return parser.instantiate(config, instantiators=[(instantiator(k), c, False) for k, c in sections.items()])
    except (ValueError, FileNotFoundError) as error:
        raise (refused[0] if refused else ConfigError("arguments", _one_line(error))) from error


@contextmanager
def one_line_config_errors() -> Iterator[None]:
    """Inside: a ``ConfigError`` ends the command with ``Error: <key>: <why>`` on stderr and exit
    status 2, with no traceback unless ``EXPERIENTIAL_AGENTS_DEBUG`` is set (``--debug``)."""
    try:
        yield
    except ConfigError as error:
        if debugging():
            raise
        exit_with_error(str(error))


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


PARSER_WRAPPERS = ("Does not validate against any of", "Problem with given class_path", "Parser key ")


def _cause(error: BaseException) -> BaseException:
    """The first error in the chain that is not the argument parser wrapping another one."""
    while any(w in str(error) for w in PARSER_WRAPPERS) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def one_line_error(error: BaseException) -> str:
    """``<key>: <why>`` for a config, checkpoint or model problem, from the (often nested) error that raised it."""
    text = str(error)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    nested = re.search(r"NestedArg\(key='([^']+)'", text)
    reasons = [line.strip() for line in text.splitlines()
               if line.strip().startswith(("Option ", "Expected a <class", "File does not exist", "Key "))]
    if keys and reasons:  # a value the parser rejected
        key = keys[0] if not nested else f"{keys[0]}.init_args.{nested.group(1)}"
        return f"{key}: {reasons[0]}"
    inner = _cause(error)
    section = "data: " if "LightningDataModule" in text else "model: " if "LightningModule" in text else ""
    message = " ".join(str(inner).split()) or type(inner).__name__
    return f"{section}{message}" if section else f"{type(inner).__name__}: {message}"


def main(args: list[str] | None = None) -> LightningCLI | dict:
    """Build the CLI; any LightningModule / LightningDataModule subclass can be named in a config.

    ``tune`` runs a tuning study instead (its own validated config; it returns the best episode). From the command
    line (``args`` None) a bad config, checkpoint or model name ends with one line, ``Error: <key>: <why>``, and
    exit status 2; ``--debug`` (or ``EXPERIENTIAL_AGENTS_DEBUG=1``) shows the whole traceback instead.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"  # the tune command reads it too
    argv = [a for a in argv if a != DEBUG_FLAG]
    if args is not None or debugging():
        return _run(argv, parser_kwargs={})
    try:
        return _run(argv, parser_kwargs={"exit_on_error": False})
    except USER_ERRORS as error:
        exit_with_error(f"{one_line_error(error)}  (--debug shows the traceback)")


def export(argv: list[str]) -> dict[str, str]:
    """``export --ckpt_path <ckpt> [--output <folder>]``: the Hugging Face folders that fitting an LM phase writes
    at its end, from one of its checkpoints (``lightning_modules.lm_phase.export_checkpoint``)."""
    parser = argparse.ArgumentParser(prog="train.py export", description=export.__doc__.splitlines()[0],
                                     allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--ckpt_path", default=None, help="Checkpoint of an LM phase (SFT, reward model, PPO, GRPO, "
                        "DPO, early experience).")
    parser.add_argument("--output", default=None, help="Folder for model/ and adapter/ (default: <run>/hf).")
    with one_line_config_errors():
        args = parse_naming_keys(parser, argv)
        if args.ckpt_path is None:  # (argparse's own check for a required option prints a usage block instead)
            raise ConfigError("ckpt_path", "required: the checkpoint of an LM phase to export")
    from lightning_modules.lm_phase import export_checkpoint

    written = export_checkpoint(args.ckpt_path, args.output)
    print(f"Hugging Face folders: {', '.join(written.values())}")
    return written


def _run(argv: list[str], parser_kwargs: dict) -> LightningCLI | dict:
    if argv[:1] == ["tune"]:
        from tuning.cli import main as tune

        return tune(argv[1:])
    if argv[:1] == ["export"]:
        return export(argv[1:])
    # The expanded argv is passed as ``args``; a DDP launcher re-runs the original sys.argv, which expands alike.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return ExperimentCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        auto_configure_optimizers=False,
        parser_kwargs={"allow_abbrev": False, **parser_kwargs},  # `--seed_every 3` is not `--seed_everything 3`
        args=expand_config_bases(argv),
    )
