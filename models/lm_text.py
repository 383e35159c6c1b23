"""Text in and out of a causal LM, for every LM system: prompt encoding, padding with attention masks, causal-LM
batches and loss, and batched generation with a KV cache.

Conventions: a prompt is ``<bos>`` + its tokens; a completion ends with ``<eos>``; training batches are
right-padded with ``labels = -100`` where no loss is taken; generation batches are left-padded so every row's
next token is at the last column.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100  # label of a position that takes no loss (``F.cross_entropy``'s default ignore_index)


# --- encoding ---------------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """``<bos>`` (when the tokenizer has one) + each prompt's tokens, in one tokenizer call."""
    rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    return [[tokenizer.bos_token_id, *ids] for ids in rows] if tokenizer.bos_token_id is not None else rows


# --- padding ----------------------------------------------------------------------------------------------------
def pad(sequences: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    """``[B, max_len]`` long tensor of ``sequences`` padded with ``value`` on the right (or the left)."""
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
    return pad_sequence(rows, batch_first=True, padding_value=value, padding_side="left" if left else "right")


def pad_with_mask(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Padded token ids and their attention mask (1 on real tokens)."""
    return pad(sequences, pad_id, left), pad([[1] * len(s) for s in sequences], 0, left)


def check_sequence_settings(max_seq_length: int | None) -> None:
    """A sequence cap is ``None`` (none) or at least 2 tokens (a prompt token and a completion token)."""
    if max_seq_length is not None and max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2 or null, got {max_seq_length}")


def truncate_prompt(prompt: Sequence[int], completion: Sequence[int],
                    max_seq_length: int) -> tuple[list[int], list[int]]:
    """``prompt`` cut from the left so that prompt + completion fit ``max_seq_length`` tokens, keeping the completion
    (only a completion longer than the cap is cut, from the right, after the prompt's last token)."""
    check_sequence_settings(max_seq_length)
    prompt, completion = list(prompt), list(completion)
    if len(prompt) + len(completion) <= max_seq_length:
        return prompt, completion
    keep = max(1, max_seq_length - len(completion))  # one prompt token at least predicts the completion's first
    return prompt[-keep:], completion[: max_seq_length - keep]


def lm_batch(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int,
             completion_only: bool, max_seq_length: int | None = None, packing: bool = False) -> dict[str, Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (``-100`` on padding, and on prompts when
    ``completion_only``).

    ``max_seq_length`` caps every example (:func:`truncate_prompt`: the prompt loses its start, the completion is
    kept). ``packing`` puts several examples in one row (:func:`pack`): the batch then has ``position_ids`` restarting
    at every example and no ``attention_mask``, so no token attends to another example.
    """
    if max_seq_length is not None:
        prompts, completions = zip(*(truncate_prompt(p, c, max_seq_length) for p, c in zip(prompts, completions)))
    ids = [list(p) + list(c) for p, c in zip(prompts, completions)]
    labels = [([IGNORE_INDEX] * len(p) if completion_only else list(p)) + list(c) for p, c in zip(prompts, completions)]
    if packing:
        return pack(ids, labels, pad_id, max_seq_length)
    input_ids, attention_mask = pad_with_mask(ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad(labels, IGNORE_INDEX)}


def pack(ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int,
         row_length: int | None = None) -> dict[str, Tensor]:
    """Examples placed first-fit, in order, into rows of ``row_length`` tokens (``None``: the longest example's):
    ``input_ids``, ``labels`` and ``position_ids`` (0 at every example's first token; padding counts as one more
    example) without an ``attention_mask``, which is how ``transformers`` reads packed rows (each example attends
    only to itself; run the model with ``use_cache=False``, see :func:`model_inputs`). An example's first label is
    ``-100``: it would be predicted from the previous example."""
    require_packed_attention()
    row_length = max(row_length or 0, max(map(len, ids)))
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for tokens, targets in zip(ids, labels):
        row = next((r for r in rows if len(r[0]) + len(tokens) <= row_length), None)
        if row is None:
            row = ([], [], [])
            rows.append(row)
        row[0].extend(tokens)
        row[1].extend([IGNORE_INDEX, *targets[1:]])
        row[2].extend(range(len(tokens)))
    width = max(len(r[0]) for r in rows)
    fill = [width - len(r[0]) for r in rows]
    return {
        "input_ids": pad([r[0] + [pad_id] * n for r, n in zip(rows, fill)], pad_id),
        "labels": pad([r[1] + [IGNORE_INDEX] * n for r, n in zip(rows, fill)], IGNORE_INDEX),
        "position_ids": pad([r[2] + list(range(n)) for r, n in zip(rows, fill)], 0),
    }


def require_packed_attention() -> None:
    """Packed rows need ``transformers`` to read example boundaries from ``position_ids`` (``masking_utils``, 4.54+);
    older versions would let examples attend to each other."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as error:
        raise ValueError("packing needs transformers >= 4.54 (packed rows read from position_ids): upgrade it or "
                         "set packing false") from error


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor | bool]:
    """The keys of a batch that the LM's forward takes (``attention_mask`` or, for packed rows, ``position_ids``),
    without a KV cache: ``transformers`` reads packed rows from ``position_ids`` only when there is none."""
    return {"use_cache": False, **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}}


# --- loss -------------------------------------------------------------------------------------------------------
def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of each position's logits against the next label (``-100`` labels take no loss), as
    ``model(..., labels=labels).loss`` computes it; ``reduction="sum"`` for token-weighted sums."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def _labelled_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                     position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of the positions that predict a labelled token (the output layer runs on those only), their target
    tokens, and the ``[B, L - 1]`` mask of those positions. Packed rows pass ``position_ids`` and no
    ``attention_mask`` (see :func:`pack`)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    predicting = targets != IGNORE_INDEX
    return model.get_output_embeddings()(hidden[:, :-1][predicting]).float(), targets[predicting], predicting


def completion_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                    position_ids: Tensor | None = None) -> Tensor:
    """:func:`causal_lm_loss` of ``model`` with the output layer run only on the positions that predict a labelled
    token (a few per row for a short completion): the same loss and gradients, less compute. Packed rows pass
    ``position_ids`` and no ``attention_mask`` (see :func:`pack`)."""
    logits, targets, _ = _labelled_logits(model, input_ids, attention_mask, labels, position_ids)
    return F.cross_entropy(logits, targets)


def completion_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` log-probability of each row's labelled tokens (its completion) under ``model``: the sum over them of
    ``log p(token | tokens before)``, for right-padded rows."""
    logits, targets, predicting = _labelled_logits(model, input_ids, attention_mask, labels)
    token_logprobs = -F.cross_entropy(logits, targets, reduction="none")
    rows = predicting.nonzero()[:, 0]
    return torch.zeros(len(input_ids), device=logits.device).index_add(0, rows, token_logprobs)


# --- generation -------------------------------------------------------------------------------------------------
def position_ids(mask: Tensor) -> Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _cache_argument(model: nn.Module) -> str:
    """``cache`` (transformers >= 5) or ``past_key_values`` (older), whichever the model's forward takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Continue left-padded prompts ``[B, P]``; returns ``(tokens, mask)`` ``[B, R]``.

    Tokens are drawn from ``softmax(logits / temperature)`` with no top-k / top-p truncation, so the log-probs
    that PPO recomputes with the same temperature are those of the sampling distribution. ``mask`` marks the tokens
    up to and including each row's ``<eos>``; later positions hold ``pad_token_id``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = prompt_mask.long()
    cache_arg = _cache_argument(model)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens, valid = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        valid.append(~finished)
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if finished.all():
            break
        mask = torch.cat([mask, valid[-1].long().unsqueeze(1)], dim=1)
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=mask,
            position_ids=(mask.sum(-1, keepdim=True) - 1),
            use_cache=True,
            **{cache_arg: _cache_of(out)},
        )
    return torch.stack(tokens, 1), torch.stack(valid, 1)


@torch.no_grad()
def greedy_texts(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (batched, left-padded), decoded up to ``<eos>``, in eval mode
    (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_with_mask(prompts[start : start + batch_size], tokenizer.pad_token_id, left=True)
        tokens, valid = sample(model, ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, greedy=True)
        texts += [tokenizer.decode(t[v], skip_special_tokens=True) for t, v in zip(tokens, valid)]
    model.train(was_training)
    return texts
