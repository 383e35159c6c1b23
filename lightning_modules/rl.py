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

    ``mask[b, t]`` marks the steps episode ``b`` took, in order; they need not be adjacent (an agent's tokens with
    an environment's between them): the step after one is the next marked column, and the step after the last one
    has value 0 (terminal). Rewards outside the mask are ignored. Returns ``(advantages, returns)``, both zero
    outside the mask; ``returns = advantages + values``.
    """
    mask = mask.to(values.dtype)
    # Each row's steps gathered to its front, in order, so the recursion skips the columns between them.
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    advantages = _adjacent_gae(rewards.gather(1, order), values.gather(1, order), mask.gather(1, order), gamma, lam)
    advantages = torch.zeros_like(values).scatter(1, order, advantages)
    return advantages, (advantages + values) * mask


def _adjacent_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """GAE's advantages when each row's steps are its first ``mask.sum()`` columns."""
    next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1)) * next_mask
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    return advantages * mask


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


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's k3):
    ``exp(ref - logp) - (ref - logp) - 1``; never negative, unbiased, and lower-variance than ``logp - ref``."""
    delta = ref_logprobs - logprobs
    return delta.exp() - delta - 1


def minibatch_indices(n: int, size: int, epochs: int, generator: torch.Generator) -> list[Tensor]:
    """``epochs`` shuffled passes over ``n`` rollouts in minibatches of ``min(size, n)`` indices (a short last
    one is dropped), drawn from ``generator`` so a resumed run can rebuild or restore the same order."""
    size = min(size, n)
    return [chunk for _ in range(epochs) for chunk in torch.randperm(n, generator=generator).split(size)
            if len(chunk) == size]


def shaped_scores(scores: Tensor, response: Tensor, response_mask: Tensor, eos_token_id: int, clip: float,
                  missing_eos_penalty: float | None = None) -> Tensor:
    """Reward-model scores lowered by ``missing_eos_penalty`` for responses that never emit ``<eos>``, then
    clipped to ``+-clip``."""
    if missing_eos_penalty is not None:
        ended = ((response == eos_token_id) & response_mask.bool()).any(1)
        scores = scores - missing_eos_penalty * (~ended).to(scores.dtype)
    return scores.clamp(-clip, clip)


def group_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """GRPO's critic-free advantages: ``(reward - group mean) / (group std + eps)`` for each of ``N`` rewards, where
    ``groups[i]`` names the group (the prompt) of reward ``i``; groups may have any ids, sizes and order.

    The std is the population std of the group (divide by ``G``, not ``G - 1``): GRPO normalises the group it has
    rather than estimating a prompt's reward spread, so each group's advantages have mean 0 and (up to ``eps``)
    variance 1 whatever ``G``, and a group of one has advantage 0 instead of a NaN. (The sample std, as in
    DeepSeekMath and TRL, only rescales every advantage by ``sqrt((G - 1) / G)``.) A group whose rewards are all equal
    gets exactly 0, not the rounding error of ``reward - mean``: it carries no signal about which sample is better.

    Returns ``(advantages [N], tied [number of groups])``; ``tied`` marks groups with all-equal rewards.
    """
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    rewards = rewards.float()
    zeros = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device)
    mean = zeros.index_add(0, inverse, rewards) / counts
    centred = rewards - mean[inverse]
    std = (zeros.index_add(0, inverse, centred**2) / counts).sqrt()
    low = zeros.scatter_reduce(0, inverse, rewards, "amin", include_self=False)
    high = zeros.scatter_reduce(0, inverse, rewards, "amax", include_self=False)
    tied = low == high
    advantages = torch.where(tied[inverse], torch.zeros_like(rewards), centred / (std[inverse] + eps))
    return advantages, tied


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              clip_range: float, kl_coef: float) -> dict[str, Tensor]:
    """GRPO's loss over ``[B, T]`` tokens: the clipped-ratio objective of ``clipped_policy_loss`` with each token
    given its sequence's advantage (``advantages [B]``), plus ``kl_coef`` times the k3 KL to the reference, both
    averaged over all masked tokens of the batch (each token weighs the same, so long sequences are not
    down-weighted). Returns ``loss``, ``policy_loss``, ``kl`` (mean k3 per token) and ``clip_frac`` (share of tokens
    whose ratio left ``1 +- clip_range``)."""
    mask = mask.to(logprobs.dtype)
    token_advantages = advantages[:, None].expand_as(logprobs)
    policy_loss, ratio, _ = clipped_policy_loss(logprobs, old_logprobs, token_advantages, mask, clip_range)
    kl = masked_mean(kl_k3(logprobs * mask, ref_logprobs * mask), mask)  # masked first: padding can't overflow exp
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
    return {"loss": policy_loss + kl_coef * kl, "policy_loss": policy_loss, "kl": kl, "clip_frac": clip_frac}
