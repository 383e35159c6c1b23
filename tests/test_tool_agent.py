"""The tool agent's policy, losses, learning, curriculum and checkpoint resume."""

import importlib
import importlib.util
import inspect
import json
import os
import socket
import subprocess
import sys
from functools import partial

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.distributed import RankBatches
from datamodules.tool_tasks import AdvanceCurriculum, ToolTaskDataModule
from envs.tool_env import NUM_STAGES, context_tokens
from experiment.cli import main
from lightning_modules.guarded import GuardedModule, NonFiniteGuard
from lightning_modules.tool_agent import (
    Rollout,
    ToolAgentA2C,
    compute_episode_metrics,
    episode_metrics,
    update_episode_metrics,
)
from models.tool_policy import GRUActorCritic
from tests.conftest import REPO
from tests.helpers import InjectNaN


def make_agent(**kwargs):
    return ToolAgentA2C(GRUActorCritic(hidden_size=64), optimizer=partial(torch.optim.Adam, lr=1e-3), **kwargs)


def make_trainer(max_epochs, callbacks=(), **kwargs):
    # Only tests that pass a ModelCheckpoint (with its folder) write checkpoints: none land in the working folder.
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        callbacks=[AdvanceCurriculum(), *callbacks],
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.mark.parametrize("encoder,isolated", [("gru", True), ("seed_batch_mean", False)])
def test_each_sample_sees_its_own_context(encoder, isolated):
    torch.manual_seed(0)
    policy = GRUActorCritic(hidden_size=32, context_encoder=encoder)
    stage = torch.tensor([2, 2])
    digits = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    changed = digits.clone()
    changed[1] = torch.tensor([0, 0, 0, 0, 1])
    h = policy.encode(context_tokens(digits, stage), stage)
    h_changed = policy.encode(context_tokens(changed, stage), stage)
    assert h.shape == (2, 32)
    assert torch.allclose(h[0], h_changed[0]) == isolated  # sample 0 must not see sample 1's digits
    assert not torch.allclose(h[1], h_changed[1])


def test_rollout_masks_steps_after_the_answer():
    torch.manual_seed(0)
    agent = make_agent()
    digits = torch.randint(0, 10, (64, 5))
    stage = torch.randint(0, 3, (64,))
    rollout = agent.rollout(digits, stage, greedy=False, generator=torch.Generator().manual_seed(0))
    lengths = rollout.mask.sum(1)
    for i in range(64):
        n = int(lengths[i])
        assert rollout.mask[i, :n].all() and not rollout.mask[i, n:].any()
        assert (rollout.log_probs[i, n:] == 0).all() and (rollout.rewards[i, n:] == 0).all()
    # Only the final step can carry the (0/1) reward.
    assert torch.equal(rollout.returns, rollout.correct.float())


def test_a2c_loss_terms():
    torch.manual_seed(0)
    agent = make_agent(entropy_coef=0.0, value_coef=0.0)
    rollout = agent.rollout(torch.randint(0, 10, (32, 5)), torch.zeros(32, dtype=torch.long), greedy=False)
    losses = agent.a2c_losses(rollout)
    assert losses["loss"].item() == pytest.approx(losses["policy_loss"].item())
    losses["loss"].backward()
    assert agent.policy.policy_head.weight.grad.abs().sum() > 0
    assert torch.isfinite(losses["value_loss"]) and losses["entropy"] > 0


def test_short_training_learns_stage_zero():
    L.seed_everything(0)
    agent = make_agent()
    data = ToolTaskDataModule(batch_size=128, batches_per_epoch=20, val_problems_per_stage=256, advance_threshold=1.0)
    data.setup("validate")
    digits, stage = data.val_set.digits, data.val_set.stages
    first = stage == 0
    before = agent.rollout(digits[first], stage[first], greedy=True).correct.float().mean()
    trainer = make_trainer(max_epochs=4)
    trainer.fit(agent, data)
    after = agent.rollout(digits[first], stage[first], greedy=True).correct.float().mean()
    assert before < 0.2 and after > 0.9
    assert trainer.callback_metrics["val/greedy_acc/stage_0"] > 0.9


def episodes(correct: list[int], lengths: list[int]) -> Rollout:
    """Evaluated episodes whose reward (1 when correct) comes at their last step."""
    steps = max(lengths)
    mask = torch.arange(steps) < torch.tensor(lengths).unsqueeze(1)
    rewards = torch.zeros(len(correct), steps)
    rewards[torch.arange(len(correct)), torch.tensor(lengths) - 1] = torch.tensor(correct, dtype=torch.float)
    zeros = torch.zeros(len(correct), steps)
    return Rollout(actions=zeros.long(), tokens=zeros.long(), log_probs=zeros, entropies=zeros, values=zeros,
                   rewards=rewards, mask=mask, correct=torch.tensor(correct, dtype=torch.bool),
                   answer=torch.zeros(len(correct)))


