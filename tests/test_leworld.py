"""LeWorld: memory reads against naive slicing, soft reads, gradients, the task, phases, resume and DDP."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.leworld_data import (
    LeWorldDataModule,
    LeWorldTask,
    populate_from_experience,
    populate_structured,
    random_walk_experience,
)
from lightning_modules.leworld import LeWorldBaseline, LeWorldPhase1, LeWorldPhase2, LeWorldPhase3, range_iou
from lightning_modules.leworld_losses import sequence_losses
from models.leworld import ArtificialMemory, BigLeWorldModel, LeWorldSystem
from tests.conftest import REPO

TINY_DATA = dict(num_words=256, word_size=8, state_dim=16, char_dim=32, num_pages=4, seq_len=6,
                 difficulty="medium", train_sequences=128, val_sequences=32, test_sequences=32, batch_size=32,
                 eval_batch_size=32)


def tiny_system(**overrides) -> LeWorldSystem:
    args = dict(state_dim=16, char_dim=32, num_slms=3, num_words=256, word_size=8, max_read_range=16, d_read=8,
                slm_d_model=16, slm_layers=1, slm_heads=2, blm_d_model=16, blm_layers=1, blm_heads=2, info_dim=8)
    return LeWorldSystem(**(args | overrides))


def random_memory(num_words=512, word_size=16, max_read_range=64, seed=0) -> ArtificialMemory:
    memory = ArtificialMemory(num_words, word_size, max_read_range, d_read=8)
    memory.load_bits(torch.randint(0, 2, (num_words, word_size), generator=torch.Generator().manual_seed(seed)))
    return memory


def random_ranges(memory: ArtificialMemory, n: int, seed=1):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, memory.num_words, (n,), generator=g)
    lengths = torch.randint(1, memory.max_read_range + 1, (n,), generator=g)
    return starts, torch.minimum(starts + lengths, torch.tensor(memory.num_words))


# --- memory -----------------------------------------------------------------------------------------------------
def test_batched_reads_equal_naive_slicing_exactly():
    memory = random_memory()
    starts, ends = random_ranges(memory, 300)
    means = memory.range_mean(starts, ends)
    block, encoded, mask = memory.read(starts, ends)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        naive = memory.bits[s:e]
        assert torch.equal(means[i], naive.mean(0)), i
        assert torch.equal(block[i, : e - s], naive) and not block[i, e - s :].any()
        assert mask[i].sum() == e - s and mask[i, : e - s].all()
    assert torch.equal(memory.range_mean_loop(starts, ends), means)
    assert torch.allclose(encoded, memory.encode(torch.stack([memory.bits[s:e].mean(0) for s, e in
                                                              zip(starts.tolist(), ends.tolist())]), ends - starts))
    # any index shape
    assert torch.equal(memory.range_mean(starts.view(20, 15), ends.view(20, 15)), means.view(20, 15, -1))


def test_soft_start_read_is_the_exact_expectation_and_the_hard_read_in_its_limit():
    memory = random_memory(num_words=64, word_size=8, max_read_range=16)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 64, generator=g), -1)
    lengths = torch.tensor([1, 3, 16, 7, 12])
    soft = memory.soft_start_mean(probs, lengths)
    for b in range(5):
        windows = torch.stack([memory.bits[s : min(s + int(lengths[b]), 64)].mean(0) for s in range(64)])
        assert torch.allclose(soft[b], probs[b] @ windows, atol=1e-5)
    starts = torch.tensor([0, 10, 63, 50, 33])
    sharp = torch.softmax(torch.nn.functional.one_hot(starts, 64).float() * 1e4, -1)
    ends = torch.minimum(starts + lengths, torch.tensor(64))
    assert torch.allclose(memory.soft_start_mean(sharp, lengths), memory.range_mean(starts, ends), atol=1e-5)
    length_probs = torch.softmax(torch.nn.functional.one_hot(lengths - 1, 16).float() * 1e4, -1)
    assert torch.allclose(memory.soft_length_mean(starts, length_probs), memory.range_mean(starts, ends), atol=1e-5)


def test_straight_through_read_is_the_hard_read_forward():
    system = tiny_system()
    system.memory.load_bits(torch.randint(0, 2, (256, 8), generator=torch.Generator().manual_seed(0)))
    out = system.slms[0](torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 32))
    hard = system.memory.encode(system.memory.range_mean(out["start_addr"], out["end_addr"]),
                                out["end_addr"] - out["start_addr"])
    assert torch.allclose(system.read_slot(out), hard, atol=1e-6)
    system.read_impl = "loop"
    assert torch.allclose(system.read_slot(out), hard, atol=1e-5)


def test_out_of_bounds_ranges_are_rejected_or_clamped():
    memory = random_memory(num_words=128, word_size=4, max_read_range=16)
    for starts, ends, message in [
        ([-1], [3], "out of bounds"),
        ([120], [129], "out of bounds"),
        ([5], [5], "length must be in"),
        ([0], [17], "length must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            memory.read(torch.tensor(starts), torch.tensor(ends))
    s, e = memory.check_range(torch.tensor([-5, 127, 10, 3]), torch.tensor([2, 400, 10, 100]), clamp=True)
    assert s.tolist() == [0, 127, 10, 3] and e.tolist() == [2, 128, 11, 19]
    # SLM ranges never leave memory: the top address with the longest length is cut at num_words
    system = tiny_system()
    slm = system.slms[0]
    for head in (slm.hi_head, slm.lo_head, slm.range_head):
        torch.nn.init.zeros_(head.weight)
        head.bias.data = torch.arange(head.out_features, dtype=torch.float)
    out = slm(torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 32))
    assert out["start_addr"].tolist() == [255, 255] and out["end_addr"].tolist() == [256, 256]
    with pytest.raises(ValueError, match="power of two"):
        ArtificialMemory(num_words=1000)


def test_write_path_stores_bits_and_trains_the_projection():
    memory = random_memory(num_words=64, word_size=8, max_read_range=8)
    values = torch.randn(3, 8, requires_grad=True)
    written = memory.write(torch.tensor([4, 5, 6]), values)
    assert torch.equal(memory.bits[4:7], written.detach())
    assert torch.equal(memory.range_mean(torch.tensor([4]), torch.tensor([7]))[0], written.detach().mean(0))
    written.sum().backward()
    assert memory.write_proj.weight.grad.abs().sum() > 0 and values.grad.abs().sum() > 0


# --- the task ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("difficulty,fresh", [("easy", False), ("medium", True), ("hard", False)])
def test_every_relevant_region_drives_the_dynamics_and_follows_from_the_observations(difficulty, fresh):
    task = LeWorldTask(256, 8, 16, 32, 4, difficulty, "structured", decay=0.8, noise_std=0.0, cell_words=4,
                       flip_prob=0.1, seed=3)
    data = task.sample(64, 6, torch.Generator().manual_seed(0), eval_memory=fresh)
    bits = task.eval_bits if fresh else task.bits
    n = {"easy": 1, "medium": 2, "hard": 3}[difficulty]
    assert data["valid"].sum(1).eq(n).all()
    x = data["states"][..., 4:]
    increments = x[:, 1:] - 0.8 * x[:, :-1]
    terms = []
    for j in range(3):
        means = torch.stack([torch.stack([bits[s:e].mean(0) for s, e in zip(srow.tolist(), erow.tolist())])
                             for srow, erow in zip(data["starts"][:, :-1, j], data["ends"][:, :-1, j])])
        content = (2 * means - 1 - task.content_mean) / task.content_std
        terms.append(content @ task.mixing[j].T * data["valid"][:, j, None, None])
    assert torch.allclose(increments, sum(terms), atol=1e-4)
    for j in range(n):  # each relevant slot moves the state
        assert terms[j].abs().mean() > 0.1
    # The ranges are a function of the characteristics and the current page.
    code = data["chars"] @ task.rotation  # undo the rotation
    bits = (code[:, : 3 * task.slot_bits].view(-1, 3, task.slot_bits) > 0).long()
    weights = torch.cat([2 ** torch.arange(task.group_bits), 2 ** torch.arange(3), 2 ** torch.arange(2)])
    fields = [(bits * weights)[..., a:b].sum(-1) for a, b in [(0, task.group_bits), (task.group_bits,
                                                                                      task.group_bits + 3),
                                                               (task.group_bits + 3, task.slot_bits)]]
    pages = data["states"][..., :4].argmax(-1)
    starts, ends = task.ranges(fields[0], fields[1], fields[2] + 1, pages)
    valid = data["valid"][:, None, :].expand_as(starts)
    assert torch.equal(starts[valid], data["starts"][valid]) and torch.equal(ends[valid], data["ends"][valid])


def test_population_strategies():
    g = torch.Generator().manual_seed(0)
    structured = populate_structured(64, 16, g, cell_words=8, flip_prob=0.0)
    assert torch.equal(structured[0], structured[7]) and set(structured.unique().tolist()) <= {0.0, 1.0}
    walk = random_walk_experience(64, 16, g)
    bits = populate_from_experience(walk, 100, 16)
    assert bits.shape == (100, 16) and not bits[64:].any() and bits[:64].sum(1).eq(8).all()
    for population in ("random", "structured", "experience"):
        LeWorldDataModule(**TINY_DATA, population=population).split("val")
    with pytest.raises(ValueError, match="unknown difficulty"):
        LeWorldDataModule(**(TINY_DATA | {"difficulty": "extreme"}))
    with pytest.raises(ValueError, match="char_dim"):
        LeWorldDataModule(**(TINY_DATA | {"char_dim": 8}))


def test_range_iou():
    iou = range_iou(torch.tensor([[0, 10]]), torch.tensor([[10, 20]]), torch.tensor([[5]]), torch.tensor([[15]]))
    assert torch.allclose(iou.squeeze(), torch.tensor([5 / 15, 5 / 15]))


# --- gradients --------------------------------------------------------------------------------------------------
def batch_of(dm: LeWorldDataModule, split="train", n=8):
    return {k: v[:n] for k, v in dm.split(split).items()}


def rollout_loss(system: LeWorldSystem, batch) -> torch.Tensor:
    """Phase 2's loss without auxiliary terms: the next-state MSE of a teacher-forced rollout."""
    return sequence_losses(system.multi_step_forward(batch["states"], batch["chars"])["steps"], batch["states"], {})[1]


