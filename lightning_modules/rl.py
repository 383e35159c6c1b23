"""Return and advantage estimators and clipped losses shared by the reinforcement-learning modules."""

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


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_range: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's pessimistic objective ``mean(max(-A r, -A clip(r, 1 - e, 1 + e)))`` over the masked tokens, with
    ``r = exp(logprobs - old_logprobs)``; returns ``(loss, ratio, log_ratio)``."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return masked_mean(torch.max(unclipped, clipped), mask), ratio, log_ratio


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """``0.5 * mean(max((v - R)^2, (v_old + clip(v - v_old, -e, e) - R)^2))`` over the masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
