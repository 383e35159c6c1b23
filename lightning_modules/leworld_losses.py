"""LeWorld's losses, one function per term, shared by the phases (``lightning_modules/leworld_phases.py``).

Every function takes the outputs of ``models.leworld`` (a step of :meth:`LeWorldSystem.forward`, an SLM's output)
and returns tensors; nothing here holds parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

AUX_LOSSES = ("balance", "diversity", "entropy")


def routing_balance(usage: Tensor, need: Tensor | None = None) -> Tensor:
    """Balance of per-SLM usage ``[M]`` against what the slots need.

    ``need`` ``None``: the CV^2 of usage (every SLM equally used: 0), which switches on SLMs that no slot needs.
    ``need [M]`` (the share of sequences in which each SLM's slot is relevant): ``M * sum_i (p_i - q_i)^2`` with the
    usage shares ``p = usage / sum(usage)`` and the need shares ``q = need / sum(need)``: 0 when the needed SLMs share
    the work in proportion to need and the unneeded ones are off. With a uniform ``need`` it equals the CV^2.
    """
    if need is None:
        return usage.var(unbiased=False) / (usage.mean() ** 2 + 1e-8)
    p = usage / (usage.sum() + 1e-8)
    q = need.to(usage) / need.sum().clamp(min=1e-8)
    return len(usage) * ((p - q) ** 2).sum()


def slot_need(valid: Tensor, num_slms: int) -> Tensor:
    """Per-SLM need ``[num_slms]``: the share of sequences in which slot ``i`` is relevant (``valid [B, slots]``; SLM
    ``i`` serves slot ``i``, as Phase 1 trains it; SLMs beyond the slots are never needed)."""
    need = valid.float().mean(0)[:num_slms]
    return torch.cat([need, need.new_zeros(num_slms - len(need))])


def step_losses(step: dict, next_state: Tensor, need: Tensor | None = None) -> dict[str, Tensor]:
    """One step's next-state MSE, routing balance (:func:`routing_balance` against ``need``), address diversity
    (chance two SLMs pick the same start) and routing entropy (mean Bernoulli entropy of the gates)."""
    probs = step["route_probs"] if step["route_probs"] is not None else step["mask"]
    usage = probs.float().mean(0)
    balance = routing_balance(usage, need)
    p = probs.float().clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    hi = torch.softmax(step["slm"]["start_logits_high"].float(), -1)  # [B, M, H]
    lo = torch.softmax(step["slm"]["start_logits_low"].float(), -1)
    same = (hi @ hi.transpose(1, 2)) * (lo @ lo.transpose(1, 2))  # [B, M, M]
    m = same.shape[-1]
    diversity = (same.sum((1, 2)) - same.diagonal(dim1=1, dim2=2).sum(-1)).mean() / max(1, m * (m - 1))
    return {
        "next_state_loss": F.mse_loss(step["prediction"].float(), next_state.float()),
        "balance_loss": balance,
        "diversity_loss": diversity,
        "entropy_loss": entropy,
    }


def sequence_losses(
    steps: list[dict], states: Tensor, weights: dict[str, float], need: Tensor | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Each term averaged over the steps of a rollout (``steps[t]`` predicts ``states[:, t + 1]``) and the total:
    next-state MSE + ``weights[name]`` x each auxiliary term (``balance`` against ``need``, ``diversity``,
    ``entropy``)."""
    sums: dict[str, Tensor] = {}
    for t, step in enumerate(steps):
        for name, value in step_losses(step, states[:, t + 1], need).items():
            sums[name] = sums.get(name, 0.0) + value
    losses = {name: value / len(steps) for name, value in sums.items()}
    total = losses["next_state_loss"] + sum(weights.get(name, 0.0) * losses[f"{name}_loss"] for name in AUX_LOSSES)
    return losses, total


def address_cross_entropy(
    slm_out: dict, starts: Tensor, ends: Tensor, lo_size: int, max_read_range: int, range_weight: float
) -> Tensor:
    """Per-sample cross-entropy ``[B]`` of an SLM's high byte, low byte and (``range_weight`` x) range length
    against the target range ``[start, end)``."""
    target_len = (ends - starts - 1).clamp(0, max_read_range - 1)
    return (
        F.cross_entropy(slm_out["start_logits_high"], starts // lo_size, reduction="none")
        + F.cross_entropy(slm_out["start_logits_low"], starts % lo_size, reduction="none")
        + range_weight * F.cross_entropy(slm_out["range_logits"], target_len, reduction="none")
    )


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is set (0 when none is)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def reinforce_loss(reward: Tensor, baseline: Tensor, log_prob: Tensor) -> Tensor:
    """REINFORCE with a baseline: ``-mean((reward - baseline) * log_prob)``; the reward carries no gradient."""
    return -((reward.detach() - baseline) * log_prob).mean()