def test_episode_metrics_per_stage_and_overall():
    metrics = episode_metrics("val")
    update_episode_metrics(metrics, episodes([1, 0, 1, 1], [3, 8, 4, 5]), torch.tensor([0, 0, 2, 2]))
    update_episode_metrics(metrics, episodes([0, 1], [8, 3]), torch.tensor([0, 2]))
    values = {k: round(float(v), 6) for k, v in compute_episode_metrics(metrics).items()}
    assert values == {"val/greedy_acc/stage_0": 0.333333, "val/greedy_acc/stage_2": 1.0, "val/greedy_acc_min": 0.333333,
                      "val/reward/stage_0": 0.333333, "val/reward/stage_2": 1.0, "val/reward": 0.666667,
                      "val/episode_length": 5.166667}  # stage 1 was not evaluated: left out
    assert compute_episode_metrics(metrics) == {}  # reset after computing


def _ranks_compute_metrics(rank: int, port: int, out: dict) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    metrics = episode_metrics("val")
    # As a DistributedSampler deals the per-stage validation batches: rank 0 sees stages 0 and 2, rank 1 stage 1.
    if rank == 0:
        update_episode_metrics(metrics, episodes([1, 1], [3, 3]), torch.tensor([0, 2]))
    else:
        update_episode_metrics(metrics, episodes([0, 0], [8, 8]), torch.tensor([1, 1]))
    out[rank] = {k: float(v) for k, v in compute_episode_metrics(metrics).items()}
    dist.destroy_process_group()


def test_two_processes_compute_every_stage_over_both():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ranks_compute_metrics, args=(port, out), nprocs=2)
    assert out[0] == out[1]
    assert {k: out[0][f"val/greedy_acc/stage_{k}"] for k in range(3)} == {0: 1.0, 1: 0.0, 2: 1.0}
    assert out[0]["val/greedy_acc_min"] == 0.0 and out[0]["val/episode_length"] == 5.5


def test_threshold_curriculum_advances_and_schedule_follows_epochs():
    data = ToolTaskDataModule(advance_threshold=0.9, replay_fraction=0.5)
    data.update_curriculum([0.5, 0.0, 0.0])
    assert data.stage == 0
    data.update_curriculum([0.95, 0.0, 0.0])
    assert data.stage == 1 and data.stage_probs().tolist() == [0.5, 0.5, 0.0]
    scheduled = ToolTaskDataModule(curriculum="schedule", schedule=[0, 2], replay_fraction=0.0)
    assert scheduled.stage == 0
    scheduled.update_curriculum([0.0, 0.0, 0.0])
    scheduled.update_curriculum([0.0, 0.0, 0.0])
    assert scheduled.stage == 2 and scheduled.stage_probs().tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedule": [0, 3], "curriculum": "schedule"}, "unknown stage 3"),
        ({"start_stage": -1}, "unknown stage -1"),
        ({"replay_fraction": 1.5}, "replay_fraction"),
        ({"curriculum": "schedule"}, "non-empty"),
    ],
)
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToolTaskDataModule(**kwargs)


def test_fit_without_the_curriculum_callback_is_refused():
    data = ToolTaskDataModule(batch_size=8, batches_per_epoch=1, val_problems_per_stage=8)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)  # no callback
    with pytest.raises(ValueError, match="AdvanceCurriculum"):
        trainer.fit(make_agent(), data)


def test_curriculum_callback_needs_the_tool_datamodule():
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[AdvanceCurriculum()],
                        enable_progress_bar=False)
    loader = torch.utils.data.DataLoader([(torch.zeros(5, dtype=torch.long), torch.tensor(0))], batch_size=None)
    with pytest.raises(ValueError, match="ToolTaskDataModule"):
        trainer.fit(make_agent(), train_dataloaders=loader)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="gamma"):
        make_agent(gamma=1.5)
    with pytest.raises(ValueError, match="num_actions"):
        ToolAgentA2C(GRUActorCritic(num_actions=18), semantics="register")


@pytest.mark.parametrize("kwargs,match", [({"hidden_size": 0}, "hidden_size"), ({"num_actions": 0}, "num_actions"),
                                          ({"num_stages": 0}, "num_stages")])
def test_an_empty_policy_network_is_refused(kwargs, match):
    # hidden_size 0 used to train a constant policy (zero-width heads give zero logits) without a word.
    with pytest.raises(ValueError, match=match):
        GRUActorCritic(**kwargs)