def test_gradients_reach_the_slm_address_logits_and_the_info_request():
    L.seed_everything(0)
    dm = LeWorldDataModule(**TINY_DATA)
    batch = batch_of(dm)
    phase2 = LeWorldPhase2(tiny_system())
    phase2.system.memory.load_bits(dm.memory_bits)
    rollout_loss(phase2.system, batch).backward()
    for slm in phase2.system.slms:
        for head in (slm.hi_head, slm.lo_head, slm.range_head):
            assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    phase3 = LeWorldPhase3(tiny_system())
    phase3.system.memory.load_bits(dm.memory_bits)
    phase3.paired_branches(batch)["loss"].backward()
    request = phase3.system.blm.info_request.weight.grad
    assert request[:-1].abs().sum() > 0, "the query gets no gradient"
    assert request[-1].abs().sum() > 0, "the request gate gets no gradient (the seed's detached term)"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phase3.system.info_to_slm.parameters())
    no_hidden = tiny_system(blm_sees_slm_hidden=False)
    no_hidden.memory.load_bits(dm.memory_bits)
    rollout_loss(no_hidden, batch).backward()
    assert no_hidden.slms[0].hi_head.weight.grad.abs().sum() > 0
    assert torch.equal(no_hidden.slot_hidden(torch.ones(2, 3)), torch.zeros(2, 3))
    no_st = tiny_system(straight_through_reads=False)
    no_st.memory.load_bits(dm.memory_bits)
    rollout_loss(no_st, batch).backward()
    assert no_st.slms[0].hi_head.weight.grad is None or no_st.slms[0].hi_head.weight.grad.abs().sum() == 0


