"""SEAL's knowledge-incorporation protocol on held-out passages, from a pretrained base.

The base is instruction-tuned once (closed-book and open-book questions, passages as recalled text and the
self-edit writing tasks, all about the *training* people). Then, for each passage of a person no training step
saw, a LoRA update is made on the instruction-tuned model and its closed-book answers to every question of that
passage are scored (exact match):

- (a) no update;
- (b) the update trains on the passage alone;
- (c) on the passage + a self-edit that the instruction-tuned model writes;
- (d) on the passage + a self-edit that the writer writes after ReST-EM rounds on *other* passages: the writer
  samples self-edits of each training passage, a self-edit is kept when the update on passage + self-edit answers
  that passage's questions better than the update on the passage alone (SEAL's binary reward), and the writer is
  fine-tuned on (passage -> kept self-edit); repeat.

The student (the model that is updated and answers) is the same instruction-tuned model in every condition, so
(c) and (d) differ only in who wrote the self-edit. The chance baseline answers each question with a random value
of the right kind.
"""

from __future__ import annotations

import copy
import json
import random
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from datamodules.instructions import (
    ASK,
    ATTRIBUTES,
    EDIT_KINDS,
    WRITE,
    Example,
    InstructionDataModule,
    Knowledge,
    Person,
    format_prompt,
    self_edit,
)
from models.lm_factory import LoraSettings, build_causal_lm, merged_state_dict
from models.lm_text import causal_lm_loss, lm_batch
from tuning.qa import generate, score_answers
from tuning.seal import RECALL, edit_examples, restore, trainable_state
from tuning.space import check_minimums
from tuning.trial import SEED_TARGETS

KEEP_RULES = ("improving", "best")


@dataclass
class SealProtocolSettings:
    """The protocol's model, data split and budgets (the defaults are what ``bench/tuning.py --parts seal`` runs)."""

    base: str
    """Folder of the pretrained base (``save_pretrained``: model + tokenizer)."""
    kind: str = "qa"
    """Self-edit kind the writer is asked for (``qa``: chosen on validation over SEAL's ``implications``)."""
    training_people: int = 80
    """People whose facts the instruction tuning teaches (every question type and writing task)."""
    rest_em_passages: int = 32
    """Passages the writer's ReST-EM rounds sample self-edits of (their questions are the reward)."""
    val_passages: int = 16
    """Held-out passages that choose settings."""
    test_passages: int = 24
    """Held-out passages that are reported (read once)."""
    writing_drills: int = 1000
    """Extra writing-task examples (all three kinds) about training people's names with freshly drawn facts, so the
    writer learns to copy facts from its input rather than recall the training people's."""
    recall_training_passages: bool = False
    """Also instruction-tune on the training people's passages as recalled text (teaches the student to answer
    from text it was trained on, which makes the passage-only update strong)."""
    instruct_steps: int = 800
    """Full-weight AdamW steps of instruction tuning (batches of ``batch_size``)."""
    instruct_lr: float = 1e-3
    """Learning rate of instruction tuning."""
    batch_size: int = 16
    """Batch size of instruction tuning and of the writer's fine-tuning."""
    lora_r: int = 16
    """Rank of the student's LoRA (on the attention and MLP projections)."""
    inner_steps: int = 10
    """Full-batch AdamW steps of the LoRA update on one passage (+ self-edit)."""
    inner_lr: float = 3e-3
    """Learning rate of that update."""
    rounds: int = 2
    """ReST-EM rounds of the writer."""
    candidates: int = 4
    """Self-edits sampled per training passage and round."""
    keep: str = "improving"
    """Which sampled self-edits the writer trains on: ``improving``, every one whose update beats the passage alone
    (SEAL's binary reward); ``best``, only the best of each passage's candidates, when it beats the passage alone."""
    temperature: float = 1.0
    """Sampling temperature of the ReST-EM self-edits (evaluation self-edits are greedy)."""
    writer_steps: int = 60
    """Full-weight AdamW steps of the writer on the kept self-edits per round."""
    writer_lr: float = 5e-4
    """Learning rate of the writer's fine-tuning."""
    max_new_tokens: int = 160
    """Longest self-edit (five question-answer pairs take about 130 tokens of the small base's tokenizer)."""
    seed: int = 0
    """Seed of the world (which people are where), the updates and the sampling."""

    def __post_init__(self) -> None:
        if self.kind not in WRITE:
            raise ValueError(f"kind must be one of {tuple(WRITE)}, got {self.kind!r}")
        if self.keep not in KEEP_RULES:
            raise ValueError(f"keep must be one of {KEEP_RULES}, got {self.keep!r}")
        check_minimums(self, {"training_people": 4, "rest_em_passages": 1, "val_passages": 1, "test_passages": 1,
                              "writing_drills": 0, "instruct_steps": 0, "batch_size": 1, "lora_r": 1,
                              "inner_steps": 1, "rounds": 0, "candidates": 1, "writer_steps": 1,
                              "max_new_tokens": 1},
                       above={"instruct_lr": 0, "inner_lr": 0, "writer_lr": 0, "temperature": 0})