def _fit(tmp_path, max_epochs, ckpt_path=None):
    L.seed_everything(0)
    agent = make_agent()
    data = ToolTaskDataModule(batch_size=64, batches_per_epoch=8, val_problems_per_stage=128, advance_threshold=0.3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[checkpoint])
    trainer.fit(agent, data, ckpt_path=ckpt_path)
    return agent, data


def test_resume_restores_curriculum_and_continues_exactly(tmp_path):
    full, full_data = _fit(tmp_path / "full", max_epochs=4)
    _, half_data = _fit(tmp_path / "half", max_epochs=2)
    assert half_data.stage >= 1, "the test needs the curriculum to have moved before the checkpoint"
    resumed, resumed_data = _fit(tmp_path / "half", max_epochs=4, ckpt_path=str(tmp_path / "half" / "last.ckpt"))
    assert resumed_data.state_dict() == full_data.state_dict()
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def _project_class_defaults_differ(spec: dict) -> list[str]:
    """``init_args`` of a config section (and its nested project classes) that differ from the class's defaults."""
    module, _, name = spec["class_path"].rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    out = []
    for key, value in spec.get("init_args", {}).items():
        if isinstance(value, dict) and "class_path" in value:
            if not value["class_path"].startswith("torch."):
                out += _project_class_defaults_differ(value)
        elif parameters[key].default != value:
            out.append(f"{name}.{key}: default {parameters[key].default!r}, config {value!r}")
    return out


def test_class_defaults_are_the_default_config():
    config = yaml.safe_load((REPO / "configs/tool_agent/default.yaml").read_text())
    assert _project_class_defaults_differ(config["model"]) + _project_class_defaults_differ(config["data"]) == []


def test_benchmark_results_record_the_commit_and_library_versions():
    spec = importlib.util.spec_from_file_location("cli_runs", REPO / "bench" / "cli_runs.py")
    cli_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_runs)
    record = cli_runs.provenance()
    assert set(record) == {"commit", "dirty", "versions", "python"}
    assert torch.__version__.startswith(record["versions"]["torch"])
    assert {"lightning", "torchmetrics", "optuna"} <= set(record["versions"])
    assert record["commit"] is None or len(record["commit"]) == 40  # None outside a git checkout


def test_default_config_run_stopping_before_its_first_validation_ends_cleanly(in_tmp):
    # EarlyStopping used to look for val/greedy_acc_min at the end of the cut-short epoch and raise, so nothing was
    # checkpointed.
    run = main(["fit", "--config", str(REPO / "configs/tool_agent/default.yaml"), "--trainer.max_steps", "3",
                "--trainer.enable_progress_bar", "false"])
    assert run.trainer.state.finished and run.trainer.global_step == 3
    last = run.trainer.checkpoint_callback.last_model_path
    assert last and torch.load(last, weights_only=False)["global_step"] == 3


def _guarded_fit(*callbacks, max_steps=6):
    L.seed_everything(0)
    agent = make_agent()
    data = ToolTaskDataModule(batch_size=32, batches_per_epoch=4, val_problems_per_stage=32)
    trainer = make_trainer(max_epochs=-1, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=False)
    trainer.fit(agent, data)
    return agent, trainer


def test_a_nan_weight_is_rolled_back_and_training_continues():
    # It used to reach torch.multinomial at the next step: "probability tensor contains either inf, nan or element < 0".
    agent, trainer = _guarded_fit(InjectNaN({3}))
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert isinstance(agent, GuardedModule)
    assert trainer.global_step == 6 and guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in agent.parameters())


def test_nan_weights_step_after_step_stop_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="5 updates in a row had non-finite weights"):
        _guarded_fit(InjectNaN(set(range(1, 20))), max_steps=20)


def test_an_infinite_gradient_skips_the_manual_optimizer_step():
    # Manual optimisation: the guard's on_before_optimizer_step runs inside the Lightning optimizer's step().
    recorded = {}

    class InfiniteGradient(Callback):
        def on_after_backward(self, trainer, module):
            if trainer.global_step == 2:
                recorded["before"] = {n: p.detach().clone() for n, p in module.named_parameters()}
                module.policy.value_head.weight.grad.view(-1)[0] = float("inf")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if "before" in recorded and "after" not in recorded:
                recorded["after"] = {n: p.detach().clone() for n, p in module.named_parameters()}

    _, trainer = _guarded_fit(InfiniteGradient(), max_steps=4)
    assert trainer.global_step == 4
    assert all(torch.equal(recorded["after"][n], p) for n, p in recorded["before"].items())


