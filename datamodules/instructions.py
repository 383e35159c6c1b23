"""Instruction data (instruction / input / output) for LoRA SFT, with the loss on the response only.

The offline default is a generated *world*: people with attributes (home town, job, colour, pet, food). A passage
states one person's facts; questions ask them back. People are split four ways:

- ``train``: every instruction type (closed-book questions, questions with the passage in the input, and the
  three self-edit writing tasks: question-answer pairs, a restatement, implications of the passage);
- ``val`` / ``test``: the tasks that can be solved from the input alone (questions with the passage, self-edit
  writing), so the validation loss measures instruction following, not memorised facts;
- ``knowledge``: passages the model never trains on, with held-out closed-book questions. The SEAL stage turns
  these passages into self-edits and the QA evaluation asks the questions.

A dataset can replace the generated set (``dataset``: a local JSON / JSONL / CSV / Parquet file or folder, or a
hub name, read by ``datasets.load_dataset`` through ``datamodules.sources``; column names are options); a
``knowledge_file`` (JSONL of ``{"passage": ..., "questions": [{"question": ..., "answer": ...}]}``) then
supplies the SEAL passages and held-out questions.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.distributed import Chunks, evaluation_loader, per_device_batch
from datamodules.sources import column_value, load_records
from models.lm_factory import build_tokenizer, load_tokenizer
from models.lm_text import lm_batch

FIRST = ["Ma", "Lo", "Ri", "Te", "Su", "Ka", "No", "Vi", "Da", "Pe", "Jo", "Ze"]
LAST = ["ra", "len", "mo", "tis", "na", "rek", "lia", "dor", "son", "ya"]
ATTRIBUTES: dict[str, list[str]] = {
    "city": ["Oakvale", "Pinecrest", "Riverton", "Stonebridge", "Mapleton", "Westford", "Lakeside", "Hillcrest"],
    "job": ["baker", "farmer", "teacher", "painter", "doctor", "sailor", "singer", "builder"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "pet": ["cat", "dog", "parrot", "rabbit", "turtle", "horse", "goat", "hamster"],
    "food": ["apples", "bread", "rice", "soup", "cheese", "fish", "noodles", "cake"],
}
STATEMENT = {"city": "{n} lives in {v}.", "job": "{n} works as a {v}.", "colour": "{n}'s favourite colour is {v}.",
             "pet": "{n} has a pet {v}.", "food": "{n} likes to eat {v}."}
RESTATEMENT = {"city": "The home town of {n} is {v}.", "job": "The job of {n} is {v}.",
               "colour": "The colour {n} likes best is {v}.", "pet": "The pet of {n} is a {v}.",
               "food": "The food {n} likes is {v}."}
IMPLICATION = {"city": "{n} can often be seen in {v}.", "job": "Every day {n} goes to work as a {v}.",
               "colour": "{n} would pick {v} over other colours.", "pet": "{n} takes care of a {v}.",
               "food": "{n} often eats {v}."}
QUESTION = {"city": "Where does {n} live?", "job": "What is the job of {n}?",
            "colour": "What is the favourite colour of {n}?", "pet": "What pet does {n} have?",
            "food": "What does {n} like to eat?"}
ASK = "Answer the question."
ASK_WITH_PASSAGE = "Answer the question using the passage."
WRITE = {"qa": "Write question-answer pairs about the passage.", "restatement": "Restate the passage.",
         "implications": "List implications of the passage."}
EDIT_KINDS: tuple[str, ...] = tuple(WRITE)


@dataclass(frozen=True)
class Example:
    """One instruction-following example."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Knowledge:
    """A passage the model has not trained on and the held-out questions it answers."""

    passage: str
    questions: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Person:
    """One generated person and their facts."""

    name: str
    facts: tuple[tuple[str, str], ...]

    def text(self, templates: dict[str, str]) -> str:
        return " ".join(templates[a].format(n=self.name, v=v) for a, v in self.facts)

    @property
    def passage(self) -> str:
        return self.text(STATEMENT)

    def questions(self) -> list[tuple[str, str]]:
        return [(QUESTION[a].format(n=self.name), v) for a, v in self.facts]