# --- training loops ---------------------------------------------------------------------------------------------
def finetune(lm: nn.Module, data: InstructionDataModule, examples: list[Example], steps: int, lr: float,
             batch_size: int, seed: int) -> None:
    """``steps`` AdamW steps on shuffled minibatches of ``examples`` (loss on the responses), every trainable
    weight."""
    if not examples or steps == 0:
        return
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    items = [data.encode_example(e) for e in examples]
    order, rng = [], random.Random(seed)
    lm.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(items)), len(items))
        chosen, order = order[:batch_size], order[batch_size:]
        batch = lm_batch(*zip(*[items[i] for i in chosen]), data.tokenizer.pad_token_id, True)
        loss = causal_lm_loss(lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.eval()


def writing_drills(people: list[Person], count: int, seed: int) -> list[Example]:
    """``count`` writing-task examples of the people's names with random facts (cycling through the kinds)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        person = Person(rng.choice(people).name, tuple((a, rng.choice(vs)) for a, vs in ATTRIBUTES.items()))
        kind = EDIT_KINDS[i % len(EDIT_KINDS)]
        out.append(Example(WRITE[kind], person.passage, self_edit(person, kind)))
    return out


def update_examples(passage: str, self_edit: str | None, kind: str) -> list[Example]:
    """What the LoRA update trains on: the passage as recalled text, and the self-edit's examples."""
    return [Example(RECALL, "", passage)] + (edit_examples(self_edit, kind) if self_edit else [])


class Student:
    """The instruction-tuned model with a LoRA adapter that every update trains and every evaluation resets."""

    def __init__(self, instruct: nn.Module, data: InstructionDataModule, settings: SealProtocolSettings) -> None:
        self.lm = build_causal_lm(settings.base, lora=LoraSettings(r=settings.lora_r, alpha=2.0 * settings.lora_r,
                                                                   target_modules=list(SEED_TARGETS)),
                                  state_dict=merged_state_dict(instruct))
        self.lm.eval()
        self.data, self.settings = data, settings
        self.fresh = trainable_state(self.lm)

    def answers(self, knowledge: Knowledge) -> list[str]:
        prompts = [format_prompt(ASK, q) for q, _ in knowledge.questions]
        return generate(self.lm, self.data, prompts, max_new_tokens=12)

    def exact_match(self, knowledge: Knowledge, examples: list[Example], seed: int) -> float:
        """Exact match of the closed-book answers to ``knowledge``'s questions after an update on ``examples``
        (none: no update); the adapter is reset afterwards."""
        if examples:
            torch.manual_seed(seed)
            full_batch = len(examples)
            finetune(self.lm, self.data, examples, self.settings.inner_steps, self.settings.inner_lr, full_batch, seed)
        score = score_answers(self.answers(knowledge), [a for _, a in knowledge.questions])["em"]
        restore(self.lm, self.fresh)
        return score


def write(writer: nn.Module, data: InstructionDataModule, passages: list[str], kind: str, settings:
          SealProtocolSettings, samples: int = 1, greedy: bool = True, seed: int = 0) -> list[list[str]]:
    """``samples`` self-edits of ``kind`` per passage."""
    prompts = [format_prompt(WRITE[kind], p) for p in passages for _ in range(samples)]
    texts = generate(writer, data, prompts, settings.max_new_tokens, temperature=settings.temperature,
                     greedy=greedy, seed=seed)
    return [texts[i * samples:(i + 1) * samples] for i in range(len(passages))]


# --- the protocol -----------------------------------------------------------------------------------------------
def rest_em_round(writer: nn.Module, student: Student, passages: list[Knowledge], settings: SealProtocolSettings,
                  round_index: int) -> dict[str, Any]:
    """Sample self-edits of the training passages, keep those that beat the passage-only update (SEAL's binary
    reward), fine-tune the writer on (passage -> kept self-edit)."""
    seed = settings.seed * 1000 + round_index
    edits = write(writer, student.data, [k.passage for k in passages], settings.kind, settings,
                  samples=settings.candidates, greedy=False, seed=seed)
    kept, rewards = [], []
    for i, (knowledge, texts) in enumerate(zip(passages, edits)):
        alone = student.exact_match(knowledge, update_examples(knowledge.passage, None, settings.kind), seed + i)
        scores = [student.exact_match(knowledge, update_examples(knowledge.passage, text, settings.kind), seed + i)
                  for text in texts]
        rewards += [score - alone for score in scores]
        improving = [(score, text) for score, text in zip(scores, texts) if score > alone]
        if settings.keep == "best" and improving:
            improving = [max(improving, key=lambda pair: pair[0])]
        kept += [Example(WRITE[settings.kind], knowledge.passage, text) for _, text in improving]
    finetune(writer, student.data, kept, settings.writer_steps if kept else 0, settings.writer_lr,
             settings.batch_size, seed)
    return {"round": round_index, "sampled": len(rewards), "kept": len(kept),
            "mean_gain_over_passage": statistics.mean(rewards), "example_kept": kept[0].output if kept else None}


def facts_copied(knowledge: Knowledge, text: str) -> dict[str, float]:
    """What a self-edit carries of its passage: ``name`` (1.0 when the person's name is one of its words) and
    ``answers`` (the share of the passage's answers that are words of it, whoever they are attributed to)."""
    name = re.match(r"[A-Za-z]+", knowledge.passage).group()  # every passage sentence starts with the name
    words = set(re.findall(r"[A-Za-z]+", text))
    return {"name": float(name in words),
            "answers": statistics.mean(answer in words for _, answer in knowledge.questions)}


def evaluate(student: Student, writers: dict[str, nn.Module], passages: list[Knowledge],
             settings: SealProtocolSettings) -> dict[str, Any]:
    """Exact match over every question of ``passages`` under each condition, and one self-edit per writer."""
    scores: dict[str, list[float]] = {"no_update": [], "passage": [], **{name: [] for name in writers}}
    edits = {name: write(w, student.data, [k.passage for k in passages], settings.kind, settings)
             for name, w in writers.items()}
    for i, knowledge in enumerate(passages):
        seed = settings.seed * 1000 + 500 + i
        scores["no_update"].append(student.exact_match(knowledge, [], seed))
        scores["passage"].append(student.exact_match(knowledge, update_examples(knowledge.passage, None,
                                                                                settings.kind), seed))
        for name in writers:
            examples = update_examples(knowledge.passage, edits[name][i][0], settings.kind)
            scores[name].append(student.exact_match(knowledge, examples, seed))
    return {"exact_match": {name: statistics.mean(values) for name, values in scores.items()},
            "facts_copied": {name: {part: statistics.mean(facts_copied(k, e[0])[part]
                                                          for k, e in zip(passages, edits[name]))
                                    for part in ("name", "answers")} for name in writers},
            "example_edits": {name: {"passage": passages[0].passage, "self_edit": e[0][0]}
                              for name, e in edits.items()}}


def chance_exact_match() -> float:
    """Exact match of a uniformly random value of the asked attribute (every generated fact is uniform)."""
    return statistics.mean(1 / len(values) for values in ATTRIBUTES.values())


def run_protocol(settings: SealProtocolSettings) -> dict[str, Any]:
    """Instruction-tune the base, train the writer by ReST-EM, and score (a)-(d) on validation and test passages."""
    torch.manual_seed(settings.seed)
    s = settings
    held_out = s.rest_em_passages + s.val_passages + s.test_passages
    data = InstructionDataModule(num_people=s.training_people + held_out + 16, num_val_people=8, num_test_people=8,
                                 num_knowledge_people=held_out, world_seed=s.seed, tokenizer=s.base, max_length=256)
    rest_em = data.knowledge[:s.rest_em_passages]
    val = data.knowledge[s.rest_em_passages:s.rest_em_passages + s.val_passages]
    test = data.knowledge[s.rest_em_passages + s.val_passages:]
    instruct = build_causal_lm(s.base)
    examples = data.examples["train"] + writing_drills(data.people["train"], s.writing_drills, s.seed)
    if s.recall_training_passages:
        examples += [Example(RECALL, "", p.passage) for p in data.people["train"]]
    finetune(instruct, data, examples, s.instruct_steps, s.instruct_lr, s.batch_size, s.seed)
    progress(s, f"instruction-tuned ({s.instruct_steps} steps on {len(examples)} examples)")
    student = Student(instruct, data, s)
    writer = copy.deepcopy(instruct)
    rounds = []
    for r in range(s.rounds):
        rounds.append(rest_em_round(writer, student, rest_em, s, r))
        progress(s, f"ReST-EM round {r}: kept {rounds[-1]['kept']} of {rounds[-1]['sampled']} self-edits")
    writers = {"base_self_edit": instruct, "rest_em_self_edit": writer}
    result = {"settings": asdict(s), "chance": chance_exact_match(), "rest_em": rounds}
    for split, passages in (("val", val), ("test", test)):
        result[split] = evaluate(student, writers, passages, s)
        progress(s, f"{split} exact match " + json.dumps(result[split]["exact_match"]))
    return result


def progress(settings: SealProtocolSettings, message: str) -> None:
    print(f"[SEAL protocol, seed {settings.seed}] {message}", flush=True)
