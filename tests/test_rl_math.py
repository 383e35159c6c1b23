"""GAE, masked statistics and the A2C loss against hand computations."""

import pytest
import torch

from lightning_modules.rl import gae, masked_mean, masked_normalize


def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # Episode 0: three steps, terminal after the last.
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # Episode 1: two steps; the value 9.0 after its end must not be bootstrapped.
    e1 = 2.0 - 0.3
    e0 = gamma * 0.3 - 0.2
    b1 = e1
    b0 = e0 + gamma * lam * b1
    expected = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)


def test_gae_with_lambda_one_is_discounted_monte_carlo_return():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.rand(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[0.125, 0.25, 0.5, 1.0]]), atol=1e-6)


def test_masked_statistics_ignore_padding():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    normalized = masked_normalize(values, mask)
    assert normalized[0, 2].item() == 0.0
    assert normalized[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


def test_rollout_iteration_deals_each_epochs_minibatches_once_and_round_trips_through_its_state():
    from lightning_modules.policy_rl import RolloutIteration

    iteration = RolloutIteration()
    assert iteration.done and iteration.taken == 0
    buffer = {"ids": torch.arange(10).unsqueeze(1), "values": torch.arange(10.0), "prompt_length": torch.tensor(3)}
    iteration.start(buffer, size=4, epochs=2, generator=torch.Generator().manual_seed(0))
    assert iteration.total == 4  # 2 epochs x 2 full minibatches of 4 (the short last one of each pass is dropped)
    index, mb = iteration.next(torch.device("cpu"))
    assert iteration.taken == 1 and set(mb) == {"ids", "values"}  # per-sequence tensors only
    assert torch.equal(mb["values"], index.float())
    copy = RolloutIteration()
    copy.load(iteration.state())
    rest = [copy.next(torch.device("cpu"))[0] for _ in range(3)]
    assert copy.done and copy.taken == 4
    first_epoch = torch.cat([index, rest[0]])
    assert len(set(first_epoch.tolist())) == 8  # no sequence twice within a pass
    copy.clear()
    assert copy.buffer is None and copy.done
