"""LeWorld's ``latent`` level: the other levels' data unchanged, the hidden regime's effect on ranges and dynamics,
the SLMs' view without the past state, and the need-weighted routing balance."""

import hashlib

import pytest
import torch

from datamodules.leworld_data import REGIME_SHIFT, LeWorldDataModule, LeWorldTask
from lightning_modules.leworld_losses import routing_balance, slot_need
from tests.test_leworld import tiny_system

SMALL = dict(train_sequences=64, val_sequences=32, test_sequences=32, batch_size=32, seed=3)
# sha256 (first 16 hex digits) of every split of the default-size task, seed 3, taken before the latent level existed
EARLIER = {("easy", "structured"): "6d038eac4fe6ad6b", ("easy", "regions"): "685a4f245cb7e971",
           ("medium", "structured"): "0ed6f9f4150cd819", ("medium", "regions"): "f31e73950a4e9cfb",
           ("hard", "structured"): "151a8fac2e49e9fd", ("hard", "regions"): "0b24dd7a22168169"}


def digest(data: LeWorldDataModule) -> str:
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for key, value in sorted(data.split(split).items()):
            h.update(key.encode())
            h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("difficulty,population", sorted(EARLIER))
def test_the_other_levels_generate_the_same_data_as_before(difficulty, population):
    assert digest(LeWorldDataModule(difficulty=difficulty, population=population, **SMALL)) == EARLIER[
        (difficulty, population)]


def latent_task(switch: float = 0.05) -> LeWorldTask:
    return LeWorldTask(256, 8, 16, 32, 4, "latent", "structured", decay=0.8, noise_std=0.0, cell_words=4,
                       flip_prob=0.1, seed=3, regime_switch_prob=switch)


def test_the_regime_shifts_the_offset_and_flips_the_decay():
    task = latent_task()
    data = task.sample(64, 6, torch.Generator().manual_seed(0))
    regime = data["regime"]
    assert set(regime.unique().tolist()) == {0, 1} and data["valid"].sum(1).eq(2).all()
    # The characteristics hold k in 0..3; the relevant range is the one of offset k + 4 r_t.
    code = (data["chars"] @ task.rotation)[:, : 3 * task.slot_bits].view(-1, 3, task.slot_bits) > 0
    g_bits = task.group_bits
    group = (code[..., :g_bits].long() * 2 ** torch.arange(g_bits)).sum(-1)
    offset = (code[..., g_bits:g_bits + 3].long() * 2 ** torch.arange(3)).sum(-1)
    length = (code[..., g_bits + 3:].long() * 2 ** torch.arange(2)).sum(-1) + 1
    assert offset[:, :2].max() < REGIME_SHIFT  # slot 2 is not relevant: no code
    pages = data["states"][..., :4].argmax(-1)
    starts, ends = task.ranges(group, offset, length, pages, REGIME_SHIFT * regime)
    assert torch.equal(starts[:, :, :2], data["starts"][:, :, :2])
    assert torch.equal(ends[:, :, :2], data["ends"][:, :, :2])
    other, _ = task.ranges(group, offset, length, pages, REGIME_SHIFT * (1 - regime))
    assert not torch.equal(other[:, :, :2], data["starts"][:, :, :2])
    # x_{t+1} = (1 - 2 r_t) 0.8 x_t + drive: without noise the drive is what is left after the signed decay.
    x = data["states"][..., 4:]
    sign = (1 - 2 * regime[:, :-1]).float().unsqueeze(-1)
    content = task.content(data["starts"][:, :-1], data["ends"][:, :-1])
    drive = torch.einsum("jxw,btjw->btjx", task.mixing, content)[:, :, :2].sum(2)
    assert torch.allclose(x[:, 1:], sign * 0.8 * x[:, :-1] + drive, atol=1e-4)


def test_the_regime_is_a_rarely_switching_markov_chain():
    never, always = latent_task(0.0), latent_task(1.0)
    g = torch.Generator().manual_seed(1)
    assert (never.regimes(500, 8, g).diff(dim=1) == 0).all()
    assert (always.regimes(500, 8, g).diff(dim=1).abs() == 1).all()
    r = latent_task(0.05).regimes(4000, 8, g)
    assert r[:, 0].float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (r.diff(dim=1) != 0).float().mean().item() == pytest.approx(0.05, abs=0.01)


def test_the_regime_is_not_in_the_batch_of_other_levels_and_bad_switch_probabilities_fail():
    assert "regime" not in LeWorldDataModule(**SMALL).split("train")
    with pytest.raises(ValueError, match="regime_switch_prob"):
        LeWorldTask(256, 8, 16, 32, 4, "latent", "structured", 0.8, 0.0, 4, 0.1, 3, regime_switch_prob=1.5)


def test_slms_without_the_past_state_ignore_it_and_the_blm_still_sees_it():
    torch.manual_seed(0)
    system = tiny_system(slm_sees_past=False).eval()
    current, chars = torch.randn(4, 16), torch.randn(4, 32)
    a, b = system(torch.randn(4, 16), current, chars), system(torch.randn(4, 16), current, chars)
    assert torch.equal(a["slm"]["start_logits_low"], b["slm"]["start_logits_low"])
    assert not torch.allclose(a["prediction"], b["prediction"])
    seeing = tiny_system(slm_sees_past=True).eval()
    seeing.load_state_dict(system.state_dict())
    c, d = seeing(torch.randn(4, 16), current, chars), seeing(torch.randn(4, 16), current, chars)
    assert not torch.allclose(c["slm"]["start_logits_low"], d["slm"]["start_logits_low"])


# --- the routing balance against the slots' need ------------------------------------------------------------------
def test_balance_is_zero_when_needed_slms_share_evenly_and_unneeded_ones_are_off():
    need = torch.tensor([1.0, 1.0, 0.0])
    assert routing_balance(torch.tensor([0.9, 0.9, 0.0]), need).item() == pytest.approx(0.0, abs=1e-6)
    # An unneeded SLM switched on: shares (1/3, 1/3, 1/3) against (1/2, 1/2, 0): 3 * (2/36 + 1/9) = 0.5.
    assert routing_balance(torch.tensor([1.0, 1.0, 1.0]), need).item() == pytest.approx(0.5, abs=1e-6)
    # The old CV^2 is 0 there and rewards switching SLM 2 on; the need target does not.
    assert routing_balance(torch.tensor([1.0, 1.0, 1.0])).item() == pytest.approx(0.0, abs=1e-6)
    # A uniform need gives exactly the CV^2.
    usage = torch.tensor([0.2, 0.9, 0.5])
    assert routing_balance(usage, torch.ones(3)).item() == pytest.approx(routing_balance(usage).item(), rel=1e-5)


def test_balance_gradient_turns_unneeded_slms_off_and_evens_out_the_needed_ones():
    need = torch.tensor([1.0, 1.0, 0.0])
    usage = torch.tensor([0.4, 0.8, 0.6], requires_grad=True)
    routing_balance(usage, need).backward()
    grad = usage.grad  # descent moves usage by -grad
    assert grad[2] > 0  # the unneeded SLM is pushed off
    assert grad[0] < grad[1]  # and the less-used needed SLM up more than the other
    usage = torch.tensor([0.4, 0.8, 0.0], requires_grad=True)
    routing_balance(usage, need).backward()
    assert usage.grad[0] < 0 < usage.grad[1]  # unneeded off: the needed ones are evened out


def test_slot_need_is_the_share_of_sequences_needing_each_slms_slot():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(slot_need(valid, 3), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(slot_need(valid, 4), torch.tensor([1.0, 0.5, 0.0, 0.0]))