def test_oracle_and_no_memory_baselines_and_bad_arguments():
    with pytest.raises(ValueError, match="oracle"):
        LeWorldBaseline(BigLeWorldModel(16, 0, 16, 8, 16, 1, 2, 8), mode="oracle")
    with pytest.raises(ValueError, match="no_memory"):
        LeWorldBaseline(BigLeWorldModel(16, 3, 16, 8, 16, 1, 2, 8), mode="no_memory")
    with pytest.raises(FileNotFoundError, match="phase1.ckpt"):
        LeWorldPhase2(tiny_system(), init_from="missing/phase1.ckpt")
    with pytest.raises(ValueError, match="max_grad_norm"):
        LeWorldPhase1(tiny_system(), max_grad_norm=-1.0)
    dm = LeWorldDataModule(**TINY_DATA)
    batch = batch_of(dm)
    oracle = LeWorldBaseline(BigLeWorldModel(16, 3, 16, 8, 16, 1, 2, 8), "oracle", ArtificialMemory(256, 8, 16, 8))
    oracle.memory.load_bits(dm.memory_bits)
    oracle.evaluate(batch, oracle.val_metrics)
    assert "val/mse/h4" in oracle.val_metrics.compute()
    with pytest.raises(ValueError, match="num_words"):
        LeWorldPhase1(tiny_system(num_words=512)).check_task(dm.task)


