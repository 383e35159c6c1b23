"""Score candidate actions by their log-probability after a prompt, every candidate of every prompt in one pass.

Each batch row packs a prompt followed by all of its candidates. A 4D attention mask lets a candidate's tokens
see the prompt and their own candidate's earlier tokens only, and the position ids of every candidate restart
right after the prompt, so each candidate is scored exactly as if it stood alone after the prompt, while the prompt
is computed once. ``naive_scores`` is the seed's way (one full forward pass per candidate) and the reference the
tests and ``bench/action_scoring.py`` compare with.
"""

from __future__ import annotations

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


def _reduce(token_log_probs: Tensor, mask: Tensor, length_normalize: bool) -> Tensor:
    total = (token_log_probs * mask).sum(-1)
    return total / mask.sum(-1) if length_normalize else total


@torch.no_grad()
def score_candidates(
    model: nn.Module, tokenizer, prompts: list[str], candidates: list[list[str]], length_normalize: bool = False
) -> list[Tensor]:
    """Scores of ``candidates[i]`` after ``prompts[i]`` for every i, in a single forward pass.

    Each row of the batch packs one prompt followed by all of its candidates; a 4D attention mask lets every
    candidate token see the prompt and the earlier tokens of its own candidate only, and position ids restart after
    the prompt for each candidate, so each candidate is computed exactly as if it stood alone after the prompt.
    Returns one ``[K_i]`` tensor of summed (or, with ``length_normalize``, mean) candidate-token log-probabilities
    per prompt.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [(encode_prompt(tokenizer, p), encode_candidates(tokenizer, c)) for p, c in zip(prompts, candidates)]
    width = max(len(p) + sum(len(c) for c in cs) for p, cs in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself only
    # For every candidate token: (row, its index), the index of the logits that predict it, its candidate's number.
    targets, sources, owners, first_candidate = [], [], [], 0
    for row, (prompt, cands) in enumerate(rows):
        n = len(prompt)
        tokens[row, :n] = torch.tensor(prompt)
        positions[row, :n] = torch.arange(n)
        allowed[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        for k, cand in enumerate(cands):
            end = start + len(cand)
            tokens[row, start:end] = torch.tensor(cand)
            positions[row, start:end] = torch.arange(n, n + len(cand))
            allowed[row, start:end, :n] = True
            allowed[row, start:end, start:end] = torch.ones(len(cand), len(cand), dtype=torch.bool).tril()
            targets += [(row, start + j) for j in range(len(cand))]
            sources += [n - 1] + list(range(start, end - 1))
            owners += [first_candidate + k] * len(cand)
            start = end
        first_candidate += len(cands)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    logits = model(
        input_ids=tokens.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
    ).logits
    row_index = torch.tensor([r for r, _ in targets], device=device)
    log_probs = torch.log_softmax(logits[row_index, torch.tensor(sources, device=device)].float(), dim=-1)
    token_ids = tokens.to(device)[row_index, torch.tensor([t for _, t in targets], device=device)]
    token_log_probs = log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    candidate_index = torch.tensor(owners, device=device)
    totals = torch.zeros(len(token_log_probs), device=device).index_add_(0, candidate_index, token_log_probs)
    counts = torch.zeros(len(token_log_probs), device=device).index_add_(0, candidate_index, torch.ones_like(totals))
    scores = (totals / counts.clamp_min(1)) if length_normalize else totals
    return list(scores[: sum(len(cs) for _, cs in rows)].split([len(cs) for _, cs in rows]))


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
