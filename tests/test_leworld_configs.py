"""LeWorld's configs: the classes' defaults are the base config's values, and each overlay changes only what it says."""

import contextlib
import importlib
import inspect
import io

import pytest
import torch
import yaml

from datamodules.leworld_data import LeWorldDataModule
from experiment.cli import main
from lightning_modules.leworld import LeWorldBaseline, LeWorldPhase1, LeWorldPhase2, LeWorldPhase3
from models.leworld import ArtificialMemory, BigLeWorldModel, LeWorldSystem, SmallLeWorldModel
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "leworld"


def resolved(config: str) -> dict:
    """The config as ``train.py fit --config configs/leworld/<config> --print_config`` prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    return yaml.safe_load(out.getvalue())


def flat(tree, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` of nested dicts (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize(
    "config,path,cls",
    [
        ("phase1.yaml", ["model"], LeWorldPhase1),
        ("phase1.yaml", ["model", "init_args", "system"], LeWorldSystem),
        ("phase1.yaml", ["data"], LeWorldDataModule),
        ("phase2.yaml", ["model"], LeWorldPhase2),
        ("phase3.yaml", ["model"], LeWorldPhase3),
        ("no_memory.yaml", ["model"], LeWorldBaseline),
        ("no_memory.yaml", ["model", "init_args", "blm"], BigLeWorldModel),
        ("oracle.yaml", ["model", "init_args", "memory"], ArtificialMemory),
    ],
)
def test_class_defaults_are_the_documented_configs_values(config, path, cls):
    node = resolved(config)
    for key in path:
        node = node[key]
    module, _, name = node["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is cls
    plain = {k: v for k, v in node["init_args"].items() if not isinstance(v, dict)}  # nested classes: own cases
    differing = {k: (v, defaults(cls)[k]) for k, v in plain.items() if k in defaults(cls) and v != defaults(cls)[k]}
    assert not differing, f"{cls.__name__}: config value vs class default"


def test_default_optimizer_is_the_base_configs():
    optimizer = resolved("phase1.yaml")["model"]["init_args"]["optimizer"]
    assert defaults(LeWorldPhase1)["optimizer"] is torch.optim.AdamW
    assert optimizer["class_path"] == "torch.optim.AdamW"
    adamw = defaults(torch.optim.AdamW)
    for key in ("lr", "weight_decay"):
        assert optimizer["init_args"][key] == adamw[key], key


def test_default_slm_is_the_one_the_default_system_builds():
    built = LeWorldSystem().slms[0].state_dict()
    alone = SmallLeWorldModel().state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in alone.items()}


@pytest.mark.parametrize(
    "overlay,base,changed",
    [
        ("ablation_no_phase1.yaml", "phase2.yaml", {"max_steps", "val_check_interval", "filename"}),
        ("ablation_no_phase3.yaml", "phase2.yaml", {"max_steps", "val_check_interval", "filename", "lr"}),
        ("oracle.yaml", "no_memory.yaml", {"filename", "mode", "num_slots", "memory"}),
        ("fill_regions.yaml", "phase1.yaml", {"filename", "population"}),
        ("ablation_no_phase2.yaml", "phase1.yaml", {"max_steps", "val_check_interval", "filename"}),
        ("no_memory_latent.yaml", "no_memory.yaml", {"filename", "difficulty"}),
        ("oracle_latent.yaml", "oracle.yaml", {"filename", "difficulty"}),
        ("phase1_latent.yaml", "phase1.yaml", {"filename", "difficulty", "slm_sees_past"}),
        ("phase2_latent.yaml", "phase2.yaml", {"filename", "difficulty", "slm_sees_past",
                                               "info"}),
        ("phase3_latent.yaml", "phase3.yaml", {"filename", "difficulty", "slm_sees_past",
                                               "lr"}),
        ("ablation_no_phase1_latent.yaml", "ablation_no_phase1.yaml", {"filename", "difficulty",
                                                                       "slm_sees_past", "info"}),
        ("ablation_no_phase2_latent.yaml", "ablation_no_phase2.yaml", {"filename", "difficulty",
                                                                       "slm_sees_past"}),
        ("ablation_no_phase3_latent.yaml", "ablation_no_phase3.yaml", {"filename", "difficulty",
                                                                       "slm_sees_past", "info"}),
        ("fill_experience_file.yaml", "phase1.yaml", {"filename", "num_words", "max_read_range", "num_pages",
                                                      "population", "experience_file", "eval_memory"}),
    ],
)
def test_overlays_change_only_what_they_say(overlay, base, changed):
    a, b = flat(resolved(overlay)), flat(resolved(base))
    differing = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "base"}
    names = set()
    for k in differing:
        leaf = k.split(".")[-1]
        if leaf == "callbacks":  # a list: compare the checkpoint's settings one by one
            cb_a, cb_b = a[k][0]["init_args"], b[k][0]["init_args"]
            names |= {n for n in cb_a.keys() | cb_b.keys() if cb_a.get(n) != cb_b.get(n)}
        elif ".memory." in f".{k}." or k.endswith(".memory"):
            names.add("memory")
        else:
            names.add(leaf)
    assert names == changed
