"""The command line as a user runs it: every config, overlays, config saving, bad input, DDP on two CPUs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml

from experiment.cli import main
from tests.conftest import REPO

# configs/tuning/ holds `train.py tune` studies, not `fit` runs: tests/test_tuning.py runs them. configs/*/models/
# holds model overlays for a system's phases: the system's tests stack them on its configs.
EXPERIMENT_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                            if p.parent.name not in ("trainer", "logger", "tuning", "models"))
# The original-size LeWorld models take most of this test's time; they run with -m slow.
EXPERIMENT_RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.parent.name == "seed_size" else p
                   for p in EXPERIMENT_CONFIGS]


def cli(*args):
    return main(list(args))


@pytest.mark.parametrize("config", EXPERIMENT_RUNS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_experiment_config_runs_fast_dev_run(config, in_tmp):
    run = cli("fit", "--config", str(config), "--trainer.fast_dev_run", "true")
    assert run.trainer.state.finished
    assert run.trainer.global_step == 1


def test_overlays_stack_on_an_experiment(in_tmp, capsys):
    default = str(REPO / "configs/tool_agent/default.yaml")
    for overlay, expected in [
        ("cpu", {"accelerator": "cpu", "devices": 1}),
        ("gpu", {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"}),
        ("ddp", {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "precision": "bf16-mixed"}),
        ("ddp_cpu", {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}),
    ]:
        with pytest.raises(SystemExit):
            cli("fit", "--config", default, "--config", str(REPO / f"configs/trainer/{overlay}.yaml"), "--print_config")
        trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
        assert {k: trainer[k] for k in expected} == expected, overlay
        assert trainer["max_epochs"] == 100  # the experiment's own settings survive the overlay


def test_wandb_logger_overlay_saves_config_per_run(in_tmp):
    args = [
        "fit",
        "--config",
        str(REPO / "configs/tool_agent/default.yaml"),
        "--config",
        str(REPO / "configs/logger/wandb.yaml"),
        "--trainer.max_epochs",
        "1",
        "--data.init_args.batches_per_epoch",
        "2",
    ]
    first = cli(*args)
    wandb.finish()  # as when the process exits; otherwise W&B hands the second run the first one's
    second = cli(*args)  # the stock SaveConfigCallback refuses a second run in the same save_dir
    saved = list(Path("logs").rglob("config.yaml"))
    assert len(saved) == 2, saved
    assert yaml.safe_load(saved[0].read_text())["model"]["class_path"] == "lightning_modules.tool_agent.ToolAgentA2C"
    assert first.trainer.logger.version != second.trainer.logger.version


def test_test_subcommand_evaluates_a_checkpoint(in_tmp):
    config = str(REPO / "configs/tool_agent/default.yaml")
    fit = cli("fit", "--config", config, "--trainer.max_epochs", "1", "--data.init_args.batches_per_epoch", "2")
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    run = cli("test", "--config", config, "--ckpt_path", ckpt, "--trainer.limit_test_batches", "1")
    assert "test/greedy_acc/stage_0" in run.trainer.callback_metrics


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.init_args.no_such_key", "1"], "no_such_key"),
        (["--model.init_args.optimizer.init_args.lr", "-0.1"], "Invalid learning rate"),
        (["--data.init_args.start_stage", "7"], "unknown stage 7"),
        (["--config", "configs/tool_agent/missing.yaml"], "missing.yaml"),
        (["--model.init_args.gamma", "abc"], "model.init_args.gamma: Expected a <class 'float'>"),
        (["--seed_every", "3"], "unrecognized arguments: --seed_every"),  # no abbreviated options
    ],
)
def test_bad_input_fails_with_a_clear_error(args, message):
    command = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/tool_agent/default.yaml",
        *args,
        "--trainer.fast_dev_run",
        "true",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last and "Traceback" not in result.stderr


def test_debug_shows_the_traceback_and_a_missing_hub_model_fails_fast(tmp_path):
    command = [sys.executable, "train.py", "fit", "--config", "configs/rlhf/sft.yaml", "--config",
               "configs/rlhf/models/pythia-70m.yaml", "--data.init_args.num_stories", "20"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HOME": str(tmp_path), "HF_ENDPOINT": "https://127.0.0.1:9"}
    quiet = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert "could not load 'EleutherAI/pythia-70m-deduped'" in quiet.stderr.strip().splitlines()[-1]
    loud = subprocess.run([*command, "--debug"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path):
    out = tmp_path / "params"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        str(REPO / "configs/tool_agent/default.yaml"),
        "--config",
        str(REPO / "configs/trainer/ddp_cpu.yaml"),
        "--trainer.max_epochs",
        "2",
        "--data.init_args.batches_per_epoch",
        "5",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=tests.helpers.SaveRankParameters",
        f"--trainer.callbacks.init_args.folder={out}",
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
