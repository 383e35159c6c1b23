"""Held-out QA: the model answers the questions itself (greedy decoding) and the answers are scored against the
references by exact match and token F1 (torchmetrics' SQuAD metric, per answer and in aggregate), plus
the teacher-forced loss of the reference answers (a dense signal that moves before exact match does)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics.functional.text import squad

from models.lm_text import IGNORE_INDEX, causal_lm_loss, lm_batch, pad_with_mask, sample


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token F1 in [0, 1], after SQuAD's normalisation (torchmetrics' SQuAD metric, which
    reports percentages)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (>0), got {len(predictions)} / {len(references)}")
    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [{"answers": {"answer_start": [0], "text": [r]}, "id": str(i)} for i, r in enumerate(references)]
    result = squad(preds, target)
    return {"em": float(result["exact_match"]) / 100, "f1": float(result["f1"]) / 100}


@torch.no_grad()
def generate(lm: nn.Module, data, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 32,
             temperature: float = 1.0, greedy: bool = True, seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (batched, left-padded), cut at ``<eos>``."""
    tokenizer, out = data.tokenizer, []
    generator = torch.Generator().manual_seed(seed)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids = [data.encode(p)[0] for p in prompts[start:start + batch_size]]
        prompt_ids, mask = (t.to(device) for t in pad_with_mask(ids, tokenizer.pad_token_id, left=True))
        tokens, valid = sample(lm, prompt_ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                               temperature=temperature, greedy=greedy, generator=generator)
        for row, keep in zip(tokens.cpu(), valid.cpu()):
            ids = [t for t, k in zip(row.tolist(), keep.tolist()) if k and t != tokenizer.eos_token_id]
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    lm.train(was_training)
    return out


@torch.no_grad()
def answer_loss(lm: nn.Module, data, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> float:
    """Token-weighted mean cross-entropy of the reference answers given their prompts (teacher forcing)."""
    total, count = 0.0, 0
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    for start in range(0, len(pairs), batch_size):
        items = [data.encode(p, r) for p, r in pairs[start:start + batch_size]]
        batch = lm_batch(*zip(*items), data.tokenizer.pad_token_id, completion_only=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += causal_lm_loss(logits, batch["labels"], reduction="sum").item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    lm.train(was_training)
    return total / max(count, 1)


def evaluate_qa(lm: nn.Module, data, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 12,
                batch_size: int = 32) -> dict:
    """The model's answers to ``(prompt, reference)`` pairs, scored: ``em``, ``f1``, ``answer_loss``, ``n`` and
    the per-question records."""
    if not pairs:
        raise ValueError("no questions to evaluate")
    answers = generate(lm, data, [p for p, _ in pairs], max_new_tokens, batch_size)
    references = [r for _, r in pairs]
    scores = score_answers(answers, references)
    records = [{"prompt": p, "reference": r, "answer": a} | score_answers([a], [r])
               for (p, r), a in zip(pairs, answers)]
    return scores | {"answer_loss": answer_loss(lm, data, pairs, batch_size), "n": len(pairs), "answers": records}
