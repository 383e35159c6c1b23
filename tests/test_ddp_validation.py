"""`train.py validate` of one checkpoint on two gloo CPU processes and on one: every logged validation metric equal,
for every system with DDP (the tool agent's own test is in tests/test_tool_agent.py).

Each system validates an odd number of batches (3), so a ``DistributedSampler`` would pad them to 4 by repeating
one, and a rank-local batch index would seed rank 1's samples as one process seeds its first batch."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from torch.utils.data import DataLoader

from datamodules.distributed import Chunks, RankBatches, global_batch_index
from experiment.cli import main
from tests.conftest import REPO

TINY_LM = ["--model.init_args.lm.hidden_size", "32", "--model.init_args.lm.num_layers", "1",
           "--model.init_args.lm.num_heads", "2"]
STORIES = ["--data.init_args.num_stories", "140", "--data.init_args.vocab_size", "320",  # 7 validation stories
           "--data.init_args.eval_batch_size", "3"]  # 3 batches: 3, 3, 1
TINY_LEWORLD = [f"--data.init_args.{k}={v}" for k, v in dict(
    num_words=256, word_size=8, state_dim=16, char_dim=32, num_pages=4, seq_len=6, train_sequences=128,
    val_sequences=40, test_sequences=32, batch_size=32, eval_batch_size=16).items()] + [  # 3 batches: 16, 16, 8
    f"--model.init_args.system.init_args.{k}={v}" for k, v in dict(
        state_dim=16, num_words=256, word_size=8, max_read_range=16, d_read=8, slm_d_model=16, blm_d_model=16,
        blm_layers=1, info_dim=8).items()]
# system: (config, test-size arguments, whether it uses the tokenizer cache)
SYSTEMS = {
    "sft": ("rlhf/sft.yaml", [*STORIES, "--data.init_args.batch_size", "8", *TINY_LM], True),
    "reward_model": ("rlhf/reward.yaml", [*STORIES, "--data.init_args.batch_size", "8", *TINY_LM], True),
    "ppo": ("rlhf/ppo.yaml", [*STORIES, "--data.init_args.batch_size", "16", "--model.init_args.minibatch_size", "4",
                              "--model.init_args.max_new_tokens", "8", *TINY_LM], True),
    "dpo": ("rlhf/dpo.yaml", [*STORIES, "--data.init_args.batch_size", "8", "--model.init_args.max_new_tokens", "8",
                              *TINY_LM], True),
    "grpo": ("rlhf/grpo.yaml", [*STORIES, "--data.init_args.batch_size", "4", "--model.init_args.minibatch_size", "8",
                                "--model.init_args.max_new_tokens", "8", *TINY_LM], True),
    "agentic_sft": ("rlhf/agentic_sft.yaml", [
        "--data.init_args.num_train_tasks", "20", "--data.init_args.num_eval_tasks", "5",  # 10 turns
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "4",  # 3 batches: 4, 4, 2
        "--data.init_args.vocab_size", "320", "--model.init_args.max_new_tokens", "8", *TINY_LM], True),
    "agentic_grpo": ("rlhf/agentic_grpo.yaml", [
        "--data.init_args.num_train_tasks", "20", "--data.init_args.num_eval_tasks", "5",  # 5 greedy episodes
        "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2",  # 3 batches: 2, 2, 1
        "--data.init_args.vocab_size", "320", "--model.init_args.group_size", "2",
        "--model.init_args.minibatch_size", "4", "--model.init_args.max_new_tokens", "8", *TINY_LM], True),
    # 3 episodes in each of 3 splits, 3 a batch: rank 0 plays train and out-of-domain, rank 1 held-out only.
    "early_experience": ("early_experience/web_shop_il.yaml", [
        "--data.init_args.train_goals", "8", "--data.init_args.eval_goals", "3", "--data.init_args.batch_size", "4",
        "--data.init_args.eval_batch_size", "3", "--data.init_args.vocab_size", "320",
        "--model.init_args.evaluate_before_training", "false", *TINY_LM], True),
    "leworld": ("leworld/phase2.yaml", TINY_LEWORLD, False),
}
# Two fits (reward model, policy) and sampled generations: about a minute each; and, to keep the default run short,
# the cases whose evaluation code the default ones share (the metric objects of SFT, the episodes of agentic GRPO).
SLOW = {"ppo", "dpo", "grpo", "reward_model", "agentic_sft", "agentic_grpo", "early_experience", "leworld"}
NEEDS_REWARD_MODEL = {"ppo", "dpo", "grpo"}


def _saved(folder, rank=0) -> dict[str, float]:
    return json.loads((folder / f"metrics_rank{rank}.json").read_text())["metrics"]


def _fit(base: list[str], checkpoint) -> str:
    """Two training steps in this process (``base`` runs in the current folder); the weights saved to ``checkpoint``."""
    fit = main(["fit", *base, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                "--trainer.logger", "false"])
    fit.trainer.save_checkpoint(checkpoint)
    return str(checkpoint)


@pytest.mark.parametrize("system", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SYSTEMS])
def test_validation_on_two_processes_equals_one_process(system, tmp_path, monkeypatch):
    config, tiny, tokenizer = SYSTEMS[system]
    common = ["--trainer.enable_progress_bar", "false"]
    common += ["--data.init_args.tokenizer_cache", str(tmp_path / "tokenizers")] if tokenizer else []
    base = ["--config", str(REPO / "configs" / config), *tiny, *common]
    monkeypatch.chdir(tmp_path)
    if system in NEEDS_REWARD_MODEL:  # a trained reward model: an untrained one is drawn afresh in every process
        reward, reward_tiny, _ = SYSTEMS["reward_model"]
        reward_base = ["--config", str(REPO / "configs" / reward), *reward_tiny, *common]
        base += ["--model.init_args.reward_model_from", _fit(reward_base, tmp_path / "reward.ckpt")]
    checkpoint = _fit(base, tmp_path / "model.ckpt")
    save = ["--trainer.callbacks+=tests.helpers.SaveRankMetrics", "--trainer.callbacks.init_args.folder"]
    main(["validate", *base, "--ckpt_path", checkpoint, "--trainer.logger", "false", *save, str(tmp_path / "one")])
    command = [sys.executable, str(REPO / "train.py"), "validate", *base, "--config",
               str(REPO / "configs/trainer/ddp_cpu.yaml"), "--ckpt_path", checkpoint, "--trainer.logger", "false",
               *save, str(tmp_path / "two")]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one = _saved(tmp_path / "one")
    assert len([k for k in one if k.startswith("val/")]) >= 2, one
    for rank in (0, 1):
        two = _saved(tmp_path / "two", rank)
        assert two.keys() == one.keys(), rank
        assert two == pytest.approx(one, rel=1e-5), rank


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_batches_are_dealt_whole_once_and_in_order(workers):
    batches = Chunks(list(range(17)), 3)  # 6 batches, the last of 2
    shares = [list(DataLoader(RankBatches(batches, rank, 4, empty=[]), batch_size=None, num_workers=workers))
              for rank in range(4)]
    # Batch i goes to rank i mod 4; every rank steps twice, ranks 2 and 3 the second time on an empty batch.
    assert shares == [[[0, 1, 2], [12, 13, 14]], [[3, 4, 5], [15, 16]], [[6, 7, 8], []], [[9, 10, 11], []]]
    for rank, share in enumerate(shares):  # the global index of each is its index on one process
        trainer = SimpleNamespace(world_size=4, global_rank=rank)
        assert all(batch == batches[global_batch_index(trainer, j)] for j, batch in enumerate(share) if batch)
    assert list(RankBatches(batches, empty=[])) == [batches[i] for i in range(6)]  # one process: all, in order
