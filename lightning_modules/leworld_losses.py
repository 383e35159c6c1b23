"""LeWorld's losses, one function per term, shared by the phases (``lightning_modules/leworld_phases.py``).

Every function takes the outputs of ``models.leworld`` (a step of :meth:`LeWorldSystem.forward`, an SLM's output)
and returns tensors; nothing here holds parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

AUX_LOSSES = ("balance", "diversity", "entropy")


def step_losses(step: dict, next_state: Tensor) -> dict[str, Tensor]:
    """One step's next-state MSE, routing balance (CV^2 of usage), address diversity (chance two SLMs pick the same
    start) and routing entropy (mean Bernoulli entropy of the gates)."""
    probs = step["route_probs"] if step["route_probs"] is not None else step["mask"]
    usage = probs.float().mean(0)
    balance = usage.var(unbiased=False) / (usage.mean() ** 2 + 1e-8)
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


def sequence_losses(steps: list[dict], states: Tensor, weights: dict[str, float]) -> tuple[dict[str, Tensor], Tensor]:
    """Each term averaged over the steps of a rollout (``steps[t]`` predicts ``states[:, t + 1]``) and the total:
    next-state MSE + ``weights[name]`` x each auxiliary term (``balance``, ``diversity``, ``entropy``)."""
    sums: dict[str, Tensor] = {}
    for t, step in enumerate(steps):
        for name, value in step_losses(step, states[:, t + 1]).items():
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
