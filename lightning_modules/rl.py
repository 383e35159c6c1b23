"""Return and advantage estimators shared by the reinforcement-learning modules."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_normalize(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero-mean, unit-variance over the masked entries; the others become 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return torch.where(mask.bool(), (values - mean) / (var.sqrt() + eps), torch.zeros_like(values))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[B, T]`` episodes that all terminate inside the window.

    ``mask[b, t]`` marks the steps episode ``b`` took; the step after the last one has value 0 (terminal).
    Returns ``(advantages, returns)``, both zero outside the mask; ``returns = advantages + values``.
    """
    mask = mask.to(values.dtype)
    next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1)) * next_mask
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask
