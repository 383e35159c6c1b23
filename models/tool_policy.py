"""GRU actor-critic that reads an arithmetic problem and emits tool tokens one at a time."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from envs.tool_env import CTX, NUM_STAGES, PAD, VOCAB_SIZE

ContextEncoder = Literal["gru", "seed_batch_mean"]


class GRUActorCritic(nn.Module):
    """Stage-conditioned GRU with a policy head over actions and a value head.

    The GRU starts from a state made from the curriculum stage, reads the problem's tokens (digits, then CTX), and
    then, one step per action, reads the token it just emitted. Both heads look at the current hidden state.
    """

    def __init__(
        self,
        num_actions: int = 7,
        hidden_size: int = 128,
        num_stages: int = NUM_STAGES,
        vocab_size: int = VOCAB_SIZE,
        context_encoder: ContextEncoder = "gru",
        orthogonal_init: bool = True,
    ) -> None:
        """
        Args:
            num_actions: Size of the policy head (7 tool tokens; 18 for the seed's whole-vocabulary head).
            hidden_size: Width of the embeddings and of the GRU state.
            num_stages: Number of curriculum stages (size of the stage embedding).
            vocab_size: Number of input tokens (digits, CTX, tool tokens, PAD).
            context_encoder: ``gru`` reads each problem's own digits in order; ``seed_batch_mean`` reproduces the
                seed's bug, where every sample starts from the context averaged over the whole batch.
            orthogonal_init: Orthogonal weights with a near-uniform initial policy; false keeps PyTorch's defaults
                (the seed).
        """
        super().__init__()
        for name, size in (("num_actions", num_actions), ("hidden_size", hidden_size), ("num_stages", num_stages),
                           ("vocab_size", vocab_size)):
            if size < 1:  # a zero-width network gives constant logits and trains without an error
                raise ValueError(f"{name} must be >= 1, got {size}")
        if context_encoder not in ("gru", "seed_batch_mean"):
            raise ValueError(f"unknown context_encoder {context_encoder!r}")
        self.num_actions = num_actions
        self.context_encoder = context_encoder
        self.embed = nn.Embedding(vocab_size, hidden_size, padding_idx=PAD)
        self.stage_embed = nn.Embedding(num_stages, hidden_size)
        self.cell = nn.GRUCell(hidden_size, hidden_size)
        self.policy_head = nn.Linear(hidden_size, num_actions)
        self.value_head = nn.Linear(hidden_size, 1)
        if orthogonal_init:
            self._init_weights()

    def _init_weights(self) -> None:
        # CleanRL/SB3 practice: orthogonal weights, a near-uniform initial policy, unit-scale values.
        for name, param in self.cell.named_parameters():
            if "weight" in name:
                nn.init.orthogonal_(param)
            else:
                nn.init.zeros_(param)
        nn.init.orthogonal_(self.policy_head.weight, gain=0.01)
        nn.init.orthogonal_(self.value_head.weight, gain=1.0)
        nn.init.zeros_(self.policy_head.bias)
        nn.init.zeros_(self.value_head.bias)

    def encode(self, context: Tensor, stage: Tensor) -> Tensor:
        """Hidden state ``[B, H]`` after reading ``context`` ``[B, L]`` (PAD-padded tokens) at ``stage`` ``[B]``."""
        if self.context_encoder == "seed_batch_mean":
            mask = (context != PAD).unsqueeze(-1).float()
            per_sample = (self.embed(context) * mask).sum(1) / mask.sum(1)
            hidden = torch.tanh(per_sample.mean(0, keepdim=True) + self.stage_embed(stage))
            return self.cell(self.embed(torch.full_like(stage, CTX)), hidden)
        hidden = torch.tanh(self.stage_embed(stage))
        for position in range(context.shape[1]):
            token = context[:, position]
            hidden = torch.where((token != PAD).unsqueeze(1), self.cell(self.embed(token), hidden), hidden)
        return hidden

    def heads(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Action logits ``[B, A]`` and state values ``[B]``."""
        return self.policy_head(hidden), self.value_head(hidden).squeeze(-1)

    def advance(self, hidden: Tensor, token: Tensor) -> Tensor:
        """Read the token just emitted."""
        return self.cell(self.embed(token), hidden)
