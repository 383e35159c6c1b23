"""Score candidate actions by their log-probability after a prompt, all candidates in one batched pass.

Each prompt is run once (all prompts of a batch together, left-padded); its key/value cache is repeated for its
candidates, and every candidate of every prompt then runs in one right-padded batch. Padding sits after each
candidate's own tokens and is masked before each prompt, so it never changes a real position's score.
``naive_scores`` is the seed's way (one full forward pass per candidate) and the reference the tests and
``bench/action_scoring.py`` compare with.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """``<bos>`` (when the tokenizer has one) + the prompt's tokens: the policy's context."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


def encode_candidates(tokenizer, candidates: list[str]) -> list[list[int]]:
    """Each candidate's tokens, encoded on its own (training targets use the same encoding)."""
    if not candidates:
        raise ValueError("no candidate actions to score")
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    if any(not row for row in ids):
        raise ValueError(f"every candidate must tokenize to at least one token: {candidates}")
    return ids


def _padded(rows: list[list[int]], pad: int, left: bool, device) -> tuple[Tensor, Tensor]:
    """``[N, L]`` token ids and a 0/1 mask of the real tokens."""
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, device=device)
        mask[i, span] = 1
    return tokens, mask


def _cache_keyword(model: nn.Module) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _reduce(token_log_probs: Tensor, mask: Tensor, length_normalize: bool) -> Tensor:
    total = (token_log_probs * mask).sum(-1)
    return total / mask.sum(-1) if length_normalize else total


@torch.no_grad()
def score_candidates(
    model: nn.Module, tokenizer, prompts: list[str], candidates: list[list[str]], length_normalize: bool = False
) -> list[Tensor]:
    """Scores of ``candidates[i]`` after ``prompts[i]`` for every i, in two forward passes in all.

    Pass 1 runs the prompts as one left-padded batch and keeps their key/value cache; pass 2 runs every
    (prompt, candidate) pair as one right-padded batch on the cache row of its prompt. Returns one ``[K_i]``
    tensor of summed (or, with ``length_normalize``, mean) candidate-token log-probabilities per prompt.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_tokens, prompt_mask = _padded([encode_prompt(tokenizer, p) for p in prompts], pad, left=True, device=device)
    per_prompt = [encode_candidates(tokenizer, c) for c in candidates]
    owner = torch.tensor([i for i, rows in enumerate(per_prompt) for _ in rows], device=device)
    tokens, mask = _padded([row for rows in per_prompt for row in rows], pad, left=False, device=device)

    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp_min(0)
    prefix = model(
        input_ids=prompt_tokens,
        attention_mask=prompt_mask,
        position_ids=prompt_positions,
        use_cache=True,
        logits_to_keep=1,  # only the last prompt position predicts a candidate token
    )
    cache = getattr(prefix, "cache", None) or prefix.past_key_values
    cache.batch_select_indices(owner)  # one cache row per (prompt, candidate) pair
    attention = torch.cat([prompt_mask[owner], mask], dim=1)
    positions = prompt_mask.sum(1)[owner, None] + torch.arange(tokens.shape[1], device=device)
    cache_argument = {_cache_keyword(model): cache}
    logits = model(input_ids=tokens, attention_mask=attention, position_ids=positions, **cache_argument).logits
    # The first candidate token is predicted by the prompt's last position, the others by the candidate's own.
    logits = torch.cat([prefix.logits[owner, -1:], logits[:, :-1]], dim=1)
    token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    scores = _reduce(token_log_probs, mask, length_normalize)
    return list(scores.split([len(rows) for rows in per_prompt]))


def batched_scores(
    model: nn.Module, tokenizer, prompt: str, candidates: list[str], length_normalize: bool = False
) -> Tensor:
    """Scores ``[K]`` of the candidates after one prompt (see :func:`score_candidates`)."""
    return score_candidates(model, tokenizer, [prompt], [candidates], length_normalize)[0]


@torch.no_grad()
def naive_scores(
    model: nn.Module, tokenizer, prompt: str, candidates: list[str], length_normalize: bool = False
) -> Tensor:
    """The same scores with one full forward pass per candidate (the seed's way)."""
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(tokenizer, prompt)
    scores = []
    for ids in encode_candidates(tokenizer, candidates):
        full = torch.tensor([prompt_ids + ids], device=device)
        logits = model(input_ids=full).logits[:, len(prompt_ids) - 1 : -1]
        token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, full[:, len(prompt_ids) :, None])
        scores.append(_reduce(token_log_probs.squeeze(-1), torch.ones(1, len(ids), device=device), length_normalize))
    return torch.cat(scores)


def choose_action(
    model: nn.Module, tokenizer, prompt: str, candidates: list[str], length_normalize: bool = False
) -> tuple[str, Tensor]:
    """The best-scoring candidate and all scores."""
    scores = batched_scores(model, tokenizer, prompt, candidates, length_normalize)
    return candidates[int(scores.argmax())], scores