# --- training ---------------------------------------------------------------------------------------------------
def make_trainer(folder, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=folder, limit_val_batches=1, **kwargs)


def test_phases_chain_through_checkpoints(tmp_path):
    L.seed_everything(0)
    dm = LeWorldDataModule(**TINY_DATA)
    phase1 = LeWorldPhase1(tiny_system())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="phase1")
    make_trainer(tmp_path, max_steps=4, callbacks=[checkpoint]).fit(phase1, dm)
    phase2 = LeWorldPhase2(tiny_system(), init_from=str(tmp_path / "phase1.ckpt"))
    for (name, a), (_, b) in zip(phase1.system.state_dict().items(), phase2.system.state_dict().items()):
        assert torch.equal(a, b), name
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(phase2, dm)
    assert {"val/mse", "val/hit_rate", "val/routing_entropy", "val/usage/slm_0", "val/mse/h1"} <= set(
        trainer.callback_metrics)
    # Validation ran on the fresh evaluation memory, training on the training memory.
    assert not torch.equal(dm.memory_bits_for("val"), dm.memory_bits_for("train"))
    assert torch.equal(phase2.system.memory.bits, dm.memory_bits_for("val"))
    phase2.use_memory("train")
    assert torch.equal(phase2.system.memory.bits, dm.memory_bits_for("train"))


def _fit_phase3(folder, max_epochs, ckpt_path=None):
    L.seed_everything(0)
    module = LeWorldPhase3(tiny_system())
    dm = LeWorldDataModule(**TINY_DATA)
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
    make_trainer(folder, max_epochs=max_epochs, callbacks=[checkpoint]).fit(module, dm, ckpt_path=ckpt_path)
    return module


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    full = _fit_phase3(tmp_path / "full", max_epochs=2)
    _fit_phase3(tmp_path / "half", max_epochs=1)
    resumed = _fit_phase3(tmp_path / "half", max_epochs=2, ckpt_path=str(tmp_path / "half" / "last.ckpt"))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path):
    out = tmp_path / "params"
    tiny = [f"--data.init_args.{k}={v}" for k, v in TINY_DATA.items()] + [
        f"--model.init_args.system.init_args.{k}={v}" for k, v in dict(
            state_dim=16, num_words=256, word_size=8, max_read_range=16, d_read=8, slm_d_model=16, blm_d_model=16,
            blm_layers=1, info_dim=8).items()]
    command = [
        sys.executable, str(REPO / "train.py"), "fit",
        "--config", str(REPO / "configs/leworld/phase2.yaml"),
        "--config", str(REPO / "configs/trainer/ddp_cpu.yaml"),
        *tiny,
        "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.helpers.SaveRankParameters",
        f"--trainer.callbacks.init_args.folder={out}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
                                 "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