def qa_text(pairs: list[tuple[str, str]]) -> str:
    """Self-edit text of question-answer pairs, one ``Q: ... A: ...`` per line."""
    return "\n".join(f"Q: {q} A: {a}" for q, a in pairs)


def parse_qa_text(text: str) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs in a ``Q: ... A: ...`` text (what a model wrote; malformed lines skipped).

    A pair is ``Q:``, a question ending in ``?``, ``A:`` and an answer that runs to the next ``Q:`` or the end of
    the line. Linear in the length of ``text`` (every line is split on ``Q:`` once)."""
    pairs = []
    for line in text.splitlines():
        for part in line.split("Q:")[1:]:
            match = _QUESTION_END.search(part)
            if match is None:
                continue
            question, answer = part[:match.start() + 1].strip(), part[match.end():].strip().rstrip(".")
            if question and answer:
                pairs.append((question, answer))
    return pairs


_QUESTION_END = re.compile(r"\?\s*A:")  # the first "?" followed by "A:" ends a question


def self_edit(person: Person, kind: str) -> str:
    """The reference self-edit of ``kind`` for a person's passage (the training target of the writing tasks)."""
    if kind == "qa":
        return qa_text(person.questions())
    if kind == "restatement":
        return person.text(RESTATEMENT)
    if kind == "implications":
        return person.text(IMPLICATION)
    raise ValueError(f"unknown self-edit kind {kind!r}; expected one of {EDIT_KINDS}")


def generate_people(count: int, seed: int = 0) -> list[Person]:
    """``count`` people with distinct names and random facts (the same for the same arguments)."""
    names = [f + m + last for f in FIRST for m in ("", "li", "ro") for last in LAST]
    if count > len(names):
        raise ValueError(f"at most {len(names)} people can be generated, got {count}")
    rng = random.Random(seed)
    chosen = rng.sample(names, count)
    return [Person(n, tuple((a, rng.choice(vs)) for a, vs in ATTRIBUTES.items())) for n in chosen]


def person_examples(person: Person, closed_book: bool, open_book: int, rng: random.Random) -> list[Example]:
    """Instruction examples about one person: closed-book questions, ``open_book`` questions with the passage in
    the input, and the three self-edit writing tasks."""
    questions = person.questions()
    out = [Example(ASK, q, a) for q, a in questions] if closed_book else []
    for q, a in rng.sample(questions, min(open_book, len(questions))):
        out.append(Example(ASK_WITH_PASSAGE, f"{person.passage}\nQuestion: {q}", a))
    out += [Example(WRITE[k], person.passage, self_edit(person, k)) for k in EDIT_KINDS]
    return out


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an example; the response follows it."""
    body = f"Instruction: {instruction}\n"
    if input:
        body += f"Input: {input}\n"
    return body + "Response:"


def read_knowledge(path: str) -> list[Knowledge]:
    """SEAL passages with held-out questions from a JSONL file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"knowledge file {path!r} does not exist")
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "passage" not in record or not record.get("questions"):
            raise ValueError(f"{path}:{number} needs 'passage' and a non-empty 'questions' list")
        out.append(Knowledge(record["passage"], tuple((q["question"], q["answer"]) for q in record["questions"])))
    return out


