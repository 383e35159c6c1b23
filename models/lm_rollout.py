"""Pieces shared by the RL phases that are plain tensors and ``nn.Module``s: per-token log-probabilities,
last-token pooling, a scalar head on a causal LM (reward model, value head), the adaptive KL controller and
text-diversity statistics. Sampling is ``models.lm_text.sample``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.lm_text import position_ids


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values.clamp_min(0)


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def response_log_softmax(
    model: nn.Module, ids: Tensor, mask: Tensor, prompt_length: int, temperature: float = 1.0,
    with_hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-softmax ``[B, R, V]`` over the vocabulary at the positions that predict the response tokens
    ``ids[:, prompt_length:]`` (logits divided by ``temperature``), and their last hidden states when asked."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=with_hidden)
    log_probs = torch.log_softmax(out.logits[:, prompt_length - 1 : -1].float() / temperature, dim=-1)
    return log_probs, out.hidden_states[-1][:, prompt_length - 1 : -1] if with_hidden else None


def chosen_and_entropy(log_probs: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probs of ``tokens`` ``[B, R]`` and the entropies of the distributions ``log_probs`` ``[B, R, V]``."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def response_logprobs(
    model: nn.Module, ids: Tensor, mask: Tensor, prompt_length: int, temperature: float = 1.0,
    with_hidden: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Log-probs and entropies ``[B, R]`` of the response tokens ``ids[:, prompt_length:]`` under ``model`` (logits
    divided by ``temperature``), and the last hidden states of the positions that predict them when asked."""
    log_probs, hidden = response_log_softmax(model, ids, mask, prompt_length, temperature, with_hidden)
    return *chosen_and_entropy(log_probs, ids[:, prompt_length:]), hidden


class ScalarHead(nn.Module):
    """A linear map from hidden states to one number (zero-initialised when ``zero_init``)."""

    def __init__(self, hidden_size: int, zero_init: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        if zero_init:
            nn.init.zeros_(self.linear.weight)
        else:
            nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class RewardModel(nn.Module):
    """A causal LM backbone and a scalar head read at each sequence's last real token."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.head = ScalarHead(hidden_size_of(lm))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
        hidden = out.hidden_states[-1]
        last = last_token_index(mask)
        return self.head(hidden[torch.arange(len(ids), device=ids.device), last])


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so that the measured KL tracks ``target``.

    ``coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)``. Its band is where that
    correction is not saturated: ``(1 +- max_error) * target``.
    """

    max_error = 0.2

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError("init_coef must be >= 0, target and horizon > 0")
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-N: unique word n-grams over all word n-grams of the texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
