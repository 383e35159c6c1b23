"""Configs: one source of defaults (a base config holds its classes' defaults), overlays that hold only what they
change, and run configs saved before the LM settings were nested still load."""

import importlib
import inspect
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest
import yaml

from experiment.cli import config_chain, expand_config_bases, main, upgrade_legacy_config
from tests.conftest import REPO

ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# Values a base config sets on purpose to something other than its class's default, with the reason.
DELIBERATE_OVERRIDES: dict[tuple[str, str], str] = {
    ("rlhf/grpo.yaml", "data.init_args.batch_size"): "16 prompts x group_size 4 = PPO's 64 responses per rollout",
    ("rlhf/agentic_ppo.yaml", "data.init_args.batch_size"): "64 episodes per rollout, one per task (GRPO: 8 x 8)",
    **{("pretrain/tiny.yaml", f"model.init_args.{key}"): "the pretrained base is larger than the per-task models, "
       "decays its rate and exports to the fixed folder that later configs name (CausalLMSFT's defaults are the "
       "RLHF SFT phase's)" for key in ("lm.hidden_size", "lm.num_layers", "lr_decay", "warmup_ratio", "export_dir")},
}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def class_defaults(cls) -> dict:
    """Defaults of ``cls.__init__`` including those a subclass forwards to its bases through ``**kwargs``."""
    defaults = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass) or klass.__module__.split(".")[0] not in (
                "lightning_modules", "datamodules", "models"):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if param.default is not inspect.Parameter.empty:
                defaults[name] = asdict(param.default) if is_dataclass(param.default) else param.default
    return defaults


def differences(config: dict, defaults: dict, prefix: str) -> list[str]:
    """Dotted keys whose configured value differs from the default (nested settings compared field by field)."""
    out = []
    for key, value in config.items():
        if key not in defaults or (isinstance(value, dict) and "class_path" in value) or callable(defaults[key]):
            continue  # a factory (optimiser) or a nested class checked on its own
        default = defaults[key]
        if isinstance(value, dict) and isinstance(default, dict):
            out += differences(value, default, f"{prefix}{key}.")
        elif value != default and not (isinstance(default, float) and value == pytest.approx(default)):
            out.append(f"{prefix}{key}: config {value!r} != class default {default!r}")
    return out


def _checked_sections(config: dict):
    for section in ("model", "data"):
        spec = config.get(section)
        if isinstance(spec, dict) and "class_path" in spec and spec["class_path"].split(".")[0] in (
                "lightning_modules", "datamodules"):
            yield section, spec
            for key, nested in (spec.get("init_args") or {}).items():
                if isinstance(nested, dict) and nested.get("class_path", "").startswith("models."):
                    yield f"{section}.init_args.{key}", nested


BASE_CONFIGS = [p for p in ALL_CONFIGS if "base" not in _load(p) and _load(p).get("model", {}).get("class_path")]


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_a_base_config_holds_its_classes_defaults(config):
    rel = str(config.relative_to(REPO / "configs"))
    found = []
    for section, spec in _checked_sections(_load(config)):
        defaults = class_defaults(_class(spec["class_path"]))
        found += differences(spec.get("init_args") or {}, defaults, f"{section}.init_args.")
    unexplained = [d for d in found if (rel, d.split(":")[0]) not in DELIBERATE_OVERRIDES]
    assert not unexplained, f"{rel}: set the class default to the config's value, or overlay a base config"


def test_the_defaults_check_can_fail():
    assert differences({"lm": {"hidden_size": 64}, "x": 1}, {"lm": {"hidden_size": 128}, "x": 1}, "") == [
        "lm.hidden_size: config 64 != class default 128"]


# --- overlays ---------------------------------------------------------------------------------------------------
def _resolved(capsys, *configs: str) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *[a for c in configs for a in ("--config", c)], "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    resolved.pop("base", None)
    return resolved


def test_an_overlay_is_its_base_plus_what_it_changes(capsys):
    folder = REPO / "configs/early_experience"
    base = _resolved(capsys, str(folder / "web_shop_il.yaml"))
    overlay = _resolved(capsys, str(folder / "web_shop_sr.yaml"))
    base["data"]["init_args"] |= {"recipe": "sr", "sr_fraction": 0.5}
    assert overlay == base


def test_bases_are_read_first_recursively_and_cycles_or_missing_files_fail(tmp_path):
    (tmp_path / "a.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed_everything: 2\n")
    (tmp_path / "c.yaml").write_text("base: [b.yaml]\n")
    assert config_chain(tmp_path / "c.yaml") == [str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml")]
    assert expand_config_bases(["fit", "-c", str(tmp_path / "b.yaml"), "--x", "1"]) == [
        "fit", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"), "--x", "1"]
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ValueError, match="overlays itself"):
        config_chain(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        config_chain(tmp_path / "d.yaml")


# --- legacy run configs -----------------------------------------------------------------------------------------
LEGACY_PPO = """
model:
  class_path: lightning_modules.rlhf.PPORLHF
  init_args:
    model_name: tiny-llama
    hidden_size: 32
    lora_r: 16
    lora_alpha: 32
    kl_coef: 0.3
"""


def test_legacy_flat_lm_arguments_move_into_the_lm_settings():
    upgraded = upgrade_legacy_config(yaml.safe_load(LEGACY_PPO))["model"]["init_args"]
    assert upgraded == {"kl_coef": 0.3, "lm": {"model_name": "tiny-llama", "hidden_size": 32,
                                               "lora": {"r": 16, "alpha": 32}}}
    no_lora = upgrade_legacy_config({"model": {"init_args": {"model_name": "x", "lora_r": None}}})
    assert no_lora["model"]["init_args"] == {"lm": {"model_name": "x", "lora": None}}
    current = {"model": {"init_args": {"lm": {"model_name": "x"}}}}
    assert upgrade_legacy_config(current) == current


def test_a_legacy_run_config_loads_under_its_old_class_path(tmp_path, capsys):
    (tmp_path / "old.yaml").write_text(LEGACY_PPO)
    data = "--data=datamodules.text_corpus.PromptDataModule"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "old.yaml"), data, "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == "lightning_modules.rlhf.PPORLHF"
    assert model["init_args"]["lm"]["lora"]["r"] == 16 and model["init_args"]["kl_coef"] == 0.3