def _run_cli(cwd, *args):
    command = [sys.executable, str(REPO / "train.py"), *args, "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=500,
                            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _saved_metrics(folder, rank=0):
    return json.loads((folder / f"metrics_rank{rank}.json").read_text())


def test_ddp_curriculum_and_validation_equal_one_process(tmp_path, monkeypatch):
    default, ddp = str(REPO / "configs/tool_agent/default.yaml"), str(REPO / "configs/trainer/ddp_cpu.yaml")
    save = ["--trainer.callbacks+=tests.helpers.SaveRankMetrics", "--trainer.callbacks.init_args.folder"]
    # A short fit on two processes passes the curriculum's stage 1 (the same on both ranks).
    output = _run_cli(tmp_path, "fit", "--config", default, "--config", ddp, "--trainer.max_epochs", "3",
             "--data.init_args.batches_per_epoch", "5", "--data.init_args.advance_threshold", "0.05",
             *save, str(tmp_path / "fit"))
    states = [_saved_metrics(tmp_path / "fit", rank)["datamodule"] for rank in (0, 1)]
    assert states[0] == states[1] and states[0]["stage"] == 2
    # Its checkpoint validated on two processes and on one: every logged validation metric is the same. (A
    # DistributedSampler pads 3 evaluation batches to 4 by repeating one: val/reward and val/episode_length
    # counted the stage-0 batch twice.)
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    _run_cli(tmp_path, "validate", "--config", default, "--config", ddp, "--ckpt_path", str(checkpoint),
             *save, str(tmp_path / "ddp"))
    monkeypatch.chdir(tmp_path)
    main(["validate", "--config", default, "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false",
          *save, str(tmp_path / "one")])
    one = _saved_metrics(tmp_path / "one")["metrics"]
    assert {"val/greedy_acc/stage_2", "val/reward", "val/episode_length"} <= set(one)
    for rank in (0, 1):
        assert _saved_metrics(tmp_path / "ddp", rank)["metrics"] == pytest.approx(one, rel=1e-6), rank
    # The greedy trajectories cover every stage on both processes, as on one (each process evaluates some stages).
    every_stage = {f"stage {k}" for k in range(NUM_STAGES)}
    trajectories = _saved_metrics(tmp_path / "one")["trajectories"]
    assert {line.split(" |")[0] for line in trajectories} == every_stage
    for rank in (0, 1):
        assert _saved_metrics(tmp_path / "ddp", rank)["trajectories"] == trajectories, rank
    printed = output.split("Greedy trajectories after training:")[1]
    assert every_stage <= {line.split(" |")[0] for line in printed.splitlines()}


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)


def _fit_saving_every(folder, every, ckpt_path=None):
    L.seed_everything(0)
    agent = make_agent()
    data = ToolTaskDataModule(batch_size=64, batches_per_epoch=6, val_problems_per_stage=128, advance_threshold=0.3)
    losses = RecordLosses()
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    make_trainer(max_epochs=3, callbacks=[losses, checkpoints]).fit(agent, data, ckpt_path=ckpt_path)
    return agent, data, losses.losses


@pytest.mark.parametrize("step", [4, 8, 12])  # mid-epoch 0; mid-epoch 1, after the curriculum moved; last of epoch 1
def test_resume_from_any_step_continues_exactly(tmp_path, step):
    # Resumed mid-epoch, the problem stream used to start its epoch again: step 5 trained on step 1's problems.
    full, full_data, full_losses = _fit_saving_every(tmp_path / "full", every=4)
    assert full_data.stage >= 1, "the test needs the curriculum to move"
    resumed, resumed_data, resumed_losses = _fit_saving_every(tmp_path / "resumed", every=100,
                                                              ckpt_path=str(tmp_path / "full" / f"step={step}.ckpt"))
    assert sorted(resumed_losses) == list(range(step + 1, 19))
    assert resumed_losses == {s: full_losses[s] for s in resumed_losses}
    assert resumed_data.state_dict() == full_data.state_dict()
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_evaluation_batches_are_dealt_whole_and_once(world_size):
    data = ToolTaskDataModule(val_problems_per_stage=100, eval_batch_size=40)  # 3 batches per stage: 9 in all
    data.setup("validate")
    empty = (data.val_set.digits[:0], data.val_set.stages[:0])
    shares = [list(RankBatches(data.val_set, rank, world_size, empty)) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1  # every rank steps as often
    batches = [batch for share in shares for batch in share if len(batch[0])]
    assert len(batches) == len(data.val_set)
    assert sorted(tuple(d.tolist()) for d, _ in batches) == sorted(tuple(data.val_set[i][0].tolist())
                                                                   for i in range(len(data.val_set)))
    assert all(len(s.unique()) == 1 for _, s in batches)  # each batch holds one stage
