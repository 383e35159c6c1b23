"""The SEAL stage: the fine-tuned model writes self-edits of held-out passages, a LoRA update trains on each,
and only the self-edits that improve held-out QA are kept (ReST-EM's filter); a final update trains on the kept
ones (and, ReST-EM's step, on writing them), and held-out QA is scored before and after.

Each passage's questions are split in two: ``reward_questions`` decide which self-edits are kept, the others are
only used to report QA, so the reported figure is not the one the filter selected on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datamodules.instructions import ASK, WRITE, Example, Knowledge, format_prompt, parse_qa_text
from models.lm_text import causal_lm_loss, lm_batch
from tuning.qa import answer_loss, evaluate_qa, generate, score_answers
from tuning.space import check_minimums

RECALL = "Recall what you know."


@dataclass
class SealSettings:
    """How self-edits are written, tried and kept."""

    enabled: bool = True
    """Run a SEAL stage after every training episode."""
    passages: int = 8
    """Held-out passages turned into self-edits per stage."""
    candidates: int = 2
    """Self-edits sampled per passage."""
    temperature: float = 0.7
    """Sampling temperature of the self-edit writer."""
    max_new_tokens: int = 72
    """Longest self-edit."""
    reward_questions: int = 2
    """Questions per passage used to decide which self-edits to keep (the rest are for reporting)."""
    inner_steps: int = 15
    """Gradient steps of the LoRA update that tries one self-edit."""
    lr: float = 3e-3
    """Learning rate of the SEAL LoRA updates."""
    min_improvement: float = 0.0
    """A self-edit is kept when it raises the mean F1 of the model's answers to its passage's reward questions
    by more than this (SEAL's reward: answers after the update, scored against the references)."""
    rest_em: bool = True
    """Also train the writer on (passage -> kept self-edit), ReST-EM's improvement step."""

    def __post_init__(self) -> None:
        check_minimums(self, {"passages": 1, "candidates": 1, "reward_questions": 1, "inner_steps": 1,
                              "max_new_tokens": 1}, above={"lr": 0, "temperature": 0})


def edit_examples(text: str, kind: str) -> list[Example]:
    """A self-edit as training examples: question-answer pairs become closed-book questions; other text (and QA
    text that does not parse) is trained on as what the model recalls."""
    if kind == "qa":
        pairs = parse_qa_text(text)
        if pairs:
            return [Example(ASK, q, a) for q, a in pairs]
    return [Example(RECALL, "", text)] if text.strip() else []


def trainable_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(lm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, parameter in lm.named_parameters():
        if name in state:
            parameter.copy_(state[name])


def lora_update(lm: nn.Module, data, examples: Sequence[Example], steps: int, lr: float) -> None:
    """``steps`` full-batch AdamW steps on ``examples`` (response-only loss), trainable (LoRA) weights only."""
    if not examples:
        return
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = params[0].device
    batch = lm_batch(*zip(*[data.encode_example(e) for e in examples]), data.tokenizer.pad_token_id, True)
    batch = {k: v.to(device) for k, v in batch.items()}
    lm.train()
    for _ in range(steps):
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.eval()


def reward_f1(lm: nn.Module, data, pairs: Sequence[tuple[str, str]]) -> float:
    """Mean token F1 of the model's greedy answers to ``pairs`` (the reward of a self-edit)."""
    return score_answers(generate(lm, data, [p for p, _ in pairs], max_new_tokens=12), [r for _, r in pairs])["f1"]


def split_questions(knowledge: Sequence[Knowledge], reward_questions: int) -> tuple[list, list]:
    """Per passage: the first ``reward_questions`` closed-book questions (for the filter), and the rest."""
    reward, report = [], []
    for k in knowledge:
        pairs = [(format_prompt(ASK, q), a) for q, a in k.questions]
        reward.append(pairs[:reward_questions])
        report += pairs[reward_questions:] or pairs[:1]
    return reward, report


def write_self_edits(lm: nn.Module, data, passages: Sequence[str], kind: str, settings: SealSettings,
                     seed: int = 0) -> list[list[str]]:
    """``settings.candidates`` sampled self-edits of ``kind`` per passage."""
    prompts = [format_prompt(WRITE[kind], p) for p in passages for _ in range(settings.candidates)]
    texts = generate(lm, data, prompts, settings.max_new_tokens, temperature=settings.temperature, greedy=False,
                     seed=seed)
    return [texts[i * settings.candidates:(i + 1) * settings.candidates] for i in range(len(passages))]


def seal_stage(
    lm: nn.Module,
    data,
    knowledge: Sequence[Knowledge],
    kind: str,
    epochs: int,
    settings: SealSettings,
    writer: Callable[[Sequence[str]], list[list[str]]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run SEAL on ``lm`` (modified in place: it ends with the kept self-edits applied).

    ``writer`` replaces the model as the author of self-edits (tests give known good and bad ones).
    """
    if kind not in WRITE:
        raise ValueError(f"unknown self-edit kind {kind!r}")
    knowledge = list(knowledge)[:settings.passages]
    if not knowledge:
        raise ValueError("SEAL needs held-out passages (the generated world, or a knowledge_file)")
    reward_pairs, report_pairs = split_questions(knowledge, settings.reward_questions)
    passages = [k.passage for k in knowledge]
    edits = writer(passages) if writer else write_self_edits(lm, data, passages, kind, settings, seed)
    base = trainable_state(lm)
    qa_before = evaluate_qa(lm, data, report_pairs)
    candidates, kept = [], []
    for passage, texts, pairs in zip(passages, edits, reward_pairs):
        f1_before, loss_before = reward_f1(lm, data, pairs), answer_loss(lm, data, pairs)
        for text in texts:
            examples = edit_examples(text, kind)
            lora_update(lm, data, examples, settings.inner_steps, settings.lr)
            improvement = reward_f1(lm, data, pairs) - f1_before
            loss_change = loss_before - answer_loss(lm, data, pairs)
            restore(lm, base)
            keep = bool(examples) and improvement > settings.min_improvement
            candidates.append({"passage": passage[:80], "text": text[:400], "improvement": improvement,
                               "answer_loss_change": loss_change, "kept": keep})
            if keep:
                kept.append((passage, text, examples))
    final = [e for _, _, examples in kept for e in examples]
    if settings.rest_em:
        final += [Example(WRITE[kind], passage, text) for passage, text, _ in kept]
    lora_update(lm, data, final, settings.inner_steps * epochs, settings.lr)
    qa_after = evaluate_qa(lm, data, report_pairs)
    return {
        "edit_kind": kind, "epochs": epochs, "candidates": len(candidates), "kept": len(kept),
        "self_edits": candidates,
        "qa_before": {k: qa_before[k] for k in ("em", "f1", "answer_loss")},
        "qa_after": {k: qa_after[k] for k in ("em", "f1", "answer_loss")},
        "qa_improvement": (qa_before["answer_loss"] - qa_after["answer_loss"]) / max(qa_before["answer_loss"], 1e-8),
        "answers": qa_after["answers"],
    }
