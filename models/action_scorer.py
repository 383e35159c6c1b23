"""Score candidate actions by their log-probability after a prompt, every candidate of every prompt in one pass.

Each batch row packs a prompt followed by all of its candidates. A 4D attention mask lets a candidate's tokens
see the prompt and their own candidate's earlier tokens only, and the position ids of every candidate restart
right after the prompt, so each candidate is scored exactly as if it stood alone after the prompt, while the prompt
is computed once. ``naive_scores`` is the seed's way (one full forward pass per candidate) and the reference the
tests and ``bench/action_scoring.py`` compare with.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from models.lm_text import encode_prompts, pad


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """:func:`encode_prompts` of one prompt."""
    return encode_prompts(tokenizer, [prompt])[0]


def encode_candidates(tokenizer, candidates: list[str]) -> list[list[int]]:
    """Each candidate's tokens, encoded on its own (training targets use the same encoding)."""
    if not candidates:
        raise ValueError("no candidate actions to score")
    ids = tokenizer(list(candidates), add_special_tokens=False)["input_ids"]
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
    """Scores of ``candidates[i]`` after ``prompts[i]`` for every i, in a single forward pass (see
    :func:`score_encoded_candidates`, which also gives gradients)."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    states = list(zip(encode_prompts(tokenizer, prompts), (encode_candidates(tokenizer, c) for c in candidates)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_encoded_candidates(model, states, pad_id, length_normalize)


def score_encoded_candidates(
    model: nn.Module, states: list[tuple[list[int], list[list[int]]]], pad_id: int, length_normalize: bool = False
) -> list[Tensor]:
    """Scores of each state's candidates (``(prompt tokens, [candidate tokens, ...])`` per state) after its prompt,
    in a single forward pass; differentiable (the policy-gradient loss of ``lightning_modules.web_shop_grpo``).

    Each state (a prompt followed by all of its candidates) is packed into a batch row, several short states to a
    row (first-fit by length, so that little of the batch is padding). A 4D attention mask lets every token see
    only its own state: the prompt causally, and a candidate token the prompt and the earlier tokens of its own
    candidate; position ids restart after the prompt for each candidate. So each candidate is computed exactly as if
    it stood alone after its prompt, while each prompt is computed once. Returns one ``[K_i]`` tensor of summed (or,
    with ``length_normalize``, mean) candidate-token log-probabilities per prompt.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + sum(map(len, cs)) for p, cs in states]
    first_candidate = [0, *itertools.accumulate(len(cs) for _, cs in states)]
    # Per row: tokens, position ids, the row-local state of each token and its segment (0: prompt, k + 1: candidate k).
    rows: list[dict[str, list[int]]] = []
    targets, sources, owners = [], [], []  # each candidate token: (row, column), predicting column, candidate index
    for i in sorted(range(len(states)), key=lambda i: -lengths[i]):  # longest first: first-fit decreasing
        prompt, cands = states[i]
        row = next((r for r in rows if len(r["tokens"]) + lengths[i] <= max(lengths)), None)
        if row is None:
            row = {"tokens": [], "positions": [], "states": [], "segments": []}
            rows.append(row)
        offset, n, slot = len(row["tokens"]), len(prompt), (row["states"][-1] + 1 if row["states"] else 0)
        row_number = rows.index(row)
        row["tokens"] += prompt
        row["positions"] += range(n)
        row["segments"] += [0] * n
        for k, cand in enumerate(cands):
            start = len(row["tokens"])
            targets += [(row_number, start + j) for j in range(len(cand))]
            sources += [offset + n - 1, *range(start, start + len(cand) - 1)]
            owners += [first_candidate[i] + k] * len(cand)
            row["tokens"] += cand
            row["positions"] += range(n, n + len(cand))
            row["segments"] += [k + 1] * len(cand)
        row["states"] += [slot] * lengths[i]
    tokens = pad([r["tokens"] for r in rows], pad_id)
    positions = pad([r["positions"] for r in rows], 0)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = _packed_attention_mask(pad([r["states"] for r in rows], -1), pad([r["segments"] for r in rows], -1), dtype)
    # Only candidate tokens need logits: run the decoder, then the output layer on the predicting columns only.
    hidden = model.get_decoder()(
        input_ids=tokens.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
    ).last_hidden_state
    row_index = torch.tensor([r for r, _ in targets], device=device)
    logits = model.get_output_embeddings()(hidden[row_index, torch.tensor(sources, device=device)])
    token_ids = tokens.to(device)[row_index, torch.tensor([t for _, t in targets], device=device)]
    token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    owner_index = torch.tensor(owners, device=device)
    totals = torch.zeros(first_candidate[-1], device=device).index_add_(0, owner_index, token_log_probs)
    if length_normalize:
        totals = totals / torch.zeros_like(totals).index_add_(0, owner_index, torch.ones_like(token_log_probs))
    return list(totals.split([len(cs) for _, cs in states]))


def _packed_attention_mask(states: Tensor, segments: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, W, W]``: a token sees the earlier tokens of its own state's prompt (segment 0) and of
    its own segment; padding (state -1) sees itself only, so no row of the softmax is empty."""
    width = segments.shape[1]
    index = torch.arange(width)
    causal = index[:, None] >= index[None, :]
    same_state = (states[:, :, None] == states[:, None, :]) & (states[:, None, :] >= 0)
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & same_state & ((key == 0) | (key == query)) | torch.eye(width, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


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