class InstructionDataModule(LightningDataModule):
    """Instruction examples, their tokenizer and splits; batches of ``input_ids`` / ``attention_mask`` / ``labels``
    with ``-100`` on the prompt and on padding (the loss is taken on the response only)."""

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        prompt_column: str = "instruction",
        input_column: str | None = "input",
        completion_column: str = "output",
        knowledge_file: str | None = None,
        num_people: int = 72,
        num_val_people: int = 8,
        num_test_people: int = 8,
        num_knowledge_people: int = 8,
        open_book_questions: int = 2,
        world_seed: int = 0,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        vocab_size: int = 512,
        tokenizer_cache: str | None = None,
        max_length: int = 160,
        batch_size: int = 8,
        eval_batch_size: int = 32,
    ) -> None:
        """
        Args:
            dataset: A local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a local folder or a ``datasets``
                hub name (read by ``datasets.load_dataset``); ``null`` generates the offline world.
            dataset_config: Configuration name of a hub dataset.
            split: Split of ``dataset`` that is read (a local file is the split ``train``).
            val_split: Split read for validation; ``null`` holds out ``val_fraction`` of ``split``.
            test_split: Split read for testing; ``null`` holds out ``val_fraction`` of ``split``.
            prompt_column: Column of the instruction.
            input_column: Column of the input that follows the instruction (a record without it has none).
            completion_column: Column of the response (the loss is taken on it).
            knowledge_file: JSONL of SEAL passages with held-out questions (local data only; the generated world
                has its own).
            num_people: People in the generated world (all splits).
            num_val_people: Generated people whose examples form the validation set.
            num_test_people: Generated people whose examples form the test set.
            num_knowledge_people: Generated people whose passages are held out for SEAL and the QA evaluation.
            open_book_questions: Questions per person asked with the passage in the input.
            world_seed: Seed of the generated world and of the split of local data.
            val_fraction: Share of local examples held out for validation (and the same again for testing).
            tokenizer: A hub name or local folder of a pretrained tokenizer; ``null`` trains a BPE tokenizer on
                the training text (cached).
            vocab_size: Size of the trained tokenizer.
            tokenizer_cache: Folder of cached tokenizers (``null``: ``~/.cache/experiential-agents/tokenizers``).
            max_length: Longest token sequence (prompt + response); longer responses are cut.
            batch_size: Training batch size, summed over all devices.
            eval_batch_size: Validation / test batch size per device.
        """
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("max_length", max_length, 16)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0.0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        if dataset is not None:
            self.examples, self.knowledge = self._from_dataset()
        else:
            self.examples, self.knowledge = self._generated()
        if not self.examples["train"] or not self.examples["val"]:
            raise ValueError("no training or validation examples: give more data")
        texts = [format_prompt(e.instruction, e.input) + " " + e.output for e in self.examples["train"]]
        texts += [k.passage for k in self.knowledge]
        self.tokenizer = (build_tokenizer(texts, vocab_size, tokenizer_cache) if tokenizer is None
                          else load_tokenizer(tokenizer))

    # --- data -------------------------------------------------------------------------------------------------
    def _generated(self) -> tuple[dict[str, list[Example]], list[Knowledge]]:
        hp = self.hparams
        held_out = hp.num_val_people + hp.num_test_people + hp.num_knowledge_people
        for name in ("num_val_people", "num_knowledge_people"):
            if hp[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {hp[name]}")
        if hp.num_people - held_out < 4:
            raise ValueError(f"num_people must exceed the held-out people ({held_out}) by >= 4, got {hp.num_people}")
        people = generate_people(hp.num_people, hp.world_seed)
        rng = random.Random(hp.world_seed + 1)
        knowledge_people = people[:hp.num_knowledge_people]
        val = people[hp.num_knowledge_people:hp.num_knowledge_people + hp.num_val_people]
        test = people[hp.num_knowledge_people + hp.num_val_people:held_out]
        train = people[held_out:]
        examples = {
            "train": [e for p in train for e in person_examples(p, True, hp.open_book_questions, rng)],
            "val": [e for p in val for e in person_examples(p, False, hp.open_book_questions, rng)],
            "test": [e for p in test for e in person_examples(p, False, hp.open_book_questions, rng)],
        }
        rng.shuffle(examples["train"])
        self.people = {"train": train, "val": val, "test": test, "knowledge": knowledge_people}
        return examples, [Knowledge(p.passage, tuple(p.questions())) for p in knowledge_people]

    def _from_dataset(self) -> tuple[dict[str, list[Example]], list[Knowledge]]:
        hp = self.hparams
        columns = [hp.prompt_column, hp.completion_column]  # the input is optional
        examples = {}
        for part, name in (("train", hp.split), ("val", hp.val_split), ("test", hp.test_split)):
            if name is not None:
                records = load_records(hp.dataset, name, columns, config=hp.dataset_config)
                examples[part] = [self._example(r) for r in records]
        missing = [part for part in ("val", "test") if part not in examples]
        if missing:  # held out of the training split
            records = examples["train"]
            random.Random(hp.world_seed).shuffle(records)
            n = max(1, int(len(records) * hp.val_fraction))
            for i, part in enumerate(missing):
                examples[part] = records[i * n:(i + 1) * n]
            examples["train"] = records[len(missing) * n:]
        self.people = {}
        return examples, read_knowledge(hp.knowledge_file) if hp.knowledge_file else []

    def _example(self, record: dict) -> Example:
        hp = self.hparams
        given_input = column_value(record, hp.input_column) if hp.input_column else ""
        return Example(column_value(record, hp.prompt_column), given_input, column_value(record, hp.completion_column))

    # --- tokens -----------------------------------------------------------------------------------------------
    def encode(self, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
        """``<bos>`` + prompt tokens, and response tokens + ``<eos>`` (cut to ``max_length`` in all)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        p = bos + self.tokenizer(prompt, add_special_tokens=False).input_ids
        if response is None:
            return p[-self.hparams.max_length:], []
        r = self.tokenizer(" " + response, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
        return p, r[: max(1, self.hparams.max_length - len(p))]

    def encode_example(self, example: Example) -> tuple[list[int], list[int]]:
        return self.encode(format_prompt(example.instruction, example.input), example.output)

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        prompts, responses = zip(*items)
        return lm_batch(prompts, responses, self.tokenizer.pad_token_id, completion_only=True)

    def loader(self, examples: list[Example], batch_size: int, shuffle: bool = False) -> DataLoader:
        """Batches of ``examples`` (any list, e.g. self-edits turned into examples)."""
        items = [self.encode_example(e) for e in examples]
        return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                          drop_last=shuffle and len(items) > batch_size)

    def text_loader(self, texts: list[str], batch_size: int, shuffle: bool = True) -> DataLoader:
        """Batches of plain text with the loss on every token (pre-training a base model)."""
        items = [self.encode("", t) for t in texts]
        return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                          drop_last=shuffle and len(items) > batch_size)

    def pretraining_texts(self) -> list[str]:
        """Plain text for a base model (it never sees the instruction template, as a hub base model has not).

        Generated world: the people of a *different* world (none named as in this one), each passage alone and
        followed by each of its rewrites, so the base can continue a passage with a restatement but knows none of
        this world's facts. Local data: the training examples' inputs and outputs. Held-out passages are never
        included.
        """
        if not self.people:
            return [t for e in self.examples["train"] for t in (e.input, e.output) if t.strip()]
        taken = {p.name for group in self.people.values() for p in group}
        others = [p for p in generate_people(len(taken) * 2, self.hparams.world_seed + 1000) if p.name not in taken]
        texts = [p.passage for p in others]
        texts += [p.passage + "\n" + self_edit(p, k) for p in others for k in EDIT_KINDS]
        random.Random(self.hparams.world_seed + 1001).shuffle(texts)
        return texts

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.examples["train"], per_device_batch(self, self.batch_size)[0], shuffle=True)

    def _evaluation(self, split: str) -> DataLoader:
        """The split's batches dealt whole to the processes, none twice (placeholders are ``{}``)."""
        items = [self.encode_example(e) for e in self.examples[split]]
        return evaluation_loader(self, Chunks(items, self.hparams.eval_batch_size, self.collate), empty={})

    def val_dataloader(self) -> DataLoader:
        return self._evaluation("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation("test")

    # --- questions --------------------------------------------------------------------------------------------
    def open_book_questions(self, split: str = "val") -> list[tuple[str, str]]:
        """``(prompt, reference)`` of the split's questions asked with the passage in the input."""
        return [(format_prompt(e.instruction, e.input), e.output) for e in self.examples[split]
                if e.instruction == ASK_WITH_PASSAGE]

    @staticmethod
    def closed_book_prompt(question: str) -> str:
        return format_prompt(ASK, question)
