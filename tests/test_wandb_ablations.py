"""W&B ablations: every benchmark's runs in one W&B group per invocation (job type = recipe, tags = bench, recipe,
seed), and every tuning trial as one run in a group named after its study; offline files read back."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import wandb
import yaml

from tests.conftest import REPO
from tests.helpers import read_offline_wandb_run

sys.path.insert(0, str(REPO / "bench"))
import cli_runs  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_wandb():
    """W&B keeps its settings (the mode among them) in a process-wide singleton: an earlier test's ``disabled`` would
    otherwise stay in force here."""
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def bench_env(monkeypatch):
    """An invocation's W&B settings live in the environment (worker processes inherit them): restore it after."""
    monkeypatch.delenv(cli_runs.WANDB_ENV, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # what cli_runs sets for a benchmark without --wandb
    monkeypatch.setattr(cli_runs, "USER_WANDB_MODE", None)


def test_without_the_option_a_bench_logs_to_csv_only(bench_env):
    assert cli_runs.start_wandb(argparse.Namespace(wandb=False), "rlhf") is None
    assert cli_runs.logger_overrides("out", "sft", 0) == [
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "out"]
    assert cli_runs.tune_overrides("tpe", 0) == [] and cli_runs.wandb_run("sft", 0) is None
    assert cli_runs.os.environ["WANDB_MODE"] == "disabled"


def test_the_helper_gives_a_run_its_group_job_type_and_tags(bench_env, monkeypatch):
    parser = argparse.ArgumentParser()
    cli_runs.add_wandb_option(parser)
    group = cli_runs.start_wandb(parser.parse_args(["--wandb"]), "rlhf")
    assert group.startswith("rlhf-") and cli_runs.os.environ["WANDB_MODE"] == "offline"
    flag, value = cli_runs.logger_overrides("out/sft", "sft", 2)
    csv_logger, wandb_logger = json.loads(value)
    overlay = yaml.safe_load((REPO / "configs/logger/wandb.yaml").read_text())["trainer"]["logger"]
    assert flag == "--trainer.logger" and csv_logger["init_args"] == {"save_dir": "out/sft"}
    assert wandb_logger["class_path"] == overlay["class_path"] == "experiment.wandb_logger.WandbLogger"
    assert wandb_logger["init_args"] == overlay["init_args"] | {
        "group": group, "job_type": "sft", "tags": ["rlhf", "sft", "seed-2"], "name": "sft-seed-2"}
    tune = cli_runs.tune_overrides("tpe", 1)
    assert tune[tune.index("--wandb.group") + 1] == group and tune[tune.index("--wandb.job_type") + 1] == "tpe"
    assert json.loads(tune[tune.index("--wandb.tags") + 1]) == ["rlhf", "tpe", "seed-1"]
    monkeypatch.setattr(cli_runs, "USER_WANDB_MODE", "online")  # the user's WANDB_MODE wins
    cli_runs.start_wandb(parser.parse_args(["--wandb"]), "rlhf")
    assert cli_runs.os.environ["WANDB_MODE"] == "online"


def test_a_bench_run_writes_an_offline_wandb_run_in_its_group(bench_env, in_tmp):
    group = cli_runs.start_wandb(argparse.Namespace(wandb=True), "tool_agent")
    run, _, _ = cli_runs.run_phase(str(REPO / "configs/tool_agent/default.yaml"), 3, str(in_tmp / "run"),
                                   "--trainer.max_epochs", "1", "--data.init_args.batches_per_epoch", "2",
                                   test=False)
    wandb.finish()
    assert Path(run.trainer.logger.log_dir, "metrics.csv").is_file()  # the CSV log the benchmark reads stays first
    [folder] = Path("logs/wandb").glob("offline-run-*")  # the overlay's save_dir
    recorded = read_offline_wandb_run(folder)
    assert (recorded["group"], recorded["job_type"], recorded["name"]) == (group, "default", "default-seed-3")
    assert recorded["tags"] == ["tool_agent", "default", "seed-3"]
    assert recorded["config"]["cli"]["seed_everything"] == 3  # the resolved config, as with the overlay alone


def test_a_tune_study_logs_each_trial_as_one_run(tmp_path, monkeypatch):
    from experiment.cli import main
    from tests.test_tuning import fake_trial, tune_args

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr("tuning.study.run_trial", fake_trial())
    main(tune_args(tmp_path, "--study.n_trials", "2", "--study.method", "random", "--seal.enabled", "false",
                   "--study.qa", "false", "--wandb.enabled", "true", "--wandb.save_dir", str(tmp_path / "logs")))
    study = __import__("optuna").load_study(study_name="agentic-lora", storage=f"sqlite:///{tmp_path}/study.db")
    runs = sorted((read_offline_wandb_run(f) for f in (tmp_path / "logs/wandb").glob("offline-run-*")),
                  key=lambda r: r["config"]["trial"])
    assert len(runs) == len(study.trials) == 2
    for trial, run in zip(study.trials, runs):
        assert (run["group"], run["job_type"], run["name"]) == ("agentic-lora", "random", f"agentic-lora-trial-"
                                                                                         f"{trial.number}")
        assert {k: run["config"][k] for k in trial.params} == trial.params
        assert run["summary"]["metrics/val_loss"] == pytest.approx(trial.value)
        assert run["summary"]["state"] == "COMPLETE"
